"""dsfast benchmarks.

- :mod:`bench.peers`    the providers compared per op (official-code form, eager reference,
  torch.compile(reference), pywt, pytorch_wavelets, ptwt, every available dsfast backend);
- :mod:`bench.kernels`  timing (wall clock on CPU, CUDA events on GPU), peak extra memory, bandwidth,
  and the op sweep;
- :mod:`bench.training` a DomainStudio training step on diffusers UNets (official form vs dsfast), the step
  split into its parts (models' forward and backward, the loss's forward and backward, AdamW, the rest), and
  that split estimated for SD-1.5 on an H100 (``python -m bench.training --h100-estimate``);
- :mod:`bench.run`      ``python -m bench.run --suite cpu|gpu|gpu-train [--quick] [--split-only]``: runs a suite, writes
  JSON lines under ``bench/results/<device>/``, regenerates the tables in ``bench/README.md`` and the plots.
"""
