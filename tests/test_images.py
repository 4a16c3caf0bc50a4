"""Image files of every bit depth PIL opens load right, or are refused by name (dsfast.images, the one loader
of training data, class images and evaluation folders)."""
import numpy as np
import pytest
import torch
from PIL import Image

from dsfast.images import ImageFolderError, load_folder, read_image
from dsfast.train.data import image_geometry, load_images


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


@pytest.mark.parametrize("center_crop", [True, False])
def test_image_geometry_is_where_the_training_pixels_come_from(tmp_path, gen, center_crop):
    """image_geometry's original size and crop of each image, as given and mirrored (SDXL's size/crop ids), is
    the window of the resized picture that load_images returns, and of its mirror image."""
    sizes = [(20, 36), (37, 16), (16, 16)]  # (H, W): wide, tall, already square
    for k, (h, w) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.int32).numpy().astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
    geometry = image_geometry(tmp_path, 16, center_crop=center_crop)
    images = load_images(tmp_path, 16, center_crop=center_crop)
    assert geometry.shape == (2, 3, 4) and geometry.dtype == torch.long
    assert geometry[0, 0].tolist() == ([20, 36, 0, 6] if center_crop else [20, 36, 0, 0])
    assert geometry[1, 0].tolist() == ([20, 36, 0, 7] if center_crop else [20, 36, 0, 13])  # 29 px wide resized
    for k, (h, w) in enumerate(sizes):
        assert geometry[:, k, :2].tolist() == [[h, w], [h, w]]
        s = 16 / min(h, w)
        nh, nw = round(h * s), round(w * s)
        with Image.open(tmp_path / f"{k}.png") as im:
            full = torch.from_numpy(np.asarray(im.resize((nw, nh), Image.BICUBIC), dtype=np.float32).copy())
        full = full.permute(2, 0, 1) / 127.5 - 1
        for flip, picture in ((0, full), (1, full.flip(-1))):
            _, _, top, left = geometry[flip, k].tolist()
            window = picture[:, top:top + 16, left:left + 16]
            torch.testing.assert_close(window, images[k].flip(-1) if flip else images[k], rtol=0, atol=1e-6)
