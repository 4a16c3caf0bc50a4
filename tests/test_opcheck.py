"""torch.library.opcheck on every custom op: schema, fake (meta) impl, autograd registration, AOT dispatch."""
import pytest
import torch

import dsfast.ops  # noqa: F401  (registers the fake impls and autograd formulas)
from tests.conftest import BACKEND_CASES

pytestmark = pytest.mark.slow  # make test-fast leaves it to make test

WEIGHTS = [-0.5, -0.5, -0.5, 1.5]


def samples(device, dtype, namespace):
    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    gram_grad = torch.randn(5, 5, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    cases = {
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
    if namespace == "dsfast_triton":
        x = torch.randn(5, 24, device=device, dtype=torch.float64)
        g_source = (x @ x.T).to(gram_grad.dtype)
        g_adapted = ((x + 0.3 * torch.randn_like(x)) @ (x + 0.3 * torch.randn_like(x)).T).to(gram_grad.dtype)
        weights = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0], device=device, dtype=torch.float64)
        cases["similarity_kl"] = (g_source, g_adapted.requires_grad_(), weights, 0.5, False, 0.05)
        cases["similarity_kl_backward"] = (torch.tensor(1.3, device=device, dtype=gram_grad.dtype), g_source,
                                           g_adapted.detach(), None, 1.0, True, 0.1)
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend, dtype):
    name_space = "dsfast_triton" if backend == "triton" else "dsfast"
    namespace = getattr(torch.ops, name_space)
    # no target: the hf-MSE sum is |hf(x)|^2
    cases = samples(device, dtype, name_space)
    with_target, backward = cases["domainstudio_grams"], cases["domainstudio_grams_backward"]
    extra = [("domainstudio_grams", (with_target[0], None, WEIGHTS)),
             ("domainstudio_grams_backward", backward[:4] + (None, WEIGHTS))]
    # per-sample hf-MSE weights (with a zero; float32 whatever the inputs' dtype)
    sse_weights = torch.tensor([1.0, 0.0, 2.5, 0.5, 1.0], device=device)
    extra += [("domainstudio_grams", with_target + (sse_weights,)),
              ("domainstudio_grams_backward", backward + (sse_weights,))]
    if name_space == "dsfast_triton":
        adapted, real = torch.randn_like(with_target[1]), with_target[1]
        extra += [("domainstudio_pair_grams", (with_target[0].detach(), adapted, real, WEIGHTS)),
                  ("domainstudio_pair_grams", (with_target[0].detach(), adapted, real, WEIGHTS, sse_weights))]
    for name, args in list(cases.items()) + extra:
        torch.library.opcheck(getattr(namespace, name).default, args)
