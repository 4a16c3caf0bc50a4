"""make gpu-check's driver (bench/gpu_check.py) and make gpu-wheels' choice of wheels (bench/gpu_wheels.py),
without a GPU: the plan fits one device call, a CPU-only machine stops at the first GPU step with one
message and a report, a step past its timeout is killed and recorded, and the wheels cover what the
GPU image lacks and nothing it has."""
import json
import sys
import time

import pytest

from bench import gpu_check, gpu_wheels

KERNEL_TESTS = ["tests/test_ops.py"]


def fake_wheels(folder):
    folder.mkdir()
    for name in ("diffusers-0.42.1-py3-none-any.whl", "setuptools-80.10.2-py3-none-any.whl",
                 "py_cpuinfo-9.0.0-py3-none-any.whl"):
        (folder / name).write_bytes(b"")
    return folder


def python_step(name, code, timeout_s=30, needs_gpu=False):
    return gpu_check.Step(name, timeout_s, needs_gpu, [sys.executable, "-c", code])


def test_plan_fits_one_device_call(tmp_path):
    steps = gpu_check.plan("python3", tmp_path, KERNEL_TESTS, fake_wheels(tmp_path / "whl"), offline=True)
    assert [s.name for s in steps] == ["install", "build", "kernel-tests", "accuracy-canary", "train-t2i",
                                       "train-unconditional", "bench"]
    assert sum(s.timeout_s for s in steps) <= gpu_check.BUDGET_S <= 600 - 30
    assert sum(s.timeout_s for s in steps if s.name not in ("install", "build")) <= gpu_check.GPU_STEPS_BUDGET_S == 8 * 60
    assert [s.name for s in steps if not s.needs_gpu] == ["install"]
    for s in steps[2:4]:
        assert s.env == {"DSFAST_REQUIRE_BACKENDS": "cuda,triton"}
    assert steps[1].env == {"DSFAST_BUILD_CUDA": "1"}


def test_install_takes_every_wheel_by_name_without_dependencies(tmp_path):
    wheels = fake_wheels(tmp_path / "whl")
    argv = gpu_check.plan("python3", tmp_path, KERNEL_TESTS, wheels, offline=True)[0].argv
    assert argv[:6] == ["python3", "-m", "pip", "install", "-q", "--no-deps"]
    assert "--no-index" in argv and argv[argv.index("--find-links") + 1] == str(wheels)
    assert argv[-3:] == ["diffusers", "py-cpuinfo", "setuptools<81"]  # an installed version is kept, within bounds
    assert "--no-index" not in gpu_check.plan("python3", tmp_path, KERNEL_TESTS, wheels, offline=False)[0].argv


def test_no_wheels_is_one_error(tmp_path):
    (tmp_path / "whl").mkdir()
    with pytest.raises(SystemExit, match="no wheels in .*make gpu-wheels"):
        gpu_check.plan("python3", tmp_path, KERNEL_TESTS, tmp_path / "whl", offline=True)


def test_cpu_only_machine_stops_at_the_first_gpu_step(tmp_path, capsys):
    steps = [python_step("install", "print('installed')"),
             python_step("build", "raise SystemExit('must not run')", needs_gpu=True),
             python_step("bench", "raise SystemExit('must not run')", needs_gpu=True)]
    report_path = tmp_path / "out" / "report.json"
    assert gpu_check.run_check(steps, report_path, cuda_available=lambda: False) == 2
    err = capsys.readouterr().err
    message = ("gpu-check: no CUDA device (torch.cuda.is_available() is False); "
               "the steps from 'build' on need a GPU")
    assert message in err
    report = json.loads(report_path.read_text())
    assert report["stopped"] == message and report["ok"] is False and report["device"] is None
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("install", "pass"), ("build", "not run"),
                                                                   ("bench", "not run")]
    assert "installed" in report["steps"][0]["output_tail"]
    assert (tmp_path / "out" / "logs" / "install.log").read_text() == "installed\n"
    assert report["versions"]["torch"] and report["versions"]["python"]


@pytest.mark.slow
def test_a_step_past_its_timeout_is_killed_and_the_next_still_runs(tmp_path):
    # the child sleeps in a grandchild: the whole process group goes at the timeout
    sleeper = "import subprocess, sys; print('started', flush=True); subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    steps = [python_step("slow", sleeper, timeout_s=2), python_step("fails", "raise SystemExit(3)"),
             python_step("passes", "print('ok')")]
    start = time.monotonic()
    assert gpu_check.run_check(steps, tmp_path / "report.json", cuda_available=lambda: True) == 1
    assert time.monotonic() - start < 30
    report = json.loads((tmp_path / "report.json").read_text())
    slow, fails, passes = report["steps"]
    assert slow["status"] == "fail" and slow["timed_out"] and 2 <= slow["seconds"] < 10
    assert "started" in slow["output_tail"] and "killed after its timeout of 2 s" in slow["output_tail"]
    assert (fails["status"], fails["returncode"], fails["timed_out"]) == ("fail", 3, False)
    assert passes["status"] == "pass" and report["stopped"] is None and report["ok"] is False


def test_report_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DSFAST_GPU_CHECK_REPORT", raising=False)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.default_report() == tmp_path / "gpu-check" / "report.json"
    monkeypatch.setenv("DSFAST_GPU_CHECK_REPORT", str(tmp_path / "r.json"))
    assert gpu_check.default_report() == tmp_path / "r.json"
    monkeypatch.delenv("DSFAST_GPU_CHECK_REPORT")
    monkeypatch.delenv("OUT")
    assert gpu_check.default_report() == gpu_check.ROOT / "gpu-check" / "report.json"


def test_wheels_cover_what_the_image_lacks_and_nothing_it_has():
    pins = gpu_wheels.wheel_pins()
    # the packages the GPU image lacks and what DeepSpeed, diffusers and the trainer import from them
    assert {"diffusers", "deepspeed", "pywavelets", "tensorboard", "pillow", "hjson", "py-cpuinfo", "msgpack",
            "ninja", "einops", "pydantic", "pydantic-core", "setuptools"} <= set(pins)
    for name in pins:
        assert name not in {"torch", "triton", "transformers", "numpy", "scipy", "peft", "accelerate", "grpcio",
                            "huggingface-hub", "safetensors"} and not name.startswith("nvidia-"), name
    assert pins["deepspeed"] == "0.19.8"
    # every dependency of a wheel (for Python 3.12 on Linux) is a wheel too, on the image, or left out on purpose
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    on_image = gpu_wheels.closure(gpu_wheels.IMAGE, stop=gpu_wheels.NEWER)
    for name in pins:
        for req in map(Requirement, requires(name) or []):
            dep = canonicalize_name(req.name)
            if req.marker is None or req.marker.evaluate(gpu_wheels.MARKER_ENV):
                assert dep in pins or dep in on_image or dep in gpu_wheels.SKIP, f"{name} needs {dep}"
