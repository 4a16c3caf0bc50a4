"""`python -m dsfast.demo` end to end at tiny settings (a tiny untrained source model, a few steps)."""
import json

import pytest

from dsfast import demo
from dsfast.train.testing import make_unconditional_pipeline


@pytest.mark.slow
@pytest.mark.drift
def test_demo_smoke(tmp_path):
    source = make_unconditional_pipeline(tmp_path / "source", sample_size=16, channels=1)
    out = tmp_path / "run"
    assert demo.main(["--out", str(out), "--source", str(source), "--steps", "2", "--checkpoints", "1",
                      "--seeds", "0,1", "--num-samples", "8", "--num-fresh", "40", "--sample-steps", "2",
                      "--sweep", "16"]) == 0
    for name in ("comparison.png", "curves.png", "loss_curves.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["checkpoint_steps"] == [2]
    for method in demo.METHODS:
        final = report["summary"][method]["2"]
        assert set(demo.SCALARS) <= set(final) and len(final["copy_rate"]["values"]) == 2  # two seeds
    assert set(report["sweep_lambda_image"]) == {"4", "16"}  # 4: the main run
    assert (out / "sweep.png").stat().st_size > 0
    assert report["baselines"]["training_set_copies"]["copy_rate"] == 1.0
    assert report["source"]["correspondence"] == 1.0
    # both runs went through the trainer with the demo's loss
    cfg = (out / "runs" / "domainstudio_seed0" / "config.yaml").read_text()
    assert "hfmse: 1.0" in cfg and "hfmse_weighting: min_snr" in cfg and "random_flip: false" in cfg
    assert "zero_stage: 0" in cfg
    # two at a time: each run's progress went to its own log, not the terminal
    assert "finetune" in (out / "runs" / "finetune_seed1.log").read_text()


def test_run_output_goes_to_its_log_at_the_descriptor_level(tmp_path, capfd):
    """A run's log takes what subprocesses write too (DeepSpeed's op checks start gcc/ld, whose errors about a
    missing libaio reached the demo's terminal through the inherited stderr)."""
    import subprocess
    import sys

    from dsfast.demo import output_to

    log = tmp_path / "run.log"
    with open(log, "w") as f, output_to(f):
        print("from python")
        print("to stderr", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a subprocess\\n')"], check=True)
    assert sorted(log.read_text().splitlines()) == ["from a subprocess", "from python", "to stderr"]
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""


def test_run_output_keeps_what_a_library_silences_out_of_the_log(tmp_path):
    """Inside output_to, a library that silences a child process by pointing ``sys.stderr.fileno()`` at a file (as
    DeepSpeed's op checks do around the linker that probes for libaio) keeps the child's errors out of the log."""
    import os
    import subprocess
    import sys

    from dsfast.demo import output_to

    log = tmp_path / "run.log"
    with open(log, "w") as f, output_to(f), open(os.devnull, "w") as devnull:
        saved = os.dup(sys.stderr.fileno())
        os.dup2(devnull.fileno(), sys.stderr.fileno())
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'ld: cannot find -laio\\n')"], check=True)
        os.dup2(saved, sys.stderr.fileno())
        os.close(saved)
        print("after the probe", file=sys.stderr)
    assert log.read_text() == "after the probe\n"


def test_moving_average_has_no_partial_first_window():
    import numpy as np

    ma, first = demo.moving_average(np.array([10.0, 0, 0, 0, 0]), 2)
    assert first == 1 and ma.tolist() == [5.0, 0.0, 0.0, 0.0]


def test_checkpoint_steps():
    assert demo.checkpoint_steps(600, 3) == [200, 400, 600]
    assert demo.checkpoint_steps(2, 4) == [1, 2]


def test_the_comparison_shows_the_sweeps_largest_lambda_image_from_the_same_noise():
    import torch

    one = {name: torch.full((4, 1, 2, 2), float(k)) for k, name in enumerate(("target", "source", "ft", "ds", "s1", "s16"))}
    rows = demo.comparison_rows(4.0, one["target"], one["source"], {"finetune": one["ft"], "domainstudio": one["ds"]},
                                {"1": one["s1"], "16": one["s16"]})
    assert list(rows) == ["training images (10)", "source model", "fine-tuned", "DomainStudio,\nλ_img 4",
                          "DomainStudio,\nλ_img 16"]
    assert rows["DomainStudio,\nλ_img 16"] is one["s16"] and rows["DomainStudio,\nλ_img 4"] is one["ds"]
    # a sweep below the main λ_img adds no row
    assert len(demo.comparison_rows(4.0, one["target"], one["source"], {"finetune": one["ft"], "domainstudio": one["ds"]},
                                    {"0": one["s1"]})) == 4


def test_sampling_a_model_prints_nothing(tmp_path, capfd):
    """The demo samples every model with ddim_samples: no "Loading pipeline components" bar per model."""
    from diffusers.utils import logging as diffusers_logging

    from dsfast.pretrain import ddim_samples

    source = make_unconditional_pipeline(tmp_path / "source", sample_size=8, channels=1, block_out_channels=(8, 16))
    capfd.readouterr()
    diffusers_logging.enable_progress_bar()  # as in a fresh process (another test may have turned it off)
    assert ddim_samples(source, 2, steps=2).shape == (2, 1, 8, 8)
    assert capfd.readouterr() == ("", "")
