"""``make gpu-wheels``: the wheels ``make gpu-check`` installs on a GPU machine that has no package index.

    python -m bench.gpu_wheels [--dest .whl]

The GPU image (Python 3.12, a CUDA torch with its Triton, transformers, peft, accelerate, numpy, scipy,
pytest: ``IMAGE``) lacks diffusers, DeepSpeed and PyWavelets. This writes to ``.whl/`` (ignored by git;
it travels with the tree, so it must stay small) the cp312 manylinux x86_64 wheels of dsfast's own and
``train`` dependencies plus PyWavelets (``roots()``) and of everything they need, by this
environment's package metadata, that is neither an ``IMAGE`` package nor a dependency of one
(``wheel_pins()``), each pinned to the version installed here. DeepSpeed ships only as a source
archive: its wheel is built here with ``DS_BUILD_OPS=0`` (its ops are compiled at first use).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
WHEELS_DIR = ROOT / ".whl"

# What the GPU image has; their dependencies (by this environment's metadata) are taken as there too,
# except those of NEWER: this environment's transformers (5.25) needs them, the image's (5.17) may not
# (typer brings pydantic, which DeepSpeed needs).
IMAGE = ("torch", "triton", "transformers", "peft", "accelerate", "numpy", "scipy", "pytest")
NEWER = ("typer", "kernels")
# Downloaded even where an IMAGE package depends on it, and installed with this bound (the image's may
# be newer): DeepSpeed imports pkg_resources, which setuptools 81 removed.
ALWAYS = {"setuptools": "<81"}
# Left out although a dependency asks for it.
SKIP = {"grpcio": "7 MiB; only TensorBoard's server and uploader import it, not SummaryWriter (the trainer's logger)"}
# Source-only on PyPI: built here into a wheel, with these environment variables.
BUILD = {"deepspeed": {"DS_BUILD_OPS": "0"}}
# The target: CPython 3.12 on manylinux x86_64 (pip does not widen a platform tag to older glibc
# versions, so each accepted tag is listed; pillow and PyWavelets have manylinux_2_28 wheels only).
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
MARKER_ENV = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({**MARKER_ENV, "extra": extra})


def roots() -> list[str]:
    """dsfast's requirements and those of its ``train`` extra, and PyWavelets (tests/test_ops.py, the
    bench), less the ``IMAGE`` packages."""
    reqs = [Requirement(r) for r in importlib.metadata.requires("dsfast") or []]
    names = {canonicalize_name(r.name) for r in reqs if _applies(r) or _applies(r, "train")} | {"pywavelets"}
    return sorted(names - {canonicalize_name(n) for n in IMAGE})


def closure(names, stop=()) -> dict[str, str]:
    """``names`` and their dependencies for the target, recursively, as installed here: name -> version.
    Dependencies of a ``stop`` package are not followed (nor is it listed)."""
    stop = {canonicalize_name(n) for n in stop}
    found, todo = {}, [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found or name in stop:
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"gpu-wheels: {name} is needed on the GPU machine but not installed here "
                             f"({sys.executable}): install dsfast's [test] extra (make install)") from None
        todo += [canonicalize_name(r.name) for r in map(Requirement, importlib.metadata.requires(name) or [])
                 if _applies(r)]
    return found


def wheel_pins() -> dict[str, str]:
    """name -> version of every wheel the GPU machine needs beyond its image."""
    on_image = set(closure(IMAGE, stop=NEWER))
    return {name: version for name, version in sorted(closure(roots(), stop=IMAGE).items())
            if name not in SKIP and not name.startswith("nvidia-") and (name in ALWAYS or name not in on_image)}


def download(dest: Path) -> list[Path]:
    pins = wheel_pins()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    binary = [f"{n}=={v}" for n, v in pins.items() if n not in BUILD]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary", ":all:", "--python-version", PYTHON,
                    "--implementation", "cp", "--abi", "cp" + PYTHON.replace(".", ""), *platforms,
                    "-d", str(dest), *binary], check=True)
    for name, env in BUILD.items():
        # --no-cache-dir: a cached wheel of the same version may have been built with other options
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", str(dest), f"{name}=={pins[name]}"],
                       check=True, env={**os.environ, **env})
    return sorted(dest.glob("*.whl"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_wheels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=WHEELS_DIR)
    args = ap.parse_args(argv)
    wheels = download(args.dest)
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"gpu-wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
