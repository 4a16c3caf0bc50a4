"""Nothing is lost under faults: kills at any point, damaged checkpoints, a full disk, a diverging run.

Every run is a ``dsfast train`` subprocess on the tiny unconditional model (DeepSpeed caches its process
group). A kill is a real SIGKILL at a named point of the trainer (``DSFAST_TEST_KILL``, see
``dsfast.train.checkpoint.maybe_kill``); after resuming, the metrics, the sample grids and ``final/`` must
equal those of an uninterrupted run, and no partial folder may be left.
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsfast.train.testing import subprocess_env, tiny_config, unconditional_run_inputs

pytestmark = pytest.mark.slow

MAX_STEPS, EVERY = 8, 2  # checkpoints and sample grids every 2 steps
TIMING = ("sec_per_step", "checkpoint_sec", "sample_sec")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return unconditional_run_inputs(tmp_path_factory.mktemp("faults"))


def config(assets, workdir: Path, **over) -> dict:
    base = dict(checkpoint_every=EVERY, sample_every=EVERY, keep_last=1, train__max_steps=MAX_STEPS,
                train__micro_batch_size=2, train__ema=0.9)
    return tiny_config(workdir, assets / "model", assets / "imgs", **{**base, **over})


def train(cfg: dict, workdir: Path, *args, kill: str | None = None, driver: str | None = None):
    """``dsfast train`` on ``cfg`` (``driver``: Python run first in the process, e.g. to patch a writer)."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = workdir / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    env = subprocess_env()
    if kill:
        env["DSFAST_TEST_KILL"] = kill
    argv = ["--config", str(f), *args]
    code = f"{driver or ''}\nimport sys\nfrom dsfast.train.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def sample_latest(run: Path, grid: Path):
    argv = ["sample", "--run", str(run), "--checkpoint", "latest", "--num", "2", "--steps", "2", "--out", str(grid)]
    code = f"import sys\nfrom dsfast.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def lines(text: str) -> list[str]:
    """What a run printed on stderr, but its progress bar."""
    return [x for x in text.strip().splitlines() if x.strip() and "%|" not in x]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def no_partial_left(run: Path) -> None:
    ck = run / "checkpoints"
    folders = [p for p in ck.iterdir() if p.is_dir()]
    assert all((p / "COMPLETE").is_file() for p in folders), [p.name for p in folders]
    assert not list(run.rglob("*.tmp")) and not (run / "final.tmp").exists()


def assert_same_run(run: Path, ref: Path) -> None:
    assert metrics(run) == metrics(ref)  # every line, once, bit-identical (timings aside)
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    grids = sorted(p.name for p in (ref / "samples").iterdir())
    assert grids == sorted(p.name for p in (run / "samples").iterdir())
    assert all((run / "samples" / g).read_bytes() == (ref / "samples" / g).read_bytes() for g in grids)
    no_partial_left(run)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    wd = tmp_path_factory.mktemp("reference")
    p = train(config(assets, wd, keep_last=0), wd)  # every checkpoint kept: the damage tests pick older ones
    assert p.returncode == 0, p.stderr[-3000:]
    return wd / "run"


# Kill points in the order a run passes them; (point, steps where it exists).
CHECKPOINT_STEPS = range(EVERY, MAX_STEPS + 1, EVERY)
KILL_POINTS = (
    [(f"backward:{s}", s) for s in range(1, MAX_STEPS + 1)]            # mid-step: gradients half applied
    + [(f"step:{s}", s) for s in range(1, MAX_STEPS + 1)]             # after the update, before its checkpoint
    + [(f"{p}:{s}", s) for s in CHECKPOINT_STEPS                        # inside the save, and between the
       for p in ("save", "save-ema", "save-complete", "saved", "sampled")]  # checkpoint and its grid / log line
)
ORDER = ("backward", "step", "save", "save-ema", "save-complete", "saved", "sampled")


def chain(seed: int, n: int) -> list[str]:
    """``n`` kill points at distinct steps, in run order (each is reached by the run resumed after the previous)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, MAX_STEPS + 1), n))
    points = []
    for s in steps:
        points.append(rng.choice([p for p, at in KILL_POINTS if at == s]))
    return sorted(points, key=lambda p: (int(p.split(":")[1]), ORDER.index(p.split(":")[0])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_kills_then_resume_equal_an_uninterrupted_run(assets, reference, tmp_path, seed):
    """7 SIGKILLs per seed (21 kill points over the three seeds), each followed by a resume (``auto``)."""
    cfg = config(assets, tmp_path)
    for point in chain(seed, 7):
        p = train(cfg, tmp_path, kill=point)
        assert p.returncode == -9, f"{point} not reached: {p.stderr[-2000:]}"
    p = train(cfg, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(tmp_path / "run", reference)


@pytest.mark.parametrize("point", ["saved:4", "sampled:4"])
def test_a_kill_between_checkpoint_and_log_loses_neither_line_nor_grid(assets, reference, tmp_path, point):
    cfg = config(assets, tmp_path)
    assert train(cfg, tmp_path, kill=point).returncode == -9
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    p = train(cfg, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(run, reference)


# ----------------------------------------------------------------------------- damaged checkpoints

def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated model states": (lambda d: truncate(d / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt is"),
    "0-byte ema.pt": (lambda d: (d / "ema.pt").write_bytes(b""), "ema.pt is 0 bytes"),
    "no COMPLETE": (lambda d: (d / "COMPLETE").unlink(), "no COMPLETE marker"),
    "missing rng file": (lambda d: (d / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_with_one_line(assets, reference, tmp_path, damage):
    """Resume and ``dsfast sample --checkpoint latest`` pass over the damaged newest checkpoint, say so in one line,
    and use the newest good one; the run then ends as an uninterrupted one."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ck = run / "checkpoints"
    shutil.rmtree(run / "final")
    do, reason = DAMAGE[damage]
    do(ck / "step_00000008")

    if damage == "truncated model states":  # sampling chooses as resuming does (once is enough: same function)
        grid = tmp_path / "g.png"
        p = sample_latest(run, grid)
        assert p.returncode == 0 and grid.is_file(), p.stderr[-2000:]
        skip = [x for x in lines(p.stderr) if "skipped" in x]
        assert len(skip) == 1 and "step_00000008" in skip[0] and reason in skip[0] and "step_00000006" in skip[0]

    p = train(config(assets, tmp_path), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    skip = [x for x in lines(p.stderr) if "skipped" in x]
    assert len(skip) == 1 and "step_00000008" in skip[0] and reason in skip[0], p.stderr[-2000:]
    assert "resumed from" in p.stdout and "step_00000006" in p.stdout
    assert_same_run(run, reference)  # steps 7 and 8 retrained identically


def test_resume_at_a_damaged_checkpoint_named_explicitly_is_one_line(assets, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    d = run / "checkpoints" / "step_00000008"
    truncate(d / "mp_rank_00_model_states.pt")
    before = (run / "metrics.jsonl").read_text()
    p = train(config(assets, tmp_path, train__max_steps=10), tmp_path, "--resume", str(d))
    assert p.returncode == 1
    assert len(lines(p.stderr)) == 1 and "mp_rank_00_model_states.pt is" in p.stderr and "truncated" in p.stderr
    assert (run / "metrics.jsonl").read_text() == before


# ----------------------------------------------------------------------------- a full disk

ENOSPC_AT = """
import errno, torch, safetensors.torch
def _full(target, what):
    orig = getattr(target, what)
    def write(obj, f, *a, **k):
        if {match!r} in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return orig(obj, f, *a, **k)
    setattr(target, what, write)
_full(torch, "save"); _full(safetensors.torch, "save_file")
"""


@pytest.mark.parametrize("where", ["step_00000004", "final.tmp"])
def test_a_full_disk_is_one_line_and_leaves_nothing_partial(assets, reference, tmp_path, where):
    cfg = config(assets, tmp_path)
    p = train(cfg, tmp_path, driver=ENOSPC_AT.format(match=where))
    assert p.returncode == 1
    out = lines(p.stderr)
    assert len(out) == 1 and out[0].startswith("dsfast train: error: disk full: no space left on "), p.stderr[-3000:]
    run = tmp_path / "run"
    no_partial_left(run)
    assert not (run / "final").exists()
    if where == "step_00000004":
        assert "checkpoint" in out[0] and "the last good checkpoint is" in out[0] and "step_00000002" in out[0]
        assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    else:
        assert "final/" in out[0] and "step_00000008" in out[0]
    p = train(cfg, tmp_path)  # space freed: the same command resumes and finishes
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(run, reference)


# ----------------------------------------------------------------------------- divergence

def test_a_diverged_checkpoint_is_never_named_and_the_named_one_resumes(assets, tmp_path):
    """lr=10 (Adam, no clipping), a checkpoint every step, keep_last=1: the loss grows for a few steps until the
    weights after step k-1 give a non-finite prediction in step k (k = 4 or 5 here, depending on float rounding of
    the build: the step is read from the message). Checkpoint k-1, saved from those weights, is marked DIVERGED;
    checkpoint k-2 is kept although keep_last=1 (k-1 was never confirmed by a finite step) and named; sampling
    ``latest`` uses it, and it resumes with a smaller lr."""
    import re

    cfg = config(assets, tmp_path, checkpoint_every=1, sample_every=0, keep_last=1, train__max_steps=10,
                 train__lr=10.0, train__max_grad_norm=0.0)
    p = train(cfg, tmp_path)
    assert p.returncode == 1
    out = lines(p.stderr)
    found = re.search(r"non-finite x0 prediction in step (\d+)", out[-1])
    assert len(out) == 1 and found, p.stderr[-3000:]
    k = int(found.group(1))
    assert k >= 3, out[0]  # an older good checkpoint exists
    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    good, bad = f"step_{k - 2:08d}", f"step_{k - 1:08d}"
    assert out[0].endswith(f"the last good checkpoint is {ck / good}"), out[0]
    assert (ck / "latest").read_text() == good
    assert (ck / bad / "DIVERGED").is_file() and not (ck / bad / "COMPLETE").exists()
    assert f"in step {k}" in (ck / bad / "DIVERGED").read_text()
    assert sorted(x.name for x in ck.iterdir() if x.is_dir()) == [good, bad]

    p = sample_latest(run, tmp_path / "g.png")
    assert p.returncode == 0 and (tmp_path / "g.png").is_file(), p.stderr[-2000:]
    assert [x for x in lines(p.stderr) if "skipped" in x] == [
        f"dsfast: skipped checkpoint {ck / bad} (its weights gave a non-finite prediction in step {k}); "
        f"using {ck / good}"]

    cfg["train"].update(lr=1e-4, max_steps=k)
    p = train(cfg, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {ck / good} at step {k - 2}" in p.stdout and (run / "final").is_dir()
    lr = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lr == [10.0] * (k - 2) + [1e-4] * 2  # the steps before the good checkpoint kept, the rest retrained


def test_sampling_weights_that_give_non_finite_images_is_an_error_not_a_black_grid(assets):
    from diffusers import DiffusionPipeline

    from dsfast.train.errors import ModelError
    from dsfast.train.sample import run_pipeline

    pipe = DiffusionPipeline.from_pretrained(str(assets / "model"))
    assert run_pipeline(pipe, 1, num_inference_steps=2).isfinite().all()
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("inf"))
    with pytest.raises(ModelError, match="non-finite images"):
        run_pipeline(pipe, 1, num_inference_steps=2)


def _can_mount_tmpfs() -> bool:
    p = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not _can_mount_tmpfs(),
                    reason="needs a private mount namespace (unshare -m) to mount a small tmpfs; the patched-writer "
                           "test above covers the same path")
def test_a_real_full_disk_is_one_line(assets, tmp_path):
    """The run folder on a 5 MB tmpfs: the second checkpoint fills it inside torch's C++ writer (a RuntimeError,
    not an OSError) and is still recognised as a full disk, its partial folder removed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    cfg = config(assets, mnt, sample_every=0, keep_last=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code = f"import sys\nfrom dsfast.train.cli import main\nsys.exit(main(['--config', '{tmp_path / 'run.yaml'}']))"
    script = (f"mount -t tmpfs -o size=5m tmpfs {mnt} && {sys.executable} -c \"{code}\"; rc=$?; "
              f"ls {mnt}/run/checkpoints; exit $rc")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    out = lines(p.stderr)
    assert len(out) == 1 and out[0].startswith(f"dsfast train: error: disk full: no space left on {mnt} "), out
    assert "step_00000004; it needs about" in out[0] and out[0].endswith("step_00000002")
    assert p.stdout.split() == ["latest", "step_00000002"]  # no partial step_00000004 left on the full disk
