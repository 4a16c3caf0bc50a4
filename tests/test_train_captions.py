"""Per-image captions (``data.captions``: ``<image>.txt`` beside each image, or Hugging Face imagefolder's
``metadata.jsonl``): reading them in the images' order, every bad input as one error before a model is loaded,
each sample of a micro-batch conditioned on its own image's caption (mirrored copies too), and a short run."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dsfast.images import load_folder
from dsfast.train import cli as train_cli
from dsfast.train import dreambooth_cli, engine, methods
from dsfast.train.config import DataConfig, family_options, load_config, resolve
from dsfast.train.data import Draws, count_images, image_geometry, instance_prompts, load_images, read_captions
from dsfast.train.errors import DataError
from dsfast.train.models import describe, load, lora_config
from dsfast.train.testing import make_flux_pipeline, make_sd_pipeline, make_sdxl_pipeline, tiny_config, write_images

PROMPT = "a sks dog"
# the captions of the tiny run's images: img_002 has none (it takes the instance prompt)
CAPTIONS = {"img_000.png": "a red dog", "img_001.png": "a dog on grass", "img_003.png": "a sks dog in snow"}


def _metadata(folder, rows, name="metadata.jsonl"):
    (folder / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("captions") / "model")


@pytest.fixture
def imgs(tmp_path):
    return write_images(tmp_path / "imgs", 4, size=16)


@pytest.fixture
def environ():
    """An in-process train() sets RANK, WORLD_SIZE, MASTER_PORT ...: later tests must not inherit them."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _data(folder, captions, **over):
    return DataConfig(instance_dir=str(folder), captions=captions, **{"instance_prompt": PROMPT, **over})


# ----------------------------------------------------------------------------- reading

def test_txt_captions_follow_the_load_order(tmp_path):
    """Names whose sorted order is not the order they were written in: captions come in load_folder's order."""
    folder = tmp_path / "f"
    folder.mkdir()
    names = ["b.png", "a.jpg", "C.png", "img_10.png", "img_9.png", "d.webp"]
    for k, n in enumerate(names):
        _image(folder / n, k)
        if n != "d.webp":
            (folder / n).with_suffix(".txt").write_text(f"  caption of {n}\n")
    (folder / "notes.txt").write_text("not a caption")  # no image named notes
    _, files = load_folder(folder)
    caps = read_captions(folder, "txt")
    assert [f.name for f in caps.files] == [f.name for f in files] == sorted(names)
    assert caps.texts == tuple(None if f.name == "d.webp" else f"caption of {f.name}" for f in files)
    assert instance_prompts(_data(folder, "txt")) == [PROMPT if f.name == "d.webp" else f"caption of {f.name}"
                                                      for f in files]
    assert instance_prompts(_data(folder, "auto")) == instance_prompts(_data(folder, "txt"))
    assert read_captions(folder, "none") is None and instance_prompts(_data(folder, "none")) is None


def test_metadata_captions(imgs):
    _metadata(imgs, [{"file_name": "img_003.png", "text": "three", "other": 1}, "",
                     {"file_name": "./img_000.png", "text": " zero "},
                     {"file_name": "img_001.png", "text": ""}, {"file_name": "img_002.png", "text": None}])
    (imgs / "img_000.txt").write_text("ignored: metadata.jsonl comes first")
    assert read_captions(imgs, "metadata").texts == ("zero", "", None, "three")
    assert instance_prompts(_data(imgs, "metadata")) == ["zero", PROMPT, PROMPT, "three"]
    assert instance_prompts(_data(imgs, "auto")) == ["zero", PROMPT, PROMPT, "three"]
    assert instance_prompts(_data(imgs, "txt"))[0] == "ignored: metadata.jsonl comes first"
    _metadata(imgs, [{"file_name": "img_001.png", "caption": "one"}])  # another column, named by caption_column
    assert instance_prompts(_data(imgs, "metadata", caption_column="caption")) == [PROMPT, "one", PROMPT, PROMPT]


def test_auto_without_caption_files_is_the_instance_prompt(imgs):
    assert read_captions(imgs, "auto") is None and instance_prompts(_data(imgs, "auto")) is None


def test_an_uncaptioned_image_needs_the_instance_prompt(imgs):
    _metadata(imgs, [{"file_name": f"img_00{k}.png", "text": "x"} for k in (0, 2, 3)] +
              [{"file_name": "img_001.png", "text": "  "}])
    with pytest.raises(DataError, match="img_001.png has no caption .* data.instance_prompt, the prompt of such "
                                        "images, is not set"):
        instance_prompts(_data(imgs, "metadata", instance_prompt=None))


# ----------------------------------------------------------------------------- bad input: one error, no model loaded

OFFICIAL = {"loss.mode": "official", "loss.source": "class_prompt", "loss.space": "pixel", "data.class_prompt": "a dog"}
BAD = {  # name: (files to write into the image folder, overrides, the one line names)
    "not_json": ({"metadata.jsonl": '{"file_name": "img_000.png", "text": "a"}\n{"file_name": "img_001.png", '}, {},
                 "metadata.jsonl line 2 is not valid JSON"),
    "not_an_object": ({"metadata.jsonl": '["img_000.png", "a"]\n'}, {}, "metadata.jsonl line 1 is not a JSON object"),
    "unknown_file": ({"metadata.jsonl": '{"file_name": "img_000.png", "text": "a"}\n'
                                        '{"file_name": "img_009.png", "text": "b"}\n'}, {},
                     "line 2: file_name 'img_009.png' is not an image of the folder: no image img_009.png in"),
    "not_an_image": ({"metadata.jsonl": '{"file_name": "notes.md", "text": "b"}\n', "notes.md": "x"}, {},
                     "file_name 'notes.md' is not an image of the folder: notes.md is not an image"),
    "subfolder": ({"metadata.jsonl": '{"file_name": "sub/img_000.png", "text": "b"}\n'}, {},
                  "not in subfolders"),
    "listed_twice": ({"metadata.jsonl": '{"file_name": "img_000.png", "text": "a"}\n'
                                        '{"file_name": "img_001.png", "text": "b"}\n'
                                        '{"file_name": "./img_000.png", "text": "c"}\n'}, {},
                     "line 3: file_name './img_000.png' is listed twice (first on line 1)"),
    "no_file_name": ({"metadata.jsonl": '{"text": "a"}\n'}, {}, 'metadata.jsonl line 1 has no "file_name"'),
    "no_column": ({"metadata.jsonl": '{"file_name": "img_000.png", "caption": "a"}\n'}, {},
                  "line 1 has no \"text\" key (its keys: 'file_name', 'caption'); data.caption_column names"),
    "column_not_text": ({"metadata.jsonl": '{"file_name": "img_000.png", "text": 3}\n'}, {},
                        'line 1: "text" is not a string: 3'),
    "no_metadata": ({"img_000.txt": "a"}, {"data.captions": "metadata"}, "data.captions=metadata but"),
    "no_txt": ({"notes.txt": "a", "metadata.jsonl": "{}"}, {"data.captions": "txt"},
               "data.captions=txt but no image of"),
    "not_utf8": ({"img_001.txt": b"caf\xe9"}, {"data.captions": "txt"}, "img_001.txt is not UTF-8 text"),
    "missing_folder": ({}, {"data.instance_dir": "{t}/missing"}, "data.instance_dir: folder does not exist"),
    "no_instance_prompt": ({"img_000.txt": "a", "img_001.txt": ""}, {"data.instance_prompt": None},
                           "config key 'data.instance_prompt' is required for a text-to-image model (with "
                           "data.captions too"),
    "official": ({"img_000.txt": "a"}, {"data.captions": "txt", **OFFICIAL},
                 "with loss.mode=official: per-image captions are not reproduced"),
    "official_auto": ({"metadata.jsonl": '{"file_name": "img_000.png", "text": "a"}\n'}, OFFICIAL,
                      "data.captions=auto (captions in"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_captions_are_one_line_before_any_model_loads(case, model, imgs, tmp_path, monkeypatch, capsys, environ):
    files, over, names = BAD[case]
    for name, text in files.items():
        (imgs / name).write_bytes(text if isinstance(text, bytes) else text.encode())

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine, "load", no_loading)
    cfg = tiny_config(tmp_path, model, imgs, data__instance_prompt=PROMPT, data__captions="auto", loss__prior=0.0,
                      loss__source="frozen", loss__space="latent")
    args = [f"{k}={'null' if v is None else str(v).replace('{t}', str(tmp_path))}" for k, v in over.items()]
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    assert train_cli.main(["--config", str(tmp_path / "run.yaml"), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsfast train: error: "), err
    assert names in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_official_mode_without_caption_files_resolves(imgs):
    cfg = tiny_config(imgs.parent, "m", imgs, data__instance_prompt=PROMPT, data__class_prompt="a dog",
                      data__captions="auto", loss__mode="official")
    assert resolve(load_config(cfg), "sd", down_factor=4).data.captions == "auto"


def test_help_lists_the_caption_keys(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "data.captions" in out and "data.caption_column" in out


# ----------------------------------------------------------------------------- dsfast dreambooth --caption_column

def test_dreambooth_caption_column_maps_to_metadata_captions(imgs):
    _metadata(imgs, [{"file_name": "img_000.png", "caption": "a red dog"}])
    argv = ["--pretrained_model_name_or_path", "sd", "--instance_data_dir", str(imgs), "--instance_prompt", PROMPT]
    args, extra = dreambooth_cli.parser().parse_known_args([*argv, "--caption_column", "caption"])
    assert not extra
    cfg = dreambooth_cli.flags_to_config(args)
    assert (cfg["data"]["captions"], cfg["data"]["caption_column"]) == ("metadata", "caption")
    r = resolve(load_config(cfg), "sd", down_factor=4)  # the captions are read (and valid)
    assert instance_prompts(r.data) == ["a red dog", PROMPT, PROMPT, PROMPT]
    args, _ = dreambooth_cli.parser().parse_known_args(argv)
    assert "captions" not in dreambooth_cli.flags_to_config(args)["data"]  # without the flag: none, as before
    args, _ = dreambooth_cli.parser().parse_known_args([*argv, "--caption_column", "text"])  # the default column
    with pytest.raises(DataError, match="line 1 has no \"text\" key"):
        resolve(load_config(dreambooth_cli.flags_to_config(args)), "sd", down_factor=4)


def test_dreambooth_caption_column_without_metadata_is_one_line(imgs, capsys):
    argv = ["--pretrained_model_name_or_path", "sd", "--instance_data_dir", str(imgs), "--instance_prompt", PROMPT,
            "--caption_column", "text"]
    assert dreambooth_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--caption_column text: dsfast reads captions from the metadata.jsonl" in err
    assert f"{imgs} has none" in err


# ----------------------------------------------------------------------------- each sample its own caption

METHOD_CASES = {
    "finetune": ("sd", dict(method="finetune")),
    "domainstudio_class_prompt": ("sd", dict(data__class_prompt="a dog", loss__space="latent")),  # instance + class rows
    "domainstudio_frozen_no_class_prompt": ("sd", dict(loss__source="frozen", loss__prior=0.0, loss__space="latent")),
    "sdxl_finetune": ("sdxl", dict(method="finetune")),  # pooled embeddings and size ids per row too
    "flux_finetune": ("flux", dict(method="finetune")),
}
BUILDERS = {"sdxl": make_sdxl_pipeline, "flux": make_flux_pipeline}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, model):
    built = {"sd": model}

    def get(family):
        if family not in built:
            built[family] = BUILDERS[family](tmp_path_factory.mktemp(family) / "model")
        return built[family]

    return get


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_each_sample_is_conditioned_on_its_own_caption(case, pipelines, imgs, tmp_path):
    """The denoiser's conditioning of each instance sample (and, with loss.source=frozen and no class prompt, the
    source side's) is ``encode_prompts([caption of the sample's image])``, mirrored samples included; class
    samples keep the class prompt."""
    family_name, over = METHOD_CASES[case]
    _metadata(imgs, [{"file_name": n, "text": t} for n, t in CAPTIONS.items()])
    write_images(tmp_path / "class", 4, size=16, seed=1)  # given: no class image is generated
    method, bundle, draws, images = _method(pipelines(family_name), imgs, tmp_path / "class", tmp_path,
                                            data__captions="auto", **over)
    family = method.family
    names = [f.name for f in load_folder(imgs)[1]]
    expect = {n: family.encode_prompts([CAPTIONS.get(n, PROMPT)]) for n in names}
    assert len({float(e["encoder_hidden_states"].sum()) for e in expect.values()}) == 4  # four distinct conditionings
    class_cond = family.encode_prompts(["a dog"])
    calls = _record_predict(family)
    seen_flipped = set()
    with torch.no_grad():
        for step in range(3):
            for ks in ([0, 1], [2, 3]):
                idx = [draws.index(step, k, 4) for k in ks]  # the dataset index of each sample
                mb = method.micro_batch(step, ks)
                calls.clear()
                method.forward(bundle.unet, mb, need_source=True)
                m = len(ks)
                assert calls
                for c, cond in enumerate(calls):
                    for r, i in enumerate(idx):
                        for key, value in expect[names[i]].items():
                            torch.testing.assert_close(cond[key][r], value[0], msg=f"{case}: call {c} sample {r} "
                                                       f"(image {names[i]}) {key}")
                    if cond["encoder_hidden_states"].shape[0] == 2 * m:  # the class half
                        for key, value in class_cond.items():
                            torch.testing.assert_close(cond[key][m:], value.expand_as(cond[key][m:]))
                assert mb["i"].tolist() == idx and mb["i"].device == method.device
                for r, i in enumerate(idx):  # the caption follows the image into its mirrored copy
                    flipped = not torch.equal(mb["x0"][r], images[i])
                    assert torch.equal(mb["x0"][r], images[i].flip(-1) if flipped else images[i])
                    if flipped:
                        seen_flipped.add(i)
    assert seen_flipped  # mirrored samples were drawn (and conditioned as their image)


def _method(pipeline, instance_dir, class_dir, tmp_path, **over):
    """``(method, bundle, draws, images)``: the config's method built over the tiny ``pipeline`` on the CPU, with the
    class images of ``class_dir`` (given: none is generated), a global batch of 4 and random flips."""
    info = describe(str(pipeline))
    n_class = count_images(class_dir, "class")
    cfg = resolve(load_config(tiny_config(tmp_path, pipeline, instance_dir, data__instance_prompt=PROMPT,
                                          data__class_dir=str(class_dir), data__num_class_images=n_class, **over)),
                  info.family, down_factor=info.down_factor)
    cls = methods.get(cfg.method, info.family)
    bundle = load(info, cfg.model.pretrained, dtype=torch.float32, lora=lora_config(info, 0, None),
                  frozen_source=cls.needs(cfg.loss).frozen_source, device=torch.device("cpu"),
                  options=family_options(cfg))
    images = load_images(instance_dir, 16)
    draws = Draws(seed=0, batch_size=4, num_timesteps=1000, random_flip=True)
    method = cls(bundle=bundle, images=images, draws=draws, loss=cfg.loss, data=cfg.data, sample=cfg.sample,
                 dtype=torch.float32, device=torch.device("cpu"))
    return method, bundle, draws, images


def _record_predict(family) -> list[dict]:
    """Makes ``family.predict`` record the conditioning of each call into the returned list."""
    calls = []
    predict = family.predict

    def recording(model_, x_t, t, cond):
        calls.append({k: v.detach().clone() for k, v in cond.items()})
        return predict(model_, x_t, t, cond)

    family.predict = recording
    return calls


def test_sdxl_samples_are_conditioned_on_their_own_images_size_and_crop(pipelines, tmp_path):
    """SDXL's size/crop ids (``time_ids``) of each sample are its own image's (its mirror's where mirrored), as
    diffusers' SDXL scripts condition a training image: on the adapted model's instance and class samples, and on
    the frozen source's call with the class prompt."""
    inst = write_images(tmp_path / "inst", 0, sizes=[(20, 36), (37, 16), (16, 27), (16, 16)])
    classes = write_images(tmp_path / "class", 0, sizes=[(16, 25), (30, 16)], seed=1)
    method, bundle, _, _ = _method(pipelines("sdxl"), inst, classes, tmp_path, data__class_prompt="a dog",
                                   loss__source="frozen", loss__prior=1.0, loss__space="latent")
    own = method.family.image_conditioning(image_geometry(inst, 16))["time_ids"]
    own_c = method.family.image_conditioning(image_geometry(classes, 16))["time_ids"]
    assert not torch.equal(own[0, 0], own[1, 0]) and not torch.equal(own_c[0, 0], own_c[1, 0])  # crops not centred
    calls = _record_predict(method.family)
    mirrored = {"instance": False, "class": False}
    with torch.no_grad():
        for step in range(3):
            for ks in ([0, 1], [2, 3]):
                mb = method.micro_batch(step, ks)
                calls.clear()
                method.forward(bundle.unet, mb, need_source=True)
                instance = own[mb["flip"], mb["i"]]
                assert len(calls) == 2  # the adapted model (instance + class samples), the frozen source
                torch.testing.assert_close(calls[0]["time_ids"], torch.cat([instance, own_c[mb["flip_c"], mb["j"]]]))
                torch.testing.assert_close(calls[1]["time_ids"], instance)
                mirrored["instance"] |= any(f and int(i) in (0, 2) for i, f in zip(mb["i"], mb["flip"]))
                mirrored["class"] |= bool(mb["flip_c"].any())
    assert mirrored == {"instance": True, "class": True}  # mirrored off-centre crops were drawn


# ----------------------------------------------------------------------------- a short run

@pytest.mark.slow
def test_two_steps_with_captions(model, imgs, tmp_path, capsys, environ):
    from dsfast.train import train

    _metadata(imgs, [{"file_name": n, "text": t} for n, t in CAPTIONS.items()])
    cfg = tiny_config(tmp_path, model, imgs, method="dreambooth", data__instance_prompt=PROMPT,
                      data__captions="metadata", loss__prior=0.0, train__batch_size=2, train__micro_batch_size=1)
    run = train(cfg)
    assert "dsfast: data.captions=metadata: 3 of 4 images train with their own caption" in capsys.readouterr().out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert (run / "final" / "model_index.json").is_file()
