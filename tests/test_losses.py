"""The loss modules compose the ops exactly as documented."""
import pytest
import torch

import dsfast
from dsfast import reference


def randn(*shape, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def test_domainstudio_loss_terms_and_defaults():
    source, adapted, real = (randn(6, 3, 8, 8) for _ in range(3))
    adapted.requires_grad_()
    loss = dsfast.DomainStudioLoss()
    assert (loss.lambda_img, loss.lambda_hf, loss.lambda_hfmse) == (4.0, 4.0, 1.0)
    out = loss(source, adapted, real)
    image = reference.pairwise_similarity_kl(source, adapted)
    hf = reference.hf_pairwise_similarity_kl(source, adapted)
    hfmse = reference.hf_mse(adapted, real)
    torch.testing.assert_close(out.image, image)
    torch.testing.assert_close(out.high_frequency, hf)
    torch.testing.assert_close(out.hf_mse, hfmse)
    torch.testing.assert_close(out.total, 4 * image + 4 * hf + hfmse)
    (grad,) = torch.autograd.grad(out.total, adapted)
    (ref_grad,) = torch.autograd.grad(4 * image + 4 * hf + hfmse, adapted)
    torch.testing.assert_close(grad, ref_grad)


def test_domainstudio_zero_weight_skips_term():
    source, adapted = randn(2, 3, 8, 8), randn(2, 3, 8, 8)  # N=2 would fail the pairwise terms
    out = dsfast.DomainStudioLoss(lambda_img=0, lambda_hf=0)(source, adapted, source)
    assert float(out.image) == 0.0 and float(out.high_frequency) == 0.0
    torch.testing.assert_close(out.total.double(), reference.hf_mse(adapted, source))


def test_pairwise_modules_forward_options():
    source, adapted = randn(5, 2, 4, 4), randn(5, 2, 4, 4)
    module = dsfast.HighFrequencySimilarityLoss(stencil="pywt", tau=0.3, direction="adapted||source", reduction="batchmean")
    expected = reference.hf_pairwise_similarity_kl(
        source, adapted, stencil="pywt", tau=0.3, direction="adapted||source", reduction="batchmean"
    )
    torch.testing.assert_close(module(source, adapted), expected)
    assert "stencil='pywt'" in repr(module) and "tau=0.3" in repr(module)
    torch.testing.assert_close(
        dsfast.PairwiseSimilarityLoss(reduction="sum")(source, adapted),
        reference.pairwise_similarity_kl(source, adapted, reduction="sum"),
    )


def test_random_anchors_use_k_rows():
    source, adapted = randn(8, 12), randn(8, 12)
    torch.manual_seed(3)
    value = dsfast.PairwiseSimilarityLoss(num_anchors=3, reduction="sum")(source, adapted)
    torch.manual_seed(3)
    rows = torch.randperm(8)[:3]
    torch.testing.assert_close(value, reference.pairwise_similarity_kl(source, adapted, reduction="sum", anchors=rows))


@pytest.mark.parametrize("detach", [True, False])
def test_detach_source(detach):
    source, adapted = randn(4, 6).requires_grad_(), randn(4, 6).requires_grad_()
    dsfast.PairwiseSimilarityLoss(detach_source=detach)(source, adapted).backward()
    assert adapted.grad is not None and adapted.grad.abs().sum() > 0
    assert (source.grad is None) == detach


def test_prior_preservation():
    a, b, c, d = (randn(3, 4, 8, 8) for _ in range(4))
    total, instance, prior = dsfast.PriorPreservationLoss(prior_weight=0.5)(a, b, c, d)
    # written out, independent of torch.nn.functional.mse_loss
    want_instance, want_prior = ((a - b) ** 2).sum() / a.numel(), ((c - d) ** 2).sum() / c.numel()
    torch.testing.assert_close(instance.double(), want_instance, rtol=1e-6, atol=0)
    torch.testing.assert_close(prior.double(), want_prior, rtol=1e-6, atol=0)
    torch.testing.assert_close(total.double(), want_instance + 0.5 * want_prior, rtol=1e-6, atol=0)
