"""``data.random_crop``: a fresh random window of each resized image for every sample, its latents encoded then,
its size/crop conditioning (SDXL) the window's; the windows are draws of ``(seed, step, sample)``, so they do not
depend on how a step is split into micro-batches."""
import pytest
import torch

from dsfast.images import list_images, read_image
from dsfast.train.config import load_config, resolve
from dsfast.train.data import Draws, LatentBatches, RandomCrops, image_geometry
from dsfast.train.testing import make_sdxl_pipeline, tiny_config, write_images

SIZES = [(16, 24), (21, 16), (16, 19), (30, 16), (16, 16)]  # (H, W): wide, tall, square


def _encode(x):
    """A stand-in for the VAE: a function of every pixel, so that latents show which window was encoded."""
    return torch.nn.functional.avg_pool2d(x, 2) * 3 + 1


@pytest.fixture
def folder(tmp_path):
    return write_images(tmp_path / "imgs", 0, sizes=SIZES)


def test_each_sample_is_a_random_window_of_its_resized_image(folder):
    draws = Draws(seed=3, batch_size=6, num_timesteps=1000, random_flip=True)
    crops = RandomCrops(folder, 16, _encode, torch.device("cpu"))
    batches = LatentBatches(crops, draws, torch.device("cpu"))
    resized = [read_image(f, shorter=16, range01=False) for f in list_images(folder)]
    assert batches.latent_shape == (3, 8, 8)
    seen = {k: set() for k in range(len(SIZES))}
    for step in range(4):
        whole = batches(step, list(range(6)))
        split = [batches(step, [0, 1, 2]), batches(step, [3, 4, 5])]
        for key in ("x0", "z", "geometry", "i", "flip", "t", "noise"):
            assert torch.equal(whole[key], torch.cat([s[key] for s in split])), key  # micro-batches: same draws
        for r, (i, flip) in enumerate(zip(whole["i"].tolist(), whole["flip"].tolist())):
            image = resized[i]
            h, w, top, left = whole["geometry"][r].tolist()
            assert (h, w) == SIZES[i]
            if flip:  # the window of the mirrored image: its left edge counted from the mirror's left
                image = image.flip(-1)
            torch.testing.assert_close(whole["x0"][r], image[:, top:top + 16, left:left + 16], rtol=0, atol=0)
            seen[i].add((top, left, flip))
        torch.testing.assert_close(whole["z"], _encode(whole["x0"]))
    assert len(seen[0]) > 2 and len(seen[3]) > 2  # the windows move
    assert {w[:2] for w in seen[4]} == {(0, 0)}  # a square image has one window


def test_square_images_keep_cached_latents(folder, tmp_path):
    """Random crops change nothing on square images: their latents stay cached (no encode per step)."""
    from dsfast.train.data import random_crops_matter

    assert random_crops_matter(folder, 16, "data.instance_dir")
    assert not random_crops_matter(write_images(tmp_path / "square", 3, size=20), 16, "data.instance_dir")


def test_sdxl_is_conditioned_on_the_drawn_window(tmp_path, folder):
    """On SDXL the size/crop ids of a randomly cropped sample are its image's size and the drawn window's corner
    (the method path: the family's ids from the micro-batch's geometry)."""
    from dsfast.train import methods
    from dsfast.train.config import family_options
    from dsfast.train.models import describe, load, lora_config

    model = make_sdxl_pipeline(tmp_path / "sdxl")
    info = describe(str(model))
    cfg = resolve(load_config(tiny_config(tmp_path, model, folder, method="finetune", data__random_crop=True,
                                          data__instance_prompt="a sks dog")), info.family,
                  down_factor=info.down_factor)
    bundle = load(info, str(model), dtype=torch.float32, lora=lora_config(info, 0, None), frozen_source=False,
                  device=torch.device("cpu"), options=family_options(cfg))
    draws = Draws(seed=0, batch_size=4, num_timesteps=1000, random_flip=True)
    method = methods.get("finetune", info.family)(
        bundle=bundle, images=torch.zeros(len(SIZES), 3, 16, 16), draws=draws, loss=cfg.loss, data=cfg.data,
        sample=cfg.sample, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(method.batches.instances, RandomCrops)
    pipe = bundle.family._encoder()
    centred = image_geometry(folder, 16)
    moved = False
    for step in range(3):
        mb = method.micro_batch(step, [0, 1, 2, 3])
        ids = method.instance_cond(mb)["time_ids"]
        for r, row in enumerate(mb["geometry"].tolist()):
            want = pipe._get_add_time_ids(tuple(row[:2]), tuple(row[2:]), (16, 16), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            torch.testing.assert_close(ids[r], want[0])
            moved |= row != centred[mb["flip"][r], mb["i"][r]].tolist()
    assert moved  # some window is not the centre crop
