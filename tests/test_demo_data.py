"""The demo's domains: scikit-learn digits as the source, a deterministic bold-on-grey style as the target."""
import numpy as np
import pytest
import torch

from dsfast import demo_data


def test_source_digits_are_the_bundled_digits_resized():
    from sklearn.datasets import load_digits

    x, y = demo_data.source_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == load_digits().target.tolist()
    assert x.min() >= -1 and x.max() <= 1
    # bilinear 2x upsampling keeps the mean of every 2x2 block close to the 8x8 pixel it came from
    pix = torch.from_numpy(load_digits().images[:50]).float() / 16
    blocks = ((x[:50, 0] + 1) / 2).reshape(50, 8, 2, 8, 2).mean(dim=(2, 4))
    assert (blocks - pix).abs().mean() < 0.08


def test_target_images_deterministic_prefix_and_fresh():
    a, la = demo_data.target_images(10, seed=3)
    b, lb = demo_data.target_images(10, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    full, lfull = demo_data.target_images(14, seed=3)
    tail, ltail = demo_data.target_images(4, seed=3, start=10)
    assert torch.equal(full[:10], a) and torch.equal(full[10:], tail) and torch.equal(lfull[10:], ltail)
    other, _ = demo_data.target_images(10, seed=4)
    assert not torch.equal(a, other)
    assert len({im.numpy().tobytes() for im in a}) == 10  # no duplicate training images


def test_target_style_is_a_global_map_without_grain():
    x01 = torch.zeros(1, 1, 16, 16)
    x01[0, 0, 4:12, 7] = 1.0  # a vertical stroke, one pixel wide
    y = demo_data.target_style(x01)
    assert torch.allclose(y[0, 0, 0, 0], torch.tensor(demo_data.PAPER))  # paper where there is no stroke
    assert torch.allclose(y[0, 0, 4:12, 6:8], torch.tensor(demo_data.STROKE))  # the stroke, one pixel wider
    assert torch.equal(demo_data.target_style(x01), y)  # no randomness
    # the paper of a render is exactly flat (per-pixel grain would leave no pixel at exactly PAPER)
    imgs, _ = demo_data.target_images(20, seed=0)
    flat = ((imgs + 1) / 2 - demo_data.PAPER).abs().flatten(1) < 1e-6
    assert (flat.float().mean(dim=1) > 0.05).all()


def test_target_differs_from_source_in_style_not_content():
    src, y = demo_data.source_digits()
    tgt, ty = demo_data.target_images(100, seed=0)
    assert tgt.mean() - src.mean() > 0.3  # grey paper vs black
    # content: undo the target style and the nearest (thickened) source digit has the render's label
    unstyled = ((tgt + 1) / 2 - demo_data.PAPER) / (demo_data.STROKE - demo_data.PAPER)
    bold = torch.nn.functional.max_pool2d(torch.nn.functional.pad((src + 1) / 2, (0, 1, 0, 1)), 2, stride=1)
    nearest = torch.cdist(unstyled.flatten(1), bold.flatten(1)).argmin(dim=1)
    assert (y[nearest] == ty).float().mean() > 0.8


def test_write_target_dir_roundtrip(tmp_path):
    from dsfast.images import load_folder

    paths = demo_data.write_target_dir(tmp_path / "t", n=10, seed=0)
    assert len(paths) == 10 and all(p.suffix == ".png" for p in paths)
    back, _ = load_folder(tmp_path / "t", channels=1)
    expected = torch.round((demo_data.target_images(10, seed=0)[0] + 1) / 2 * 255) / 255
    assert torch.allclose(back, expected, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n and start"):
        demo_data.target_images(-1)
    with pytest.raises(ValueError, match="n and start"):
        demo_data.target_images(2, start=-3)


def test_does_not_touch_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    before_t, before_n = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    demo_data.target_images(3, seed=0)
    assert torch.equal(torch.rand(1), before_t) and np.random.rand() == before_n
