"""dsfast benchmarks.

- :mod:`bench.peers`    the providers compared per op (official-code form, eager reference,
  torch.compile(reference), pywt, pytorch_wavelets, ptwt, every available dsfast backend);
- :mod:`bench.kernels`  timing (wall clock on CPU, CUDA events on GPU), peak extra memory, bandwidth,
  and the op sweep;
- :mod:`bench.training` a DomainStudio training step on diffusers UNets (official form vs dsfast);
- :mod:`bench.run`      ``python -m bench.run --suite cpu|gpu|gpu-train [--quick]``: runs a suite, writes
  JSON lines under ``bench/results/<device>/``, regenerates the tables in ``bench/README.md`` and the plots.
"""
