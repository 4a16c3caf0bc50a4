"""torch.library.opcheck on every custom op: schema, fake (meta) impl, autograd registration, AOT dispatch."""
import pytest
import torch

import dsfast.ops  # noqa: F401  (registers the fake impls and autograd formulas)
from tests.conftest import BACKEND_CASES

WEIGHTS = [-0.5, -0.5, -0.5, 1.5]


def samples(device, dtype):
    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    gram_grad = torch.randn(5, 5, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return {
        "haar_dwt2": (rand(5, 2, 4, 6, grad=True),),
        "haar_idwt2": (rand(4, 5, 2, 2, 3, grad=True),),
        "high_frequency": (rand(5, 2, 4, 6, grad=True), WEIGHTS),
        "high_frequency_backward": (rand(5, 2, 2, 3), WEIGHTS),
        "gram": (rand(5, 24, grad=True),),
        "gram_backward": (gram_grad, rand(5, 24)),
        "hf_gram": (rand(5, 2, 4, 6, grad=True), WEIGHTS),
        "hf_gram_backward": (gram_grad, rand(5, 2, 4, 6), WEIGHTS),
        "domainstudio_grams": (rand(5, 2, 4, 6, grad=True), rand(5, 2, 4, 6), WEIGHTS),
        "domainstudio_grams_backward": (gram_grad, gram_grad.T.contiguous(), gram_grad[0, 0], rand(5, 2, 4, 6),
                                        rand(5, 2, 4, 6), WEIGHTS),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend, dtype):
    namespace = torch.ops.dsfast_triton if backend == "triton" else torch.ops.dsfast
    cases = list(samples(device, dtype).items())
    # no target: the hf-MSE sum is |hf(x)|^2
    cases.append(("domainstudio_grams", (cases[-2][1][0], None, WEIGHTS)))
    cases.append(("domainstudio_grams_backward", cases[-2][1][:4] + (None, WEIGHTS)))
    for name, args in cases:
        torch.library.opcheck(getattr(namespace, name).default, args)
