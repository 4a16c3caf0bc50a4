"""``make gpu-check``: what only a GPU can check, in one device call of at most ``BUDGET_S`` seconds.

    python -m bench.gpu_check --kernel-tests tests/... [--offline] [--report PATH]

Steps, each a subprocess with its own timeout (``plan``); the JSON report is rewritten after each:

    install              the wheels of .whl/ (``make gpu-wheels``) the machine lacks, by name and without
                         dependencies: the image's torch and Triton are never replaced
    build                dsfast with its CUDA extension (DSFAST_BUILD_CUDA=1, no build isolation)
    kernel-tests         the kernel tests on the GPU (``--kernel-tests``, the files of ``make test-gpu``)
                         with DSFAST_REQUIRE_BACKENDS=cuda,triton
    accuracy-canary      test_pairwise_large_samples on the GPU: fp32 at 3x1024x1024 per sample, N = 3
    train-t2i            10 DomainStudio steps, ZeRO-2, bf16, through dsfast.train.train, on a tiny
    train-unconditional  Stable Diffusion pipeline and on a tiny UNet2DModel (dsfast.train.testing)
    bench                the GPU headline row of bench.run --suite gpu (N=16, 3x256x256, fp32, fused hf-KL)

Without a CUDA device it stops before the first step that needs one, says so, and exits 2 (the report
holds the steps done); a failed step does not stop the later ones; any failure exits 1.
Report: ``--report``, else $DSFAST_GPU_CHECK_REPORT, else ``$OUT/gpu-check/report.json`` where $OUT is
set (the device machine's folder that comes back), else ``gpu-check/report.json``; each step's whole
output is in ``logs/<step>.log`` next to it, the training runs and the bench results in ``train-*/`` and
``bench/``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import parse_wheel_filename

from bench.gpu_wheels import ALWAYS, WHEELS_DIR

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 570  # one device call is at most 600 s
GPU_STEPS_BUDGET_S = 480  # the GPU steps (all but install and build)
TAIL_CHARS = 3000
VERSIONS = ("torch", "triton", "diffusers", "deepspeed", "transformers", "peft", "accelerate", "numpy",
            "PyWavelets", "pydantic", "setuptools", "dsfast")


@dataclass
class Step:
    name: str
    timeout_s: int
    needs_gpu: bool
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def install_requirements(wheels_dir: Path) -> list[str]:
    """One requirement per wheel in ``wheels_dir``: its name (an installed version is kept), with the
    bound of ``ALWAYS`` where there is one."""
    names = sorted({str(parse_wheel_filename(w.name)[0]) for w in wheels_dir.glob("*.whl")})
    if not names:
        raise SystemExit(f"gpu-check: no wheels in {wheels_dir}: run `make gpu-wheels` where there is a package index")
    return [name + ALWAYS.get(name, "") for name in names]


def plan(python: str, out_dir: Path, kernel_tests: list[str], wheels_dir: Path, offline: bool) -> list[Step]:
    pip = [python, "-m", "pip", "install", "-q", "--no-deps"]
    gpu_tests = {"DSFAST_REQUIRE_BACKENDS": "cuda,triton"}
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return [
        Step("install", 45, False, [*pip, *(["--no-index"] if offline else []), "--find-links", str(wheels_dir),
                                    *install_requirements(wheels_dir)]),
        Step("build", 105, True, [*pip, "--no-index", "--no-build-isolation", "-e", str(ROOT)], {"DSFAST_BUILD_CUDA": "1"}),
        Step("kernel-tests", 180, True, [*pytest, *kernel_tests], gpu_tests),
        Step("accuracy-canary", 30, True, [*pytest, "tests/test_ops.py", "-k", "test_pairwise_large_samples and cuda"], gpu_tests),
        *(Step(f"train-{kind}", timeout, True,
               [python, "-c", f"from bench.gpu_check import train_tiny; train_tiny({kind!r}, {str(out_dir / f'train-{kind}')!r})"],
               {"TQDM_DISABLE": "1"})  # no progress bars in the output tail
          for kind, timeout in (("t2i", 90), ("unconditional", 60))),  # the first run compiles DeepSpeed's FusedAdam
        Step("bench", 60, True, [python, "-m", "bench.run", "--suite", "gpu", "--ops", "hf_pairwise_similarity_kl",
                                 "--n", "16", "--shapes", "3x256x256", "--dtypes", "fp32", "--time-budget", "40",
                                 "--results-dir", str(out_dir / "bench"), "--readme", str(out_dir / "bench" / "README.md")]),
    ]


def train_tiny(kind: str, work_dir: str) -> None:
    """10 DomainStudio steps, ZeRO-2, bf16, through :func:`dsfast.train.train` on a tiny pipeline built
    in ``work_dir`` (``kind``: ``t2i`` or ``unconditional``); raises unless every step logged a finite
    loss and the GPU held the model."""
    import torch

    from dsfast.train import train
    from dsfast.train.testing import sd_run_inputs, tiny_config, unconditional_run_inputs

    root = Path(work_dir)
    over = {"train__max_steps": 10, "train__mixed_precision": "bf16", "deepspeed__zero_stage": 2}
    if kind == "t2i":
        sd_run_inputs(root)
        over |= {"data__instance_prompt": "a sks dog", "data__class_prompt": "a dog", "data__num_class_images": 3}
    else:
        unconditional_run_inputs(root)
    run = train(tiny_config(root, root / "model", root / "imgs", **over))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if [r["step"] for r in rows] != list(range(1, 11)) or not all(math.isfinite(r["loss"]) for r in rows):
        raise RuntimeError(f"expected a finite loss at steps 1..10 in {run / 'metrics.jsonl'}, got {rows}")
    if not torch.cuda.is_available() or torch.cuda.max_memory_allocated() == 0:
        raise RuntimeError("the run allocated no CUDA memory")
    print(f"train-{kind}: 10 steps, loss {rows[0]['loss']:.4g} -> {rows[-1]['loss']:.4g}, "
          f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def run_step(step: Step, log: Path) -> dict:
    """Runs ``step`` in its own process group (killed whole at the timeout), its output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **step.env})
        try:
            returncode, timed_out = proc.wait(timeout=step.timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode, timed_out = proc.wait(), True
    output = log.read_text(errors="replace")
    if timed_out:
        output += f"\ngpu-check: {step.name} killed after its timeout of {step.timeout_s} s\n"
    return {"status": "pass" if returncode == 0 and not timed_out else "fail",
            "seconds": round(time.monotonic() - start, 1), "returncode": returncode, "timed_out": timed_out,
            "log": str(log), "output_tail": output[-TAIL_CHARS:]}


def versions() -> dict[str, str | None]:
    importlib.invalidate_caches()  # the install step has added distributions
    found = {"python": platform.python_version()}
    for dist in VERSIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def run_check(steps: list[Step], report_path: Path, cuda_available) -> int:
    """Runs ``steps`` in order, rewriting the report after each; 0 if all passed, 2 if it stopped at a
    step that needs a GPU (``cuda_available()`` false), else 1."""
    import torch

    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": None, "cuda": torch.version.cuda, "stopped": None, "ok": False, "versions": versions(),
              "steps": [{"name": s.name, "status": "not run", "timeout_s": s.timeout_s, "needs_gpu": s.needs_gpu,
                         "command": s.argv, "env": s.env} for s in steps]}
    report_path.parent.mkdir(parents=True, exist_ok=True)

    def write():
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    write()
    for i, (step, entry) in enumerate(zip(steps, report["steps"])):
        if step.needs_gpu:
            if not cuda_available():
                report["stopped"] = (f"gpu-check: no CUDA device (torch.cuda.is_available() is False); "
                                     f"the steps from {step.name!r} on need a GPU")
                break
            report["device"] = report["device"] or torch.cuda.get_device_name(0)
        print(f"gpu-check: [{i + 1}/{len(steps)}] {step.name} (timeout {step.timeout_s} s) ...", flush=True)
        entry.update(run_step(step, report_path.parent / "logs" / f"{step.name}.log"))
        print(f"gpu-check: {step.name}: {entry['status']} in {entry['seconds']} s", flush=True)
        if entry["status"] != "pass":
            print("\n".join(entry["output_tail"].splitlines()[-25:]), flush=True)
        report["versions"] = versions()
        write()
    report["ok"] = report["stopped"] is None and all(e["status"] == "pass" for e in report["steps"])
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write()
    failed = [e["name"] for e in report["steps"] if e["status"] == "fail"]
    if failed:
        print(f"gpu-check: failed: {', '.join(failed)}", file=sys.stderr)
    if report["stopped"]:
        print(report["stopped"], file=sys.stderr)
    print(f"gpu-check: report: {report_path}", flush=True)
    if report["ok"]:
        print("gpu-check: all steps passed", flush=True)
        return 0
    return 2 if report["stopped"] else 1


def default_report() -> Path:
    if os.environ.get("DSFAST_GPU_CHECK_REPORT"):
        return Path(os.environ["DSFAST_GPU_CHECK_REPORT"])
    return Path(os.environ.get("OUT") or ROOT) / "gpu-check" / "report.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel-tests", nargs="+", required=True, help="the test files of the kernel-tests step")
    ap.add_argument("--offline", action="store_true", help="install from the wheels folder only (pip --no-index)")
    ap.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="the folder of make gpu-wheels (default .whl)")
    ap.add_argument("--report", type=Path, default=None, help="the JSON report (default: see above)")
    args = ap.parse_args(argv)
    report = (args.report or default_report()).resolve()
    steps = plan(sys.executable, report.parent, args.kernel_tests, args.wheels.resolve(), args.offline)
    import torch

    return run_check(steps, report, torch.cuda.is_available)


if __name__ == "__main__":
    sys.exit(main())
