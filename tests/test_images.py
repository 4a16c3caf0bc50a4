"""Image files of every bit depth PIL opens load right, or are refused by name (dsfast.images, the one loader
of training data, class images and evaluation folders)."""
import numpy as np
import pytest
import torch
from PIL import Image

from dsfast.images import ImageFolderError, load_folder, read_image


def _picture(gen, size=16, channels=1) -> np.ndarray:
    """An 8-bit picture that uses the whole range (so a clip at 255 or a wrong scale shows)."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).numpy().astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("square", [None, 8])  # as stored, and resized + cropped as training does
def test_16_bit_png_loads_like_its_8_bit_picture(tmp_path, gen, channels, square):
    pic = _picture(gen)
    Image.fromarray(pic).save(tmp_path / "p8.png")
    Image.fromarray(pic.astype(np.uint16) * 257).save(tmp_path / "p16.png")  # the same picture in 16 bits
    assert Image.open(tmp_path / "p16.png").mode.startswith("I;16")
    want = read_image(tmp_path / "p8.png", channels=channels, square=square)
    got = read_image(tmp_path / "p16.png", channels=channels, square=square)
    assert got.shape == want.shape and float(got.std()) > 0.1  # not a solid image
    torch.testing.assert_close(got, want, rtol=0, atol=1.5 / 255)  # resampling may round differently by 1 level


def test_16_bit_folder_trains_as_its_picture(tmp_path, gen):
    pic = _picture(gen)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(pic).save(tmp_path / "a" / "x.png")
    Image.fromarray(pic.astype(np.uint16) * 257).save(tmp_path / "b" / "x.png")
    want, _ = load_folder(tmp_path / "a", channels=3, square=16, range01=False)
    got, _ = load_folder(tmp_path / "b", channels=3, square=16, range01=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("array, mode", [
    (np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), "F"),  # float TIFF
    (np.arange(256, dtype=np.int32).reshape(16, 16) * 1000, "I"),  # 32-bit integer TIFF
])
def test_images_without_a_known_range_are_refused_by_name(tmp_path, array, mode):
    Image.fromarray(array).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == mode
    with pytest.raises(ImageFolderError, match=rf"x\.tif.*PIL mode '{mode}'"):
        load_folder(tmp_path, channels=3)
