"""Triton kernels of dsfast: the package ``dsfast.kernels``, whose modules are the files of the repository's
top-level ``kernels/`` folder (setup.py maps them here; this file is the package's ``__init__``).

``kernels/`` itself has no ``__init__.py`` on purpose: a Python started in the repository root has the root
first on ``sys.path``, and a regular package named ``kernels`` there would shadow the installed distribution
of that name (Hugging Face's ``kernels``, which transformers imports when diffusers loads peft or a VAE). A
folder without ``__init__.py`` is at most a namespace portion, which any installed module outranks.

One module per op file of the kernel contract (docs/KERNELS.md):

- :mod:`.haar_dwt2`: ``haar_dwt2``, ``haar_idwt2``
- :mod:`.high_frequency`: ``high_frequency``, ``high_frequency_backward``
- :mod:`.pairwise_similarity_kl`: ``gram``, ``gram_backward``
- :mod:`.hf_pairwise_similarity_kl`: ``hf_gram``, ``hf_gram_backward``

Each module holds the ``@triton.jit`` kernels and thin Python launchers that take torch tensors,
allocate the outputs (NaN-filled when ``DSFAST_POISON_OUTPUTS=1``), launch and return. On a machine
without a GPU they run through the Triton interpreter (``TRITON_INTERPRET=1`` set before import).
Nothing heavy is imported here; import the op modules themselves.
"""
import os


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter: ``TRITON_INTERPRET`` is 1/true/on (Triton's rule)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")
