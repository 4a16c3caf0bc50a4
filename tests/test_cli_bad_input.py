"""Every bad input to the `dsfast` command line, per subcommand: a non-zero exit status, exactly one line on
stderr naming what is wrong (argparse's usage errors included), no traceback, and nothing on disk created or
changed (every path under the test's folder, which is also the working directory, keeps its size, mtime and
content).

The cases run ``dsfast.cli.main`` in-process and fail before any model is loaded (a pipeline folder here holds
only its config files); those that load a tiny model, or start a real ``dsfast`` process, are marked slow."""
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsfast.cli import SUBCOMMANDS
from dsfast.cli import main as dsfast_main
from dsfast.train.testing import make_unconditional_pipeline, subprocess_env, write_images

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_permissions = pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (itself included): type and mode, size, mtime, sha256 of a file's bytes."""
    seen = {}
    for dirpath, _, files in os.walk(root):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in files)]:
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            seen[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


def config_only_pipeline(path: Path) -> None:
    """A DDPMPipeline folder with its config files only (no weights): what is read before a model loads. The UNet's
    three levels make the resolution a multiple of 4."""
    (path / "unet").mkdir(parents=True)
    (path / "scheduler").mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    (path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 3,
                                                           "out_channels": 3, "sample_size": 16,
                                                           "block_out_channels": [8, 16, 16]}))
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))


def run_config(t: Path, model: Path) -> dict:
    return {"method": "domainstudio", "model": {"pretrained": str(model)},
            "data": {"instance_dir": str(t / "imgs"), "resolution": 16},
            "train": {"max_steps": 2, "batch_size": 4}, "deepspeed": {"zero_stage": 0},
            "output_dir": str(t / "out"), "checkpoint_every": 0, "sample_every": 0}


def make_inputs(t: Path) -> None:
    """The inputs every case may name, under ``t``: images, folders that are not what is due, configs, runs."""
    (t / "cwd").mkdir()
    (t / "file.txt").write_text("not a folder\n")
    (t / "empty").mkdir()
    (t / "notimages").mkdir()
    (t / "notimages" / "readme.txt").write_text("no images here\n")
    write_images(t / "imgs", 5)
    write_images(t / "two", 2)
    config_only_pipeline(t / "model")
    (t / "run.yaml").write_text(json.dumps(run_config(t, t / "model")))
    (t / "bad.yaml").write_text("method: domainstudio\ntrain: {lr: 1e-4\n  max_steps: 3\n")
    (t / "unknown.yaml").write_text(json.dumps({**run_config(t, t / "model"), "train": {"learning_rate": 1.0}}))
    (t / "nomodel.yaml").write_text(json.dumps(run_config(t, t / "nomodel")))
    (t / "filemodel.yaml").write_text(json.dumps(run_config(t, t / "file.txt")))
    # a run folder without final/ weights; one whose `latest` names a checkpoint that is not complete
    (t / "run").mkdir()
    (t / "run" / "config.yaml").write_text(json.dumps(run_config(t, t / "model")))
    (t / "broken" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (t / "broken" / "config.yaml").write_text(json.dumps({**run_config(t, t / "model"), "output_dir": str(t / "broken")}))
    (t / "broken" / "checkpoints" / "latest").write_text("step_00000002")
    (t / "broken.yaml").write_text((t / "broken" / "config.yaml").read_text())
    (t / "readonly").mkdir(mode=0o555)


def call(argv: list[str]) -> int:
    try:
        return dsfast_main(argv)
    except SystemExit as exc:  # argparse's errors, and a message given to SystemExit
        return exc.code if isinstance(exc.code, int) else 1


def check_bad_input(t: Path, argv: list[str], names: str, capfd, roots=()) -> None:
    argv = [a.replace("{t}", str(t)) for a in argv]
    names = names.replace("{t}", str(t))
    before = [snapshot(t), *map(snapshot, roots)]
    code = call(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"dsfast {' '.join(argv)} exited 0\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, err
    assert len(lines) == 1, f"dsfast {' '.join(argv)}: stderr is not one line:\n{err}"
    assert names in lines[0], f"dsfast {' '.join(argv)}: {lines[0]!r} does not name {names!r}"
    assert [snapshot(t), *map(snapshot, roots)] == before, f"dsfast {' '.join(argv)} changed the disk"


@pytest.fixture
def t(tmp_path, monkeypatch):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path / "cwd")  # relative defaults (grid.png, runs/..., assets/...) land in the snapshot
    environ = dict(os.environ)  # an in-process train() sets MASTER_PORT, RANK, ...: later tests must not inherit them
    yield tmp_path
    os.environ.clear()
    os.environ.update(environ)
    (tmp_path / "readonly").chmod(0o755)


# (argv, what the one line must name, marks)
RUN = ["--config", "{t}/run.yaml"]
DB = ["--pretrained_model_name_or_path", "{t}/model", "--instance_data_dir", "{t}/imgs", "--instance_prompt", "a sks dog",
      "--output_dir", "{t}/out"]
SAMPLE_RUN = ["--run", "{t}/run"]
EVAL = ["--samples", "{t}/imgs", "--train", "{t}/imgs"]
PLAN = ["--preset", "sd15"]
CASES = {
    "dsfast": [
        (["Train"], "unknown command 'Train', did you mean 'train'?"),
        (["--verbose"], "unknown command '--verbose'"),
    ],
    "train": [
        ([], "the following arguments are required: --config"),
        ([*RUN, "--bogus"], "unrecognized arguments: --bogus"),
        (["--config"], "argument --config: expected one argument"),
        (["--config", "{t}/missing.yaml"], "config file not found: {t}/missing.yaml"),
        (["--config", "{t}/empty"], "config file {t}/empty is a folder"),
        (["--config", "{t}/bad.yaml"], "config file {t}/bad.yaml: not valid YAML (line 3"),
        (["--config", "{t}/unknown.yaml"], "unknown config key 'train.learning_rate'"),
        ([*RUN, "loss.weight=3"], "unknown config key 'loss.weight'"),
        ([*RUN, "train.lr"], "override 'train.lr' is not of the form key=value"),
        ([*RUN, "train.lr=[1,"], "override 'train.lr=[1,': not valid YAML"),
        ([*RUN, "train.max_steps=0"], "'train.max_steps'"),
        ([*RUN, "train.max_steps=-3"], "'train.max_steps'"),
        ([*RUN, "train.max_steps=ten"], "'train.max_steps'"),
        ([*RUN, "train.batch_size=2.5"], "'train.batch_size'"),
        ([*RUN, "train.lr=nan"], "'train.lr'"),
        ([*RUN, "train.lr=-inf"], "'train.lr'"),
        ([*RUN, "data.resolution=0"], "'data.resolution'"),
        ([*RUN, "data.resolution=18"], "data.resolution=18 must be divisible by the model's downsampling factor 4"),
        ([*RUN, "train.batch_size=2"], "need train.batch_size >= 3 (got 2)"),
        ([*RUN, "method=dreambooth"], "text-to-image"),
        ([*RUN, "method=dreamfusion"], "'method'"),
        ([*RUN, "train.mixed_precision=fp16"], "train.mixed_precision=fp16 is not supported on CPU",
         pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")),
        ([*RUN, "output_dir={t}/readonly/run"], "no permission to write in {t}/readonly", needs_permissions),
        ([*RUN, "--resume", "latest"], "--resume latest: no complete checkpoint under {t}/out/checkpoints"),
        ([*RUN, "--resume", "{t}/run"], "train.resume={t}/run"),
        (["--config", "{t}/broken.yaml", "--resume", "latest"], "{t}/broken/checkpoints/step_00000002"),
        (["--config", "{t}/nomodel.yaml"], "model.pretrained={t}/nomodel: the folder {t}/nomodel does not exist"),
        (["--config", "{t}/filemodel.yaml"], "model.pretrained={t}/file.txt: no model_index.json"),
    ],
    "dreambooth": [
        ([], "the following arguments are required: --pretrained_model_name_or_path"),
        ([*DB, "--train_batch_size", "abc"], "argument --train_batch_size: not an integer: 'abc'"),
        ([*DB, "--train_batch_size", "0"], "argument --train_batch_size: must be at least 1, got 0"),
        ([*DB, "--gradient_accumulation_steps", "-1"], "argument --gradient_accumulation_steps: must be at least 1"),
        ([*DB, "--max_train_steps", "0"], "argument --max_train_steps: must be at least 1, got 0"),
        ([*DB, "--checkpointing_steps", "-100"], "argument --checkpointing_steps: must be at least 0"),
        ([*DB, "--learning_rate", "nan"], "'train.lr'"),
        ([*DB, "--resolution", "-16"], "'data.resolution'"),
        ([*DB, "--mixed_precision", "fp32"], "argument --mixed_precision: invalid choice: 'fp32'"),
        ([*DB, "train.max_steps=0"], "'train.max_steps'"),
        ([*DB, "--output_dir", "{t}/file.txt"], "output_dir {t}/file.txt exists and is not a folder"),
        ([*DB, "--output_dir", "{t}/file.txt/run"], "{t}/file.txt is a file"),
        ([*DB, "--output_dir", "{t}/readonly/run"], "no permission to write in {t}/readonly", needs_permissions),
        ([*DB, "--pretrained_model_name_or_path", "{t}/nomodel"], "{t}/nomodel does not exist"),
    ],
    "sample": [
        ([], "the following arguments are required: --run"),
        ([*SAMPLE_RUN, "--bogus"], "unrecognized arguments: --bogus"),
        ([*SAMPLE_RUN, "--num", "0"], "argument --num: must be at least 1, got 0"),
        ([*SAMPLE_RUN, "--num", "nan"], "argument --num: not an integer: 'nan'"),
        ([*SAMPLE_RUN, "--steps", "-1"], "argument --steps: must be at least 1, got -1"),
        ([*SAMPLE_RUN, "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        ([*SAMPLE_RUN, "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        *([([*SAMPLE_RUN, "--dtype", "float16"], "float16 sampling needs a GPU")] if not torch.cuda.is_available()
          else []),
        (["--run", "{t}/missing"], "{t}/missing: no such folder"),
        (["--run", "{t}/file.txt"], "{t}/file.txt: no such folder"),
        (["--run", "{t}/empty"], "{t}/empty: neither a diffusers pipeline folder nor a run folder"),
        (SAMPLE_RUN, "{t}/run: the run has no final/ weights"),
        ([*SAMPLE_RUN, "--out", "{t}/empty"], "argument --out: {t}/empty is a folder"),
        ([*SAMPLE_RUN, "--out", "{t}/missing/grid.png"], "argument --out: {t}/missing/grid.png: {t}/missing is not"),
        ([*SAMPLE_RUN, "--out", "{t}/file.txt/grid.png"], "argument --out: {t}/file.txt/grid.png"),
        ([*SAMPLE_RUN, "--out-dir", "{t}/file.txt"], "--out-dir {t}/file.txt exists and is not a folder"),
        ([*SAMPLE_RUN, "--checkpoint", "step_x"], "--checkpoint step_x: use 'latest' or step_N"),
        ([*SAMPLE_RUN, "--checkpoint", "latest"], "--checkpoint latest: no complete checkpoint"),
        ([*SAMPLE_RUN, "--checkpoint", "step_5"], "--checkpoint step_5: {t}/run/checkpoints/step_00000005 cannot be used: no such folder"),
        (["--run", "{t}/empty", "--checkpoint", "latest"], "--checkpoint needs a run folder"),
        (["--run", "{t}/broken", "--checkpoint", "latest"], "{t}/broken/checkpoints/step_00000002"),
    ],
    "eval": [
        ([], "the following arguments are required: --samples, --train"),
        ([*EVAL, "--bogus"], "unrecognized arguments: --bogus"),
        *[([*EVAL, flag, value], f"argument {flag}: {message}")
          for flag in ("--size", "--lpips-size", "--max-per-cluster")
          for value, message in (("0", "must be at least 1"), ("x", "not an integer"), ("-2", "must be at least 1"))],
        ([*EVAL, "--metric", "fid"], "argument --metric: invalid choice: 'fid'"),
        ([*EVAL, "--lpips-net", "squeeze"], "argument --lpips-net: invalid choice: 'squeeze'"),
        ([*EVAL, "--device", "gpu0"], "argument --device: not a torch device: 'gpu0'"),
        ([*EVAL, "--device", "cuda"], "argument --device: cuda: torch sees no CUDA GPU here",
         pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
        (["--samples", "{t}/missing", "--train", "{t}/imgs"], "--samples: folder does not exist: {t}/missing"),
        (["--samples", "{t}/file.txt", "--train", "{t}/imgs"], "--samples: not a folder: {t}/file.txt"),
        (["--samples", "{t}/imgs", "--train", "{t}/notimages"], "--train: no images"),
        ([*EVAL, "--json", "{t}/empty"], "argument --json: {t}/empty is a folder"),
        ([*EVAL, "--json", "{t}/missing/result.json"], "argument --json: {t}/missing/result.json"),
        ([*EVAL, "--json", "{t}/file.txt/result.json"], "argument --json: {t}/file.txt/result.json"),
    ],
    "plan": [
        ([], "one of the arguments --preset --config is required"),
        (["--preset", "sd2"], "argument --preset: invalid choice: 'sd2'"),
        ([*PLAN, "--config", "{t}/run.yaml"], "argument --config: not allowed with argument --preset"),
        ([*PLAN, "--bogus"], "unrecognized arguments: --bogus"),
        ([*PLAN, "--gpu", "-5"], "argument --gpu: GPU sizes must be positive"),
        ([*PLAN, "--gpu", "abc"], "argument --gpu: GPU sizes in GB"),
        ([*PLAN, "--gpu", "24,0"], "argument --gpu: GPU sizes must be positive"),
        ([*PLAN, "--gpu", "nan"], "argument --gpu: GPU sizes must be positive"),
        ([*PLAN, "--gpu", "inf"], "argument --gpu: GPU sizes must be positive"),
        ([*PLAN, "--batch", "0"], "argument --batch: must be at least 1"),
        ([*PLAN, "--batch", "2.5"], "argument --batch: not an integer: '2.5'"),
        ([*RUN, "--world", "0"], "argument --world: must be at least 1"),
        ([*PLAN, "--resolution", "0"], "argument --resolution: must be at least 1"),
        ([*PLAN, "--resolution", "abc"], "argument --resolution: not an integer: 'abc'"),
        ([*PLAN, "--resolution", "100"], "--resolution=100 must be divisible by the model's downsampling factor 64"),
        ([*PLAN, "--resolution", "512,520"], "--resolution=520 must be divisible by the model's downsampling factor 64"),
        (["--preset", "sdxl", "--resolution", "1000"], "--resolution=1000 must be divisible by the model's "
                                                       "downsampling factor 32"),
        ([*RUN, "--resolution", "18"], "--resolution=18 must be divisible by the model's downsampling factor 4"),
        ([*RUN, "data.resolution=18"], "data.resolution=18 must be divisible by the model's downsampling factor 4"),
        ([*PLAN, "--world", "2"], "--world and key=value overrides go with --config"),
        ([*PLAN, "train.batch_size=8"], "--world and key=value overrides go with --config"),
        (["--config", "{t}/missing.yaml"], "config file not found: {t}/missing.yaml"),
        (["--config", "{t}/bad.yaml"], "config file {t}/bad.yaml: not valid YAML"),
        (["--config", "{t}/unknown.yaml"], "unknown config key 'train.learning_rate'"),
        ([*RUN, "train.batch_size=0"], "'train.batch_size'"),
        (["--config", "{t}/nomodel.yaml"], "model.pretrained={t}/nomodel has no unet/config.json"),
    ],
    "pretrain": [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--steps", "1e3"], "argument --steps: not an integer: '1e3'"),
        (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
        (["--lr", "0"], "argument --lr: must be above 0, got 0"),
        (["--lr", "-0.001"], "argument --lr: must be above 0, got -0.001"),
        (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
        (["--lr", "fast"], "argument --lr: not a number: 'fast'"),
        (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
        (["--min-lr-ratio", "2"], "argument --min-lr-ratio: must be in [0, 1], got 2"),
        (["--weight-decay", "-0.1"], "argument --weight-decay: must be at least 0, got -0.1"),
        (["--ema", "1"], "argument --ema: must be in [0, 1), got 1"),
        (["--ema", "nan"], "argument --ema: must be a finite number, got nan"),
        (["--threads", "-2"], "argument --threads: must be at least 0, got -2"),
        (["--sample-num", "-1"], "argument --sample-num: must be at least 0, got -1"),
        (["--sample-steps", "0"], "argument --sample-steps: must be at least 1, got 0"),
        (["--save-every", "-5"], "argument --save-every: must be at least 0, got -5"),
        (["--device", "gpu0"], "argument --device: not a torch device: 'gpu0'"),
        (["--out", "{t}/file.txt"], "--out {t}/file.txt: cannot make this folder"),
        (["--out", "{t}/file.txt/model"], "--out {t}/file.txt/model: cannot make this folder"),
        (["--out", "{t}/readonly/model"], "--out {t}/readonly/model: cannot make this folder", needs_permissions),
    ],
}


def test_every_subcommand_has_bad_input_cases():
    assert set(CASES) == {"dsfast", *SUBCOMMANDS}


def _params(cases):
    for command, rows in cases.items():
        for argv, names, *marks in rows:
            full = argv if command == "dsfast" else [command, *argv]
            yield pytest.param(full, names, marks=marks, id=" ".join(full) or command)


@pytest.mark.parametrize("argv, names", list(_params(CASES)))
def test_bad_input_is_one_line_and_writes_nothing(t, capfd, argv, names):
    check_bad_input(t, argv, names, capfd)


# ----------------------------------------------------------------------------- cases that load a tiny model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_unconditional_pipeline(tmp_path_factory.mktemp("tiny") / "model")


TRAIN_DATA_CASES = [
    ("data.instance_dir={t}/missing", "data.instance_dir: folder does not exist: {t}/missing"),
    ("data.instance_dir={t}/file.txt", "data.instance_dir: not a folder: {t}/file.txt"),
    ("data.instance_dir={t}/empty", "data.instance_dir: no images"),
    ("data.instance_dir={t}/notimages", "data.instance_dir: no images"),
    ("data.instance_dir={t}/two", "the pairwise-similarity losses need at least 3 training images; {t}/two has 2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override, names", TRAIN_DATA_CASES, ids=[c[0].split("/")[-1] for c in TRAIN_DATA_CASES])
def test_bad_training_data_is_one_line_and_writes_nothing(t, capfd, tiny_model, override, names):
    """The images are read after the model loads (real weights here), still before anything is written."""
    argv = ["train", *RUN, f"model.pretrained={tiny_model}", override]
    check_bad_input(t, argv, names, capfd, roots=[tiny_model])


@pytest.mark.slow
@pytest.mark.parametrize("argv, names", [
    (["plan", *PLAN, "--resolution", "100"], "--resolution=100 must be divisible"),
    (["train", "--config", "{t}/bad.yaml"], "not valid YAML"),
    (["sample", "--run", "{t}/run", "--out", "{t}/empty"], "argument --out: {t}/empty is a folder"),
])
def test_a_real_dsfast_process_prints_one_line(t, argv, names):
    """The installed entry point in a fresh process: nothing an import prints (warnings, logging) adds a line."""
    argv = [a.replace("{t}", str(t)) for a in argv]
    before = snapshot(t)
    p = subprocess.run([sys.executable, "-m", "dsfast.cli", *argv], capture_output=True, text=True,
                       env=subprocess_env(), cwd=t / "cwd")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert len(lines) == 1 and names.replace("{t}", str(t)) in lines[0], p.stderr
    assert snapshot(t) == before
