"""Checkpoints: every rank saves, ``latest`` moves (atomic rename) only after a checkpoint is complete.

Layout: ``<run>/checkpoints/step_00000100/`` holds DeepSpeed's files (weights, optimizer,
LR schedule: every rank writes its shard), ``rng_rank<r>.pt`` per rank, ``ema.pt`` (rank 0)
and ``COMPLETE`` (written last). ``<run>/checkpoints/latest`` names the newest complete tag;
it is replaced with ``os.replace`` so it is never half-written. A save killed half-way leaves an
incomplete folder that resume ignores and a later save of the same step overwrites.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .errors import ConfigError, TrainingError

COMPLETE = "COMPLETE"


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


LOCK_NAME = ".dsfast-train.lock"


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


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        f = self.root / "latest"
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        d = self.root / tag
        if not (d / COMPLETE).is_file():
            raise RuntimeError(f"checkpoint {d} named by {f} is incomplete")
        return d

    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())

    def save(self, engine, step: int, *, ema=None) -> Path:
        tag = tag_of(step)
        d = self.root / tag
        if D.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if d.exists():  # a half-written save of this step from a killed run
                shutil.rmtree(d)
        D.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step},
                               save_latest=False)
        torch.save(rng_state(), d / f"rng_rank{D.rank()}.pt")
        maybe_kill(f"save:{step}")
        if D.rank() == 0 and ema is not None:
            tmp = d / "ema.pt.tmp"
            torch.save(ema.state_dict(), tmp)
            os.replace(tmp, d / "ema.pt")
        D.barrier()
        if D.rank() == 0:
            (d / COMPLETE).write_text(str(step))
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self._prune(keep=tag)
        D.barrier()
        return d

    def _prune(self, keep: str) -> None:
        tags = self.complete_tags()
        # incomplete folders older than the newest complete one are debris of killed saves
        for p in self.root.iterdir():
            if p.is_dir() and p.name != keep and not (p / COMPLETE).is_file() and p.name < keep:
                shutil.rmtree(p, ignore_errors=True)
        if self.keep_last > 0:
            for t in tags[:-self.keep_last]:
                if t != keep:
                    shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, engine, ckpt_dir: Path, *, ema=None) -> int:
        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / COMPLETE).is_file():
            raise RuntimeError(f"checkpoint {ckpt_dir} is incomplete (no {COMPLETE} marker)")
        _, client = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
        # A resumed run must continue exactly: state the checkpoint lacks is an error, not a silent restart.
        rng = ckpt_dir / f"rng_rank{D.rank()}.pt"
        if not rng.is_file():
            raise TrainingError(f"checkpoint {ckpt_dir} has no {rng.name}: the random state (dropout, draws) cannot "
                                "be restored; resume from another checkpoint")
        set_rng_state(torch.load(rng, weights_only=False))
        if ema is not None:
            if not (ckpt_dir / "ema.pt").is_file():
                raise TrainingError(f"checkpoint {ckpt_dir} has no ema.pt but the run keeps an EMA (train.ema): "
                                    "resume from a checkpoint that has it, or set train.ema=0")
            ema.load_state_dict(torch.load(ckpt_dir / "ema.pt", weights_only=False))
        return int(client["step"])


def read_weights(ckpt_dir: Path, zero3: bool) -> dict:
    """The trained module's full fp32 state dict in a complete checkpoint (one process, no engine), with the
    EMA weights in place of the trained ones when the run keeps an EMA (as its ``final/`` would hold)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise RuntimeError(f"checkpoint {ckpt_dir} is incomplete (no {COMPLETE} marker)")
    if zero3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        sd = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    if (ckpt_dir / "ema.pt").is_file():
        sd.update(torch.load(ckpt_dir / "ema.pt", map_location="cpu", weights_only=False)["params"])
    return sd
