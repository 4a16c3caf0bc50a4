"""Bad input gets one clear error, the same from every backend, before any kernel runs."""
import pytest
import torch

from dsfast import ops
from dsfast.ops import available_backends, resolve_backend

BACKENDS = available_backends("cpu")


def batch(n=4, c=3, h=8, w=8, dtype=torch.float32):
    return torch.randn(n, c, h, w, dtype=dtype)


def domainstudio_loss(source, adapted, **kwargs):
    return ops.domainstudio_loss(source, adapted, adapted.detach(), **kwargs).total


PAIRWISE_OPS = [ops.pairwise_similarity_kl, ops.hf_pairwise_similarity_kl, domainstudio_loss]
IMAGE_OPS = [
    lambda x, b: ops.haar_dwt2(x, backend=b),
    lambda x, b: ops.haar_wavedec2(x, 1, backend=b),
    lambda x, b: ops.high_frequency(x, backend=b),
    lambda x, b: ops.hf_mse(x, x, backend=b),
    lambda x, b: ops.hf_pairwise_similarity_kl(x, x, backend=b),
    lambda x, b: ops.domainstudio_loss(x, x, x, backend=b),
]


# Validation runs before the backend is chosen, so these run once on the default backend; the last
# test checks that each backend goes through the same checks.
@pytest.mark.parametrize("op", PAIRWISE_OPS)
@pytest.mark.parametrize("n", [1, 2])
def test_pairwise_needs_three_samples(op, n):
    with pytest.raises(ValueError, match=rf"N >= 3 .*got N={n}"):
        op(batch(n), batch(n))


@pytest.mark.parametrize("op", PAIRWISE_OPS)
def test_pairwise_shape_device_dtype_mismatch(op):
    """Mixed floating dtypes are promoted (tests/test_mixed_dtypes.py); a non-floating side is refused."""
    with pytest.raises(ValueError, match="`source` and `adapted` must have the same shape"):
        op(batch(4), batch(5))
    with pytest.raises(ValueError, match="same device"):
        op(batch().to("meta"), batch())
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(TypeError, match="`adapted` must be a floating-point tensor"):
            op(batch(), batch().to(dtype))


@pytest.mark.parametrize("op", PAIRWISE_OPS)
@pytest.mark.parametrize("side,bad", [("source", float("nan")), ("adapted", float("inf"))])
def test_pairwise_non_finite(op, side, bad):
    source, adapted = batch(), batch()
    (source if side == "source" else adapted)[2, 1, 3, 3] = bad
    with pytest.raises(ValueError, match=f"`{side}` contains NaN or Inf"):
        op(source, adapted)


@pytest.mark.parametrize("op", IMAGE_OPS)
@pytest.mark.parametrize("shape", [(4, 3, 7, 8), (4, 3, 8, 9)])
def test_odd_sizes(op, shape):
    with pytest.raises(ValueError, match="height and width must be divisible by 2"):
        op(torch.randn(shape), "auto")


@pytest.mark.parametrize("op,dtype", zip(IMAGE_OPS, [torch.int64, torch.uint8, torch.bool, torch.int32, torch.int8]))
def test_integer_dtype(op, dtype):
    with pytest.raises(TypeError, match="floating-point"):
        op(torch.zeros(4, 3, 8, 8, dtype=dtype), "auto")


@pytest.mark.parametrize("op", IMAGE_OPS)
def test_empty_and_wrong_rank(op):
    with pytest.raises(ValueError, match="empty"):
        op(torch.zeros(0, 3, 8, 8), "auto")
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        op(torch.zeros(3, 8, 8), "auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_rejects_bad_input(backend):
    """A smoke per backend: an explicit backend gets the same errors, before any kernel runs."""
    with pytest.raises(ValueError, match="height and width must be divisible by 2"):
        ops.hf_pairwise_similarity_kl(torch.randn(4, 3, 7, 8), torch.randn(4, 3, 7, 8), backend=backend)
    with pytest.raises(ValueError, match=r"N >= 3 .*got N=2"):
        ops.pairwise_similarity_kl(batch(2), batch(2), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        ops.haar_dwt2(torch.zeros(4, 3, 8, 8, dtype=torch.int64), backend=backend)
    source = batch()
    source[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`source` contains NaN or Inf"):
        ops.hf_pairwise_similarity_kl(source, batch(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_domainstudio_real_mismatch(backend):
    with pytest.raises(ValueError, match="`adapted` and `real` must have the same shape"):
        ops.domainstudio_loss(batch(), batch(), batch(h=4), backend=backend)
    for dtype in (torch.int32, torch.complex64):
        with pytest.raises(TypeError, match="`real` must be a floating-point tensor"):
            ops.domainstudio_loss(batch(), batch(), batch().to(dtype), backend=backend)
    with pytest.raises(ValueError, match="`adapted` and `real` must be on the same device"):
        ops.domainstudio_loss(batch(), batch(), batch().to("meta"), backend=backend)


def test_hf_mse_and_idwt_refuse_non_floating():
    with pytest.raises(TypeError, match="`target` must be a floating-point tensor"):
        ops.hf_mse(batch(), batch().to(torch.int64))
    ll, (h, v, d) = ops.haar_dwt2(batch())
    with pytest.raises(TypeError, match="`D` must be a floating-point tensor"):
        ops.haar_idwt2(ll, (h, v, d.to(torch.complex64)))


def test_wavedec_levels_need_divisible_sizes():
    with pytest.raises(ValueError, match="divisible by 8 for 3 Haar level"):
        ops.haar_wavedec2(batch(h=12, w=16), 3)
    with pytest.raises(ValueError, match="positive int"):
        ops.haar_wavedec2(batch(), 0)


def test_idwt_band_mismatch():
    ll, (h, v, d) = ops.haar_dwt2(batch())
    with pytest.raises(ValueError, match="band `V` must match LL"):
        ops.haar_idwt2(ll, (h, v[:, :2], d))
    with pytest.raises(ValueError, match="three bands"):
        ops.haar_idwt2(ll, (h, v))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stencil="sobel"), "`stencil` must be one of"),
        (dict(direction="forward"), "`direction` must be one of"),
        (dict(reduction="max"), "`reduction` must be one of"),
        (dict(tau=0.0), "`tau` must be a positive finite number"),
        (dict(tau=float("inf")), "`tau` must be a positive finite number"),
        (dict(anchors=5), r"`anchors` \(a count\) must be in \[1, N=4\]"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.hf_pairwise_similarity_kl(batch(), batch(), **kwargs)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.high_frequency([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.pairwise_similarity_kl(batch().numpy(), batch())


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("numpy", "cpu")
    with pytest.raises(RuntimeError, match="'cuda' is not available for cpu tensors"):
        ops.high_frequency(batch(), backend="cuda")
    monkeypatch.setenv("DSFAST_BACKEND", "torch")
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setenv("DSFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("auto", "cpu")


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    assert resolve_backend("auto", "cpu") in ("cpp", "torch")


@pytest.mark.parametrize("op", PAIRWISE_OPS)
def test_pairwise_non_finite_switch(op):
    """check_finite=False skips the check: the NaN propagates to the loss (what a GPU does by default,
    without a device sync); anything but None/True/False is refused before any work."""
    source, adapted = batch(), batch()
    adapted[2, 1, 3, 3] = float("nan")
    assert torch.isnan(op(source, adapted, backend="torch", check_finite=False))
    with pytest.raises(ValueError, match="`check_finite` must be None, True or False"):
        op(source, adapted, backend="torch", check_finite="yes")
