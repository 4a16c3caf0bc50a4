"""Checkpoints: every rank saves, a checkpoint counts only once it is complete and verified.

Layout: ``<run>/checkpoints/step_00000100/`` holds DeepSpeed's files (weights, optimizer,
LR schedule: every rank writes its shard), ``rng_rank<r>.pt`` per rank, ``ema.pt`` (rank 0)
and ``COMPLETE``, written last: the step, the logged metrics of that step and the size of every file
of the folder. ``<run>/checkpoints/latest`` names the newest complete tag (replaced with ``os.replace``,
never half-written). Which checkpoint to resume or sample from is decided by verifying: the newest
folder whose ``COMPLETE`` lists files that are all there at their recorded sizes (a save killed
half-way, a truncated or emptied file, a missing file) is chosen, and each newer folder skipped is
named with the reason. A save killed half-way leaves an incomplete folder that a later save of the
same step, or the next save, removes.

Non-finite weights are never saved. A checkpoint whose weights give a non-finite prediction at the
next step is marked ``DIVERGED`` (its ``COMPLETE`` removed) so that nothing resumes or samples from
it, and older checkpoints are pruned (``keep_last``) only once the newest one has passed that test.
A write that fails (a full disk) removes the partial folder and stops with one line.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .errors import ConfigError, NonFiniteLoss, TrainingError
from .models import zero0_masters

COMPLETE = "COMPLETE"
DIVERGED = "DIVERGED"
LOCK_NAME = ".dsfast-train.lock"
MiB = 2**20


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def maybe_kill(point: str) -> None:
    """Test hook: ``DSFAST_TEST_KILL=<point>`` SIGKILLs this process (rank 0 only) at that point."""
    want = os.environ.get("DSFAST_TEST_KILL")
    if want and want == point and D.rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """The RNG states of this process: torch's CPU one, on a GPU the current device's, Python's and numpy's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def check_output_dir(run_dir: Path) -> None:
    """``run_dir`` can become this run's folder: it is a folder or does not exist yet, under a folder (checked
    before any model is loaded, so a bad ``output_dir`` costs no time and writes nothing)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a folder")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir {run_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {run_dir}: no permission to write in {existing}")


def lock_output_dir(run_dir: Path):
    """Create ``run_dir`` and take an exclusive lock on ``run_dir/.dsfast-train.lock`` for this run: the open
    file (close it to release; the OS releases it when the process ends, killed or not), or None when another
    process holds it (two runs in one folder would write every metric twice and overwrite each other's
    checkpoints and final weights)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


# ----------------------------------------------------------------------------- a full disk

def _mount_of(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` (or an error it came from) is a full disk or quota at ``path``. torch.save reports a
    full disk as a RuntimeError of its C++ writer ("file write failed", "unexpected pos"), so an error
    while the file system at ``path`` has (almost) no space left counts too."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(_mount_of(path)).free < MiB
    except OSError:
        return False


def disk_full_message(path: Path, what: str, needed: int | None) -> str:
    """One line: the file system that is full, its free space and about how much ``what`` needs."""
    mount = _mount_of(path)
    free = shutil.disk_usage(mount).free
    need = f"; it needs about {needed / MiB:.1f} MiB" if needed else ""
    return f"disk full: no space left on {mount} ({free / MiB:.1f} MiB free) while writing {what}{need}"


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- checkpoints

def _finite(engine, ema) -> bool:
    """Whether this rank's trained weights (its ZeRO-3 shard) and the EMA are finite."""
    tensors = [getattr(p, "ds_tensor", p) for p in engine.module.parameters() if p.requires_grad]
    if ema is not None:
        tensors += list(ema.state_dict()["params"].values())
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors if t.numel())


def problem(d: Path) -> str | None:
    """Why the checkpoint folder ``d`` cannot be used, or None when it holds what its ``COMPLETE`` lists."""
    d = Path(d)
    if (d / DIVERGED).is_file():
        return (d / DIVERGED).read_text().strip()
    if not d.is_dir():
        return "no such folder"
    if not (d / COMPLETE).is_file():
        return f"no {COMPLETE} marker (its save did not finish)"
    try:
        manifest = json.loads((d / COMPLETE).read_text())
    except ValueError:
        return f"{COMPLETE} is unreadable"
    if not isinstance(manifest, dict):  # the plain step number of checkpoints written before the file list
        return None
    for name, size in manifest["files"].items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, the save wrote {size} (truncated or changed)"
    return None


def manifest(d: Path) -> dict:
    """What ``COMPLETE`` holds besides the file list (the step, the logged metrics of that step)."""
    data = json.loads((Path(d) / COMPLETE).read_text())
    return data if isinstance(data, dict) else {"step": int(data)}


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, report=None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.report = report  # called with one line per checkpoint passed over (None: silent)
        self.unconfirmed: str | None = None  # the newest save whose weights have not passed a step yet
        self._skipped: list[str] = []  # what the last latest() passed over

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")),
                      key=lambda p: p.name)

    def complete_tags(self) -> list[str]:
        return [p.name for p in self._folders() if problem(p) is None]

    def latest(self, quiet: bool = False) -> Path | None:
        """The newest checkpoint that verifies. Newer folders passed over are reported in one line when one is
        found (unless ``quiet``); when none is, :meth:`passed_over` says why for the caller's error."""
        self._skipped = []
        for d in reversed(self._folders()):
            why = problem(d)
            if why is None:
                if self._skipped and self.report is not None and not quiet:
                    self.report(f"dsfast: skipped {'; '.join(self._skipped)}; using {d}")
                return d
            self._skipped.append(f"checkpoint {d} ({why})")
        return None

    def passed_over(self) -> str:
        """The folders the last :meth:`latest` passed over, as the end of an error message (empty if none)."""
        return f" (passed over: {'; '.join(self._skipped)})" if self._skipped else ""

    def save(self, engine, step: int, *, ema=None, logs: dict | None = None) -> Path:
        """Write checkpoint ``step`` (every rank); ``logs`` (that step's metrics) go into ``COMPLETE``."""
        tag = tag_of(step)
        d = self.root / tag
        if D.any_flag(not _finite(engine, ema)):
            raise NonFiniteLoss(f"non-finite weights after step {step} (not saved)")
        if D.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if d.exists():  # a half-written save of this step from a killed run
                shutil.rmtree(d)
        D.barrier()
        failed = None
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
            torch.save(rng_state(), d / f"rng_rank{D.rank()}.pt")
            maybe_kill(f"save:{step}")
            if D.rank() == 0 and ema is not None:
                tmp = d / "ema.pt.tmp"
                torch.save(ema.state_dict(), tmp)
                os.replace(tmp, d / "ema.pt")
            maybe_kill(f"save-ema:{step}")
        except Exception as exc:  # noqa: BLE001 - a failed write on any rank: the folder goes, one line says why
            failed = exc
        if D.any_flag(failed is not None):
            self._fail(d, failed, f"checkpoint {d}")
        D.barrier()
        if D.rank() == 0:
            files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
            try:
                _write_atomic(d / COMPLETE, json.dumps({"step": step, "logs": logs or {}, "files": files}))
                maybe_kill(f"save-complete:{step}")
                _write_atomic(self.root / "latest", tag)
            except OSError as exc:
                failed = exc
        if D.any_flag(failed is not None):
            self._fail(d, failed, f"checkpoint {d}")
        if D.rank() == 0:
            self.unconfirmed = tag
            # the newest is not confirmed yet: keep one more until it is (keep_last 0 keeps all)
            self._prune(keep=tag, keep_last=self.keep_last + 1 if self.keep_last else 0)
        D.barrier()
        return d

    def _fail(self, d: Path, exc: BaseException | None, what: str):
        """A failed save on some rank: the partial folder is removed, every rank raises one line."""
        written = folder_bytes(d) if d.is_dir() else 0
        if D.rank() == 0:
            shutil.rmtree(d, ignore_errors=True)
            self._point_latest()
        D.barrier()
        newest = self.latest(quiet=True)
        if exc is not None and is_disk_full(exc, d):
            # the size of the previous checkpoint, else a lower bound: what this one wrote before the disk filled
            msg = disk_full_message(d, what, folder_bytes(newest) if newest else written)
        else:
            msg = f"could not write {what} ({_first_line(exc) if exc is not None else 'it failed on another rank'})"
        raise TrainingError(f"{msg}; the partial checkpoint was removed; the last good checkpoint is "
                            f"{newest if newest else '(none saved yet)'}")

    def _point_latest(self) -> None:
        """``latest`` names the newest checkpoint that verifies (or is removed when none does). It is a pointer
        for people and tools: dsfast chooses by verifying, so a full disk that stops this write changes nothing."""
        newest = self.latest(quiet=True)
        try:
            if newest is not None:
                _write_atomic(self.root / "latest", newest.name)
            else:
                (self.root / "latest").unlink(missing_ok=True)
        except OSError:
            (self.root / "latest.tmp").unlink(missing_ok=True)

    def confirm(self) -> None:
        """The newest checkpoint's weights just gave a finite step: older ones beyond ``keep_last`` may go."""
        if self.unconfirmed is not None and D.rank() == 0:
            self._prune(keep=self.unconfirmed, keep_last=self.keep_last)
        self.unconfirmed = None

    def diverged(self, step: int) -> None:
        """The weights of checkpoint ``step`` (if one was saved) gave a non-finite prediction: mark it so that
        nothing resumes or samples from it, and point ``latest`` at the newest good one."""
        d = self.root / tag_of(step)
        if D.rank() == 0 and (d / COMPLETE).is_file():
            (d / DIVERGED).write_text(f"its weights gave a non-finite prediction in step {step + 1}\n")
            (d / COMPLETE).unlink()
            self._point_latest()
        self.unconfirmed = None
        D.barrier()

    def _prune(self, keep: str, keep_last: int) -> None:
        tags = self.complete_tags()
        # folders older than the newest checkpoint that do not verify are debris of killed or damaged saves
        # (a DIVERGED one stays for inspection until a resumed run saves its step again)
        for p in self._folders():
            if p.name < keep and p.name not in tags and not (p / DIVERGED).is_file():
                shutil.rmtree(p, ignore_errors=True)
        if keep_last > 0:
            for t in tags[:-keep_last]:
                if t != keep:
                    shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, engine, ckpt_dir: Path, *, ema=None) -> tuple[int, dict]:
        """Restore a verified checkpoint into ``engine`` (and ``ema``); (its step, the metrics logged at it)."""
        ckpt_dir = Path(ckpt_dir)
        why = problem(ckpt_dir)
        if why is not None:
            raise TrainingError(f"checkpoint {ckpt_dir} cannot be resumed: {why}")
        try:
            _, client = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        except Exception as exc:  # noqa: BLE001 - any reader error of a damaged file is the same one line
            raise TrainingError(f"checkpoint {ckpt_dir} could not be read: {_first_line(exc)}") from None
        if client is None:
            raise TrainingError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
        # A resumed run must continue exactly: state the checkpoint lacks is an error, not a silent restart.
        rng = ckpt_dir / f"rng_rank{D.rank()}.pt"
        if not rng.is_file():
            raise TrainingError(f"checkpoint {ckpt_dir} has no {rng.name}: the random state (dropout, draws) cannot "
                                "be restored; resume from another checkpoint")
        set_rng_state(_load(rng))
        if ema is not None:
            if not (ckpt_dir / "ema.pt").is_file():
                raise TrainingError(f"checkpoint {ckpt_dir} has no ema.pt but the run keeps an EMA (train.ema): "
                                    "resume from a checkpoint that has it, or set train.ema=0")
            ema.load_state_dict(_load(ckpt_dir / "ema.pt"))
        return int(client["step"]), manifest(ckpt_dir).get("logs", {})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _load(path: Path, **kw):
    try:
        return torch.load(path, weights_only=False, **kw)
    except Exception as exc:  # noqa: BLE001 - a damaged file is one line naming it
        raise TrainingError(f"{path} could not be read: {_first_line(exc)}") from None


def _zero_fp32_weights(ckpt_dir: Path) -> dict:
    """The float32 weights DeepSpeed's ZeRO-1/2/3 optimizer states in ``ckpt_dir`` hold (its zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    except Exception as exc:  # noqa: BLE001
        raise TrainingError(f"checkpoint {ckpt_dir} could not be read: {_first_line(exc)}") from None


def read_weights(ckpt_dir: Path, zero_stage: int, trained: list[tuple[str, torch.Tensor]]) -> dict:
    """The trained module's full fp32 state dict in a verified checkpoint (one process, no engine), with the
    EMA weights in place of the trained ones when the run keeps an EMA (as its ``final/`` would hold).
    ``trained``: ``(name, parameter)`` of the parameters the run trains, in the order the engine took them. A
    bf16/fp16 run's module state holds 16-bit copies of them: their float32 master weights are read from the
    optimizer's state instead (as the run's ``final/`` holds them)."""
    ckpt_dir = Path(ckpt_dir)
    why = problem(ckpt_dir)
    if why is not None:
        raise TrainingError(f"checkpoint {ckpt_dir} cannot be used: {why}")
    if zero_stage == 3:
        sd = _zero_fp32_weights(ckpt_dir)
    else:
        # mapped, not read: only the tensors taken are (the file also holds the optimizer state at ZeRO-0)
        states = _load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True)
        sd = states["module"]
        if any(sd[n].dtype != torch.float32 for n, _ in trained):
            if zero_stage == 0:
                sd.update(zip((n for n, _ in trained), zero0_masters(states["optimizer"], [p for _, p in trained])))
            else:
                sd.update(_zero_fp32_weights(ckpt_dir))
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    if (ckpt_dir / "ema.pt").is_file():
        sd.update(_load(ckpt_dir / "ema.pt", map_location="cpu")["params"])
    return sd
