"""The repository does not shadow what is installed.

A Python started in the repository root (``python -c``, ``python -m pytest``, ``python -m dsfast.demo``)
has the root first on ``sys.path``, so a top-level regular package or module of the repository named like
an installed distribution's top-level module replaces it for everything that imports it. That happened:
transformers imports Hugging Face's ``kernels`` when diffusers loads peft or ``AutoencoderKL``, and our
``kernels/`` folder (then a regular package) broke the demo and most tests on a fresh machine. The Triton
kernels now live in ``kernels/`` without an ``__init__.py`` and are imported as ``dsfast.kernels``.
"""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.drift


def _repo_top_level_names() -> dict[str, Path]:
    """Every name the repository root offers to ``import``: folders (packages or namespace portions) and .py files."""
    names = {}
    for p in ROOT.iterdir():
        if p.name.startswith(".") or p.name.endswith(".egg-info"):
            continue
        if p.is_dir() and p.name.isidentifier():
            names[p.name] = p
        elif p.suffix == ".py" and p.stem.isidentifier():
            names[p.stem] = p
    return names


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter whose working directory (first on sys.path) is the repository root."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_top_level_name_shadows_an_installed_module():
    """For every top-level name of the repository that an installed distribution (other than dsfast) or the
    standard library also provides, ``import <name>`` from the root must find the installed one."""
    installed = {name: dists for name, dists in importlib.metadata.packages_distributions().items()
                 if "dsfast" not in dists}
    clashes = {n: p for n, p in _repo_top_level_names().items() if n in installed or n in sys.stdlib_module_names}
    code = ("import importlib.util, json, sys; "
            f"print(json.dumps({{n: getattr(importlib.util.find_spec(n), 'origin', None) for n in {sorted(clashes)!r}}}))")
    p = _run_from_root(code)
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    shadowed = {n: origin for n, origin in found.items()
                if origin is not None and Path(origin).resolve().is_relative_to(clashes[n].resolve())}
    assert not shadowed, (f"repository names shadow installed modules when Python runs from {ROOT}: {shadowed} "
                          f"(installed by {[installed.get(n) for n in shadowed]})")


def test_repository_packages_have_no_installed_namesake():
    """The static form of the rule, for what is installed now and for what may be installed later: no top-level
    regular package or module of the repository has the name of an installed top-level module.
    (``kernels/`` is a folder without ``__init__.py``: at most a namespace portion, which never shadows.)"""
    installed = {name for name, dists in importlib.metadata.packages_distributions().items() if "dsfast" not in dists}
    regular = {n for n, p in _repo_top_level_names().items()
               if (p.is_dir() and (p / "__init__.py").is_file()) or p.is_file()}
    assert not regular & (installed | set(sys.stdlib_module_names))
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must not become a regular package again"


@pytest.mark.slow  # a fresh interpreter imports diffusers and peft (~10 s)
def test_diffusers_peft_and_vae_import_from_the_repository_root():
    """The path that broke: diffusers' peft loader and AutoencoderKL pull in transformers' hub-kernels
    integration, which imports the installed ``kernels``; and dsfast's own Triton kernels still import."""
    p = _run_from_root(
        "import diffusers.loaders.peft, peft\n"
        "from diffusers import AutoencoderKL\n"
        "AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)\n"
        "import dsfast.kernels.pairwise_similarity_kl, dsfast.ops\n"
        "print('ok')")
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@pytest.mark.slow
def test_wheel_ships_the_kernels_as_dsfast_kernels(tmp_path):
    """A built wheel (not the editable install) holds ``dsfast.kernels`` with its ``__init__`` and every kernel
    module, and no top-level ``kernels``; installed alone it imports from anywhere."""
    env = {**__import__("os").environ, "DSFAST_BUILD_EXT": "0"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("dsfast-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_modules = {f"dsfast/kernels/{f.name}" for f in (ROOT / "kernels").glob("*.py")}
    assert {"dsfast/kernels/__init__.py", *kernel_modules} <= names
    assert not any(n.startswith("kernels/") for n in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    p = subprocess.run([sys.executable, "-c", "import dsfast.kernels as k, dsfast.kernels.haar_dwt2 as h; "
                        "print(k.__file__, h.__file__)"], cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path / "site")},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(Path(f).is_relative_to(tmp_path / "site") for f in p.stdout.split()), p.stdout
