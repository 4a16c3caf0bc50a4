"""How the Triton launchers launch, checked without a GPU: on the input's CUDA device, with capture-safe constants.

Every public launcher of ``dsfast.kernels`` (the table of ``dsfast.kernels._gpu_compile.launchers``) runs
on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and a ``cuda:1`` device, no memory) with the
kernel launches recorded instead of run, and torch's current-device switch simulated, so the test sees
which device each kernel would have been launched on.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.conftest import require_backend

require_backend("triton")

from dsfast.kernels import _gpu_compile  # noqa: E402
from dsfast.kernels import pairwise_similarity_kl as K_gram  # noqa: E402

SHAPE = (5, 3, 8, 8)


def _launch_all(monkeypatch, device: str) -> dict:
    """launcher name -> [(kernel name, CUDA device current at its launch)] for inputs on ``device``."""
    current = [0]  # the simulated current CUDA device

    def exchange(index):
        previous = current[0]
        if index >= 0:
            current[0] = index
        return previous

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
    monkeypatch.setattr(K_gram, "multiprocessor_count", lambda dev: 4)
    launches = []
    kernel_type = type(K_gram._gram_kernel)  # JITFunction, or InterpretedFunction under the interpreter

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.__name__, current[0]))

    monkeypatch.setattr(kernel_type, "run", run)
    seen = {}
    with FakeTensorMode():
        for name, launcher in _gpu_compile.launchers().items():
            launches.clear()
            launcher(torch.empty(SHAPE, device=device))
            seen[name] = list(launches)
    assert current[0] == 0, "the current device was not restored"
    return seen


def test_launches_on_the_input_device(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: every kernel of every launcher launches on cuda:1."""
    for name, launches in _launch_all(monkeypatch, "cuda:1").items():
        assert launches, f"{name}: no kernel launched"
        wrong = [(kernel, dev) for kernel, dev in launches if dev != 1]
        assert not wrong, f"{name}: launched on the current device instead of the input's (cuda:1): {wrong}"


def test_constants_need_no_host_copy(monkeypatch):
    """Stencil weights and the tail's tau/scale/eps reach the kernels without a host-to-device copy (illegal
    during CUDA-graph capture) and without a cached device buffer (one a captured graph could outlive)."""
    built = []
    for factory in ("tensor", "as_tensor", "from_numpy"):
        original = getattr(torch, factory)

        def record(*args, _original=original, _name=factory, **kwargs):
            built.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, factory, record)
    _launch_all(monkeypatch, "cuda:2")  # a device no other test uses: nothing of it can be cached already
    assert not built, f"device constants built from host data: {built}"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_no_device_switch_off_cuda(monkeypatch, device):
    """CPU (interpreter) and meta (GPU compile without a GPU) inputs leave the current device alone."""
    for launches in _launch_all(monkeypatch, device).values():
        assert all(dev == 0 for _, dev in launches)


# the headline batch size, small images: the count does not depend on them (bench.static counts the same 3 + 3
# at N=16 and 3x64² to 3x1024² on meta tensors)
LOSS_SHAPE = (16, 3, 32, 32)


@pytest.mark.slow
def test_domainstudio_loss_launch_count(monkeypatch):
    """The whole DomainStudio loss (Triton backend, all three terms) is at most 3 GPU launches forward and 3
    backward: Triton kernels plus the aten ops that would be kernels on a GPU, counted on CPU tensors.
    (check_finite=False: the default on a GPU, where the check would need a sync.)"""
    from dsfast import ops
    from dsfast.kernels._launch_count import LaunchCounter

    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "0")  # NaN-filling outputs is a debugging launch
    s, a, r = (torch.randn(LOSS_SHAPE) for _ in range(3))
    a.requires_grad_()
    with LaunchCounter() as forward:
        total = ops.domainstudio_loss(s, a, r, backend="triton", check_finite=False).total
    with LaunchCounter() as backward:
        total.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    counts = f"forward {forward.triton} + {forward.torch}; backward {backward.triton} + {backward.torch}"
    assert forward.total <= 3 and backward.total <= 3, counts
