"""bench/training.py: the split of one DomainStudio training step into its parts, and its H100 estimate."""
import pytest
import torch

from bench import run as bench_run
from bench import training
from bench.training import PARTS, DomainStudioStep

LATENT, BATCH = (3, 16, 16), 4  # the tiny UNet at a small size: ~0.1 s per step


@pytest.fixture
def one_thread():
    """One torch thread, so the thread CPU time of the calling thread is the step's whole work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_part_is_timed(one_thread):
    """Each part takes time and the row's sum is its parts'. (Whether the parts add up to an unsplit step is
    reported by the bench, ``parts_sum_s`` beside ``s_per_step``, not asserted: no timed unit tests.)"""
    benches = {v: DomainStudioStep("tiny", v, torch.device("cpu"), latent=LATENT, clock="thread")
               for v in ("official", "dsfast")}
    found = training.time_split(benches, BATCH, warmup=2, steps=7)
    for variant, row in found.items():
        assert all(row[f"{p}_s"] > 0 for p in PARTS), (variant, row)
        assert row["parts_sum_s"] == pytest.approx(sum(row[f"{p}_s"] for p in PARTS))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["official", "dsfast"])
def test_split_step_trains_as_the_unsplit_step(variant):
    """The split step's two backward calls give the parameters the same update as one ``loss.backward()``."""
    plain, split = (DomainStudioStep("tiny", variant, torch.device("cpu"), latent=LATENT) for _ in range(2))
    batch = plain.make_batch(BATCH)
    losses = []
    for bench, parts in ((plain, None), (split, {})):
        torch.manual_seed(1)  # the same t and noise
        losses.append(bench.step(batch, parts))
    assert losses[1] == pytest.approx(float(losses[0]), rel=1e-6)
    for (name, a), b in zip(plain.adapted.named_parameters(), split.adapted.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    moved = [not torch.equal(a, b) for a, b in zip(plain.adapted.parameters(), plain.source.parameters())]
    assert sum(moved) > len(moved) // 2  # the step trained the adapted model


@pytest.mark.slow
def test_h100_estimate_counts_the_parts():
    """The estimate (meta device, the tiny UNet): every part costs something; dsfast's loss takes the static
    report's launches, the official double loop's grow with N²; the UNet's backward ~2x its forward FLOPs."""
    rows = training.estimate_h100((4, 8), model="tiny")
    by = {(r["variant"], r["batch"]): r for r in rows}
    for r in rows:
        assert all(r[f"{p}_s"] > 0 for p in PARTS), r
        assert r["s_per_step"] == pytest.approx(sum(r[f"{p}_s"] for p in PARTS))
        assert 1.8 < r["model_bwd_flops"] / r["model_fwd_flops"] < 2.2
    assert (by["dsfast", 4]["loss_fwd_launches"], by["dsfast", 4]["loss_bwd_launches"]) == (3, 3)
    for part in ("loss_fwd_launches", "loss_bwd_launches"):
        assert by["official", 8][part] > 3 * by["official", 4][part] > 3 * by["dsfast", 4][part]
    assert by["official", 8]["model_fwd_flops"] == pytest.approx(2 * by["official", 4]["model_fwd_flops"])


@pytest.mark.parametrize("argv, message", [
    (["--suite", "gpu", "--split-only"], "--split-only needs the cpu suite"),
    (["--split-only", "--no-split"], "--split-only needs the cpu suite and no --no-split"),
    (["--split-only", "--split-models", "demo,nope"], "unknown --split-models ['nope']"),
])
def test_bad_split_options_are_one_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        bench_run.main(argv + ["--results-dir", str(tmp_path), "--readme", str(tmp_path / "README.md")])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured or written
