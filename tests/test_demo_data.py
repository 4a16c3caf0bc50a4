"""The demo's procedural domains: deterministic from a seed, in range, and actually different styles."""
import numpy as np
import pytest

from dsfast import demo_data
from dsfast.eval import hf_energy


def test_same_seed_same_images():
    a = demo_data.source_images(6, seed=3)
    b = demo_data.source_images(6, seed=3)
    assert np.array_equal(a, b)
    assert np.array_equal(demo_data.target_images(10, seed=7), demo_data.target_images(10, seed=7))


def test_different_seeds_differ_and_images_differ():
    a = demo_data.target_images(10, seed=1)
    b = demo_data.target_images(10, seed=2)
    assert not np.array_equal(a, b)
    flat = a.reshape(10, -1)
    assert len({row.tobytes() for row in flat}) == 10  # no duplicate training images


def test_prefix_and_start_are_consistent():
    full = demo_data.source_images(8, seed=5)
    assert np.array_equal(demo_data.source_images(3, seed=5), full[:3])
    assert np.array_equal(demo_data.source_images(4, seed=5, start=4), full[4:])


def test_does_not_touch_global_rng():
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    demo_data.target_images(3, seed=0)
    assert np.random.random() == before


def test_shape_dtype_range():
    for imgs in (demo_data.source_images(4, size=16), demo_data.target_images(4, size=32)):
        assert imgs.dtype == np.float32 and imgs.shape[-1] == 3 and imgs.shape[1] == imgs.shape[2]
        assert imgs.min() >= 0 and imgs.max() <= 1
    t = demo_data.to_tensor(demo_data.source_images(2))
    assert tuple(t.shape) == (2, 3, 32, 32) and t.min() >= -1 and t.max() <= 1


def test_target_has_more_high_frequency_detail_than_source():
    src = demo_data.to_tensor(demo_data.source_images(40, seed=0)) / 2 + 0.5
    tgt = demo_data.to_tensor(demo_data.target_images(10, seed=1234)) / 2 + 0.5
    assert hf_energy(tgt).mean() > 2 * hf_energy(src).mean()


def test_write_target_dir_roundtrip(tmp_path):
    from dsfast.eval import load_folder

    paths = demo_data.write_target_dir(tmp_path / "t", n=10, seed=1234)
    assert len(paths) == 10 and all(p.suffix == ".png" for p in paths)
    loaded, files = load_folder(tmp_path / "t")
    expected = demo_data.to_uint8(demo_data.target_images(10, seed=1234)) / 255.0
    assert np.allclose(loaded.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        demo_data.make_images("photo", 1)
    with pytest.raises(ValueError, match="even"):
        demo_data.source_images(1, size=31)
    with pytest.raises(ValueError, match="n must be"):
        demo_data.source_images(-1)
