"""bench/roof.py: the traffic and FMA models behind the roof shares `make bench` prints."""
import pytest

from bench import peers, roof

N, D, ELEM = 16, 3 * 256 * 256, 4


@pytest.mark.parametrize("op", sorted(peers.OPS))
def test_every_op_has_a_model_whose_bytes_are_the_ideal_bytes(op):
    spec = peers.OPS[op]
    for pass_, multiple in (("fwd", spec.fwd_bytes), ("bwd", spec.bwd_bytes),
                            ("fwd+bwd", spec.fwd_bytes + spec.bwd_bytes)):
        nbytes, fmas = roof.work(op, pass_, N, D, ELEM)
        assert nbytes == multiple * N * D * ELEM and fmas >= 0


def test_fused_loss_counts():
    """The Grams dominate: upper triangles forward (image + hf, source + adapted), M @ X backward."""
    _, fwd = roof.work("domainstudio_loss", "fwd", N, D, ELEM)
    _, bwd = roof.work("domainstudio_loss", "bwd", N, D, ELEM)
    grams = 2 * N * (N + 1) / 2 * (D + D / 4)
    assert grams < fwd < 1.2 * grams
    assert N * N * 1.25 * D < bwd < 1.2 * N * N * 1.25 * D


def test_roof_is_the_larger_bound():
    nbytes, fmas = roof.work("domainstudio_loss", "fwd+bwd", N, D, ELEM)
    traffic = roof.roof("domainstudio_loss", "fwd+bwd", N, D, ELEM, copy_gbps=10.0, fma_gfmas=1e6)
    assert traffic["roof_bound"] == "traffic" and traffic["roof_s"] == pytest.approx(nbytes / 10e9)
    fma = roof.roof("domainstudio_loss", "fwd+bwd", N, D, ELEM, copy_gbps=1e6, fma_gfmas=1.0)
    assert fma["roof_bound"] == "fma" and fma["roof_s"] == pytest.approx(fmas / 1e9)
    assert roof.roof("no_such_op", "fwd", N, D, ELEM, 10.0, 10.0) is None
