"""Test setup: the Triton interpreter on CPU-only machines, the backends under test, and the seed.

Seeds: every test starts from ``torch.manual_seed(s)`` (and ``random`` / ``numpy``) with
``s = crc32("<DSFAST_TEST_SEED>:<test node id>")``; ``DSFAST_TEST_SEED`` defaults to 0, so a run is
reproducible, and another value draws other inputs. Tests that need the value take the ``seed``
fixture, or ``gen`` (a ``torch.Generator`` seeded with it). The base seed is in the report header
and, with the per-test seed, in every failure report.

Backends: ``DSFAST_REQUIRE_BACKENDS=cpp,triton`` (set by ``make test``) makes a missing backend a
failure instead of a skip: the backend stays in ``BACKEND_CASES`` (its cases then fail), the kernel
test modules fail to collect, and ``test_required_backends_are_available`` fails.
"""
import os
import random
import warnings
import zlib

import numpy as np
import pytest
import torch

# Must be set before triton or dsfast.kernels is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DSFAST_POISON_OUTPUTS", "1")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from dsfast.ops import available_backends  # noqa: E402

BASE_SEED = int(os.environ.get("DSFAST_TEST_SEED", "0"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The device each compiled backend is required on.
BACKEND_DEVICE = {"cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu", "cuda": "cuda"}
REQUIRED_BACKENDS = [b for b in os.environ.get("DSFAST_REQUIRE_BACKENDS", "").replace(" ", "").split(",") if b]
for _b in REQUIRED_BACKENDS:
    if _b not in BACKEND_DEVICE:
        raise ValueError(f"DSFAST_REQUIRE_BACKENDS: unknown backend {_b!r} (one of {sorted(BACKEND_DEVICE)})")


def missing_backends() -> list[str]:
    return [b for b in REQUIRED_BACKENDS if b not in available_backends(BACKEND_DEVICE[b])]


# (device, backend) pairs of compiled backends to compare against the reference: the available
# ones plus any required one that is missing (so that its cases fail instead of vanishing).
BACKEND_CASES = [(d, b) for d in DEVICES for b in available_backends(d) if b != "torch"]
BACKEND_CASES += [(BACKEND_DEVICE[b], b) for b in missing_backends() if (BACKEND_DEVICE[b], b) not in BACKEND_CASES]


def require_backend(backend: str) -> None:
    """For a module that tests one backend's kernels: skip it when the backend is missing and not
    required; raise (a collection error, so the run fails) when it is required."""
    if backend in available_backends(BACKEND_DEVICE[backend]):
        return
    if backend in REQUIRED_BACKENDS:
        raise RuntimeError(f"backend {backend!r} is required (DSFAST_REQUIRE_BACKENDS) but not available")
    pytest.skip(f"backend {backend!r} is not available (DSFAST_REQUIRE_BACKENDS={backend} makes this an error)",
                allow_module_level=True)


def seed_for(nodeid: str) -> int:
    return zlib.crc32(f"{BASE_SEED}:{nodeid}".encode())


@pytest.fixture(autouse=True)
def seed(request) -> int:
    s = seed_for(request.node.nodeid)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    cpu = available_backends("cpu")
    return [
        f"dsfast: DSFAST_TEST_SEED={BASE_SEED} (per test: crc32('{BASE_SEED}:<node id>'))",
        f"dsfast: cpu backends {cpu}, required {REQUIRED_BACKENDS or 'none'}, missing {missing_backends() or 'none'}",
    ]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("dsfast seed", (
            f"DSFAST_TEST_SEED={BASE_SEED}, torch.manual_seed({seed_for(item.nodeid)}); replay with "
            f"DSFAST_TEST_SEED={BASE_SEED} python -m pytest '{item.nodeid}'")))
    return report


def interpreter_atol(dtype: torch.dtype, device, backend: str, atol: float) -> float:
    """``atol`` (relative) for a low-precision comparison; larger for bfloat16 under the Triton interpreter,
    which converts float32 to bfloat16 by truncation toward zero (a GPU rounds to nearest even): up to
    one bfloat16 ulp per element, and a one-sided bias in sums."""
    if backend == "triton" and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        return max(atol, 2.0**-7)
    return atol


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double().cpu() - ref.detach().double().cpu()).abs().max())


def assert_close_in_low_precision(out, torch_out, ref, k: float = 2.0, atol: float = 0.0, msg: str = ""):
    """Low-precision check in the style of flash-attention's tests: ``out``'s max error against the
    float64 ``ref`` is at most ``k`` times that of ``torch_out`` (PyTorch itself, same inputs and
    dtype) plus ``atol`` times the size of ``ref``; ``out`` has ``torch_out``'s dtype and is finite."""
    assert out.dtype == torch_out.dtype, f"{msg}: dtype {out.dtype}, expected {torch_out.dtype}"
    assert out.shape == ref.shape, f"{msg}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{msg}: non-finite (or unwritten, NaN-poisoned) elements"
    scale = float(ref.detach().abs().max())
    err, torch_err = max_err(out, ref), max_err(torch_out, ref)
    bound = k * torch_err + atol * scale
    assert err <= bound, f"{msg}: max error {err:.3e} > {k} x PyTorch's {torch_err:.3e} + {atol:.0e} x {scale:.3e}"
