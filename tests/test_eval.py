"""dsfast.eval: metrics with known answers on small synthetic image sets, and bad input."""
import json

import numpy as np
import pytest
import torch

from dsfast.eval import (
    HaarDistance,
    ImageFolderError,
    MetricUnavailable,
    evaluate,
    get_distance,
    intra_cluster_diversity,
    load_folder,
    memorisation_rate,
    memorisation_threshold,
)
from dsfast.eval.cli import main as eval_main


def _random_images(n, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _write(images, directory):
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        arr = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(directory / f"{k:03d}.png")


# ----------------------------------------------------------------------------- the distance

def test_haar_distance_is_a_metric():
    d = HaarDistance()
    x = _random_images(5, 0)
    m = d.pairwise(x)
    assert torch.all(m.diagonal() == 0)
    assert torch.allclose(m, m.T, atol=1e-6)
    assert torch.all(m[~torch.eye(5, dtype=torch.bool)] > 0)
    # triangle inequality
    assert torch.all(m[:, None, :] <= m[:, :, None] + m[None, :, :] + 1e-6)


def test_haar_distance_known_values():
    d = HaarDistance(levels=3)
    zeros, ones = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    # constant images: only the approximation scale differs, by 1 per pixel: (0+0+0+1)/4
    assert d.pairwise(zeros, ones).item() == pytest.approx(0.25, abs=1e-6)
    # a checkerboard of 0/1 vs 0.5 grey: only the finest diagonal band differs
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    grey = torch.full((1, 3, 8, 8), 0.5)
    # level-1 D band = +-1 (orthonormal), /2 -> +-0.5 on 1/3 of the level-1 coefficients: RMS = 0.5/sqrt(3)
    assert d.pairwise(checker, grey).item() == pytest.approx(0.5 / 3**0.5 / 4, abs=1e-6)


def test_haar_distance_pads_odd_sizes():
    d = HaarDistance(levels=2)
    x = _random_images(2, 1, size=13)
    m = d.pairwise(x)
    assert m.shape == (2, 2) and m[0, 1] > 0


# ----------------------------------------------------------------------------- known answers

def test_identical_samples_have_zero_diversity():
    train = _random_images(3, 0)
    samples = train[1:2].repeat(6, 1, 1, 1)  # six copies of training image 1
    r = intra_cluster_diversity(samples, train)
    assert r["mean"] == 0 and r["std"] == 0
    assert r["clusters_used"] == 1 and r["clusters_empty"] == 2 and r["clusters_singleton"] == 0
    assert r["cluster_sizes"] == [0, 6, 0]


def test_diversity_of_two_known_clusters():
    train = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    samples = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.1, 0.2, 0.9, 0.8)])
    r = intra_cluster_diversity(samples, train, HaarDistance())
    # constants differ only in the approximation scale: d = |a - b| / 4
    c0 = np.mean([0.1, 0.2, 0.1]) / 4
    c1 = 0.1 / 4
    assert r["cluster_sizes"] == [3, 2]
    assert r["cluster_scores"] == pytest.approx([c0, c1], abs=1e-6)
    assert r["mean"] == pytest.approx((c0 + c1) / 2, abs=1e-6)
    assert r["std"] == pytest.approx(abs(c0 - c1) / 2, abs=1e-6)


def test_singletons_skipped_and_cap_per_cluster():
    train = _random_images(4, 3)
    samples = torch.cat([train[:1].repeat(60, 1, 1, 1), train[2:3]])
    samples[:55] += 0.01 * torch.arange(55).view(-1, 1, 1, 1) / 55  # distinct members, same cluster
    r = intra_cluster_diversity(samples, train, max_per_cluster=50)
    assert r["clusters_used"] == 1 and r["clusters_singleton"] == 1 and r["clusters_empty"] == 2
    first50 = intra_cluster_diversity(samples[:50], train)
    assert r["mean"] == pytest.approx(first50["mean"])


def test_no_cluster_with_two_members_gives_nan():
    train = _random_images(3, 4)
    r = intra_cluster_diversity(train.clone(), train)
    assert np.isnan(r["mean"]) and r["clusters_singleton"] == 3


def test_sample_equal_to_training_image_is_memorised():
    train = _random_images(4, 5)
    fresh = 0.5 + 2 * (_random_images(3, 6) - 0.5)  # noisier than the training images: far from all of them
    samples = torch.cat([train[2:3], fresh])
    r = memorisation_rate(samples, train)
    assert r["memorised"] == [0]
    assert r["rate"] == pytest.approx(0.25)
    d = HaarDistance().pairwise(train)
    assert r["threshold"] == pytest.approx(d[~torch.eye(4, dtype=torch.bool)].min().item())


def test_memorisation_threshold_ignores_duplicate_training_images():
    train = _random_images(3, 7)
    dup = torch.cat([train, train[:1]])
    assert memorisation_threshold(dup) == pytest.approx(memorisation_threshold(train))
    with pytest.raises(ValueError, match="distinct"):
        memorisation_threshold(train[:1].repeat(3, 1, 1, 1))
    with pytest.raises(ValueError, match="two"):
        memorisation_threshold(train[:1])


def test_evaluate_fidelity_figures():
    train = _random_images(4, 8)
    r = evaluate(train.clone(), train)
    assert r["nn_dist"] == 0 and r["hf_ratio"] == pytest.approx(1.0)
    assert r["memorisation"]["rate"] == 1.0
    smooth = torch.full((4, 3, 16, 16), 0.5)
    assert evaluate(smooth, train)["hf_ratio"] == 0
    assert "fallback" in r["metric"] and "fallback" in r["metric_label"]
    with pytest.raises(ValueError, match="size"):
        evaluate(_random_images(2, 0, size=8), train)


# ----------------------------------------------------------------------------- folders and the CLI

def test_cli_on_folders(tmp_path, capsys):
    train = _random_images(4, 9)
    samples = torch.cat([train[:1].repeat(3, 1, 1, 1), _random_images(5, 10)])
    _write(train, tmp_path / "train")
    _write(samples, tmp_path / "samples")
    assert eval_main(["--samples", str(tmp_path / "samples"), "--train", str(tmp_path / "train"),
                      "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "fallback" in out and "intra-cluster diversity" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["metric"] == "fallback-haar"
    assert r["memorisation"]["count"] >= 3
    assert r["intra_cluster"]["cluster_sizes"][0] >= 3


def test_cli_resizes_mixed_sizes(tmp_path, capsys):
    _write(_random_images(3, 11, size=16), tmp_path / "train")
    _write(_random_images(4, 12, size=32), tmp_path / "samples")
    assert eval_main(["--samples", str(tmp_path / "samples"), "--train", str(tmp_path / "train")]) == 0
    assert "resizing" in capsys.readouterr().err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ImageFolderError, match="no images"):
        load_folder(tmp_path / "empty")
    with pytest.raises(ImageFolderError, match="does not exist"):
        load_folder(tmp_path / "missing")
    _write(_random_images(2, 0), tmp_path / "train")
    assert eval_main(["--samples", str(tmp_path / "empty"), "--train", str(tmp_path / "train")]) == 2
    err = capsys.readouterr().err
    assert "--samples" in err and "no images" in err


def test_corrupt_file_is_named(tmp_path, capsys):
    _write(_random_images(3, 0), tmp_path / "s")
    (tmp_path / "s" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageFolderError, match="broken.png"):
        load_folder(tmp_path / "s")
    _write(_random_images(2, 1), tmp_path / "train")
    assert eval_main(["--samples", str(tmp_path / "s"), "--train", str(tmp_path / "train")]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_lpips_and_fid_unavailable_messages(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_pkgs(name, *a, **k):
        if name.split(".")[0] in ("lpips", "pytorch_fid", "torch_fidelity"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pkgs)
    with pytest.raises(MetricUnavailable, match="lpips"):
        get_distance("lpips")
    from dsfast.eval.fid import compute_fid

    with pytest.raises(MetricUnavailable, match="pytorch-fid"):
        compute_fid(_random_images(2, 0), _random_images(2, 1))
    with pytest.raises(ValueError, match="fallback"):
        get_distance("ssim")


def test_eval_error_class_is_the_shared_one():
    import dsfast.images

    assert ImageFolderError is dsfast.images.ImageFolderError


# ----------------------------------------------------------------------------- LPIPS protocol

class _RecordingNet(torch.nn.Module):
    """Stands in for lpips.LPIPS: records its inputs, returns the mean absolute difference."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, a, b):
        both = torch.cat([a, b])
        self.seen.append((a.shape, float(both.min()), float(both.max())))
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_protocol_preprocessing_with_a_stand_in():
    from dsfast.eval import LpipsDistance

    net = _RecordingNet()
    d = LpipsDistance(model=net)
    assert d.net == "vgg" and d.size == 256 and "VGG" in d.label and "256x256" in d.label
    x = torch.zeros(2, 1, 16, 16)
    x[1] = 1.0  # black and white, grey images
    out = d.pairwise(x)
    shape, lo, hi = net.seen[0]
    assert tuple(shape) == (2, 3, 256, 256) and lo == -1.0 and hi == 1.0  # resized, RGB, in [-1, 1]
    assert torch.allclose(out, torch.tensor([[0.0, 2.0], [2.0, 0.0]]))
    alex = LpipsDistance(net="alex", size=64, model=_RecordingNet())
    assert alex.name == "lpips-alex" and "AlexNet" in alex.label and "64x64" in alex.label
    with pytest.raises(ValueError, match="vgg"):
        LpipsDistance(net="squeeze", model=net)


def _fake_lpips(monkeypatch, calls):
    import sys
    import types

    fake = types.ModuleType("lpips")

    def LPIPS(**kw):
        calls.append(kw)
        return _RecordingNet()

    fake.LPIPS = LPIPS
    monkeypatch.setitem(sys.modules, "lpips", fake)


def test_lpips_defaults_to_vgg_and_needs_weights_on_disk(monkeypatch, tmp_path):
    calls = []
    _fake_lpips(monkeypatch, calls)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("DSFAST_LPIPS_VGG", raising=False)
    with pytest.raises(MetricUnavailable, match="vgg16-397923af.pth"):
        get_distance("lpips")
    assert calls == []  # nothing built (and nothing downloaded) without the weights
    weights = tmp_path / "vgg16-397923af.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setenv("DSFAST_LPIPS_VGG", str(weights))
    d = get_distance("lpips")
    assert calls[-1]["net"] == "vgg" and calls[-1]["version"] == "0.1" and d.name == "lpips-vgg"


def test_cli_lpips_says_network_and_resize(monkeypatch, tmp_path, capsys):
    calls = []
    _fake_lpips(monkeypatch, calls)
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setenv("DSFAST_LPIPS_ALEXNET", str(weights))
    _write(_random_images(4, 0), tmp_path / "train")
    _write(_random_images(6, 1), tmp_path / "samples")
    assert eval_main(["--samples", str(tmp_path / "samples"), "--train", str(tmp_path / "train"),
                      "--metric", "lpips", "--lpips-net", "alex", "--lpips-size", "32"]) == 0
    out = capsys.readouterr().out
    assert calls[-1]["net"] == "alex" and "AlexNet" in out and "32x32" in out


# ----------------------------------------------------------------------------- calibrated few-shot metrics

def test_copy_rate_calibrated_on_fresh_images():
    from dsfast.eval.fewshot import copy_rate, copy_threshold

    train = _random_images(5, 0)
    fresh = _random_images(100, 1)
    tau = copy_threshold(fresh, train)
    d_fresh = HaarDistance().pairwise(fresh, train).min(dim=1).values
    assert abs(float((d_fresh < tau).float().mean()) - 0.05) <= 0.011  # the 5 % quantile
    copies = train[torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])]
    assert copy_rate(copies, train, tau)["rate"] == 1.0
    near = (train + 0.001 * torch.randn(train.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert copy_rate(near, train, tau)["rate"] == 1.0
    assert copy_rate(_random_images(50, 3), train, tau)["rate"] < 0.3
    with pytest.raises(ValueError, match="at least 20"):
        copy_threshold(fresh[:5], train)


def test_label_diversity_and_correspondence():
    from dsfast.eval.fewshot import correspondence, label_diversity

    uniform = label_diversity(torch.arange(40) % 4, num_classes=10)
    assert uniform["coverage"] == 4 and abs(uniform["entropy_bits"] - 2.0) < 1e-12
    one = label_diversity(torch.full((7,), 3), num_classes=10)
    assert one["coverage"] == 1 and one["entropy_bits"] == 0.0 and one["histogram"][3] == 7
    assert correspondence(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="labels must be in"):
        label_diversity(torch.tensor([10]), num_classes=10)
    with pytest.raises(ValueError, match="one non-zero length"):
        correspondence(torch.tensor([1]), torch.tensor([1, 2]))


def test_mmd_separates_distributions():
    from dsfast.eval.fewshot import mmd2

    a, b = _random_images(60, 0), _random_images(60, 1)
    shifted = (_random_images(60, 2) * 0.5 + 0.5)
    same = mmd2(a, b)["mmd2"]
    assert abs(same) < 0.02
    assert mmd2(shifted, b)["mmd2"] > 10 * max(abs(same), 1e-3)
