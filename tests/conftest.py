"""Test setup: the Triton interpreter on CPU-only machines, and the devices/backends under test."""
import os
import warnings

import torch

# Must be set before triton or dsfast.kernels is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DSFAST_POISON_OUTPUTS", "1")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from dsfast.ops import available_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend) pairs of compiled backends to compare against the reference.
BACKEND_CASES = [(d, b) for d in DEVICES for b in available_backends(d) if b != "torch"]
