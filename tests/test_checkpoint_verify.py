"""Which checkpoint counts: ``COMPLETE`` lists every file with its size; anything short of that is passed over
with its reason (the trainer-level cases are in test_train_faults.py)."""
import errno
import json

import pytest

from dsfast.train.checkpoint import COMPLETE, DIVERGED, CheckpointManager, is_disk_full, problem


def make(root, step, files=None, complete=True):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": b"x" * 100, "rng_rank0.pt": b"y" * 10, "ema.pt": b"z" * 30}
    for name, data in files.items():
        (d / name).write_bytes(data)
    if complete:
        listed = {name: len(data) for name, data in files.items()}
        (d / COMPLETE).write_text(json.dumps({"step": step, "logs": {}, "files": listed}))
    return d


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 50), "is 50 bytes, the save wrote 100"),
    (lambda d: (d / "ema.pt").write_bytes(b""), "ema.pt is 0 bytes"),
    (lambda d: (d / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    (lambda d: (d / COMPLETE).unlink(), f"no {COMPLETE} marker"),
    (lambda d: (d / COMPLETE).write_text("{not json"), f"{COMPLETE} is unreadable"),
    (lambda d: ((d / DIVERGED).write_text("its weights gave a non-finite prediction in step 4\n"),
                (d / COMPLETE).unlink()), "non-finite prediction in step 4"),
])
def test_a_damaged_checkpoint_names_its_problem(tmp_path, damage, reason):
    d = make(tmp_path, 3)
    assert problem(d) is None
    damage(d)
    assert reason in problem(d)


def test_a_checkpoint_from_before_the_file_list_still_counts(tmp_path):
    d = make(tmp_path, 2, complete=False)
    (d / COMPLETE).write_text("2")  # what COMPLETE held before it listed the files
    assert problem(d) is None


def test_latest_passes_over_newer_bad_folders_in_one_line(tmp_path):
    said = []
    ckpts = CheckpointManager(tmp_path, keep_last=0, report=said.append)
    make(tmp_path, 2)
    make(tmp_path, 4)
    (make(tmp_path, 6) / "ema.pt").write_bytes(b"")
    make(tmp_path, 8, complete=False)
    assert ckpts.latest() == tmp_path / "step_00000004"
    assert len(said) == 1 and "step_00000008 (no COMPLETE" in said[0] and "step_00000006 (ema.pt is 0 bytes" in said[0]
    assert said[0].endswith(f"using {tmp_path / 'step_00000004'}")
    assert ckpts.complete_tags() == ["step_00000002", "step_00000004"]
    assert ckpts.latest(quiet=True) == tmp_path / "step_00000004" and len(said) == 1


def test_a_full_disk_is_recognised_through_the_writer_error(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(full, tmp_path)
    try:  # torch's C++ writer wraps it in a RuntimeError
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer, tmp_path)
    assert not is_disk_full(RuntimeError("some other failure"), tmp_path)  # this disk has space
