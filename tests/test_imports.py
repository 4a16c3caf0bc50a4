"""Imports go one way: no cycle among dsfast's modules, the trainer's layers only import downwards,
and every module imports alone in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dsfast

ROOT = Path(dsfast.__file__).parent

# dsfast.train, bottom to top: a module may import only from lower layers (or its own methods/ package).
TRAIN_LAYERS = [
    {"errors", "distributed", "diffusion", "schema"},
    {"ds_config"},
    {"data", "testing"},
    {"families"},
    {"models"},
    {"checkpoint"},
    {"sample"},
    {"methods"},
    {"config"},
    {"engine"},
    {"cli", "dreambooth_cli", "__init__"},
    {"config_doc", "__main__"},
]


def _modules() -> dict[str, Path]:
    """Every module of dsfast and its source, found on disk (importing nothing): dsfast/ and the Triton kernels
    of the top-level kernels/ folder, installed as ``dsfast.kernels``."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT.parent / "kernels").glob("*.py")):
        mods[f"dsfast.kernels.{path.stem}"] = path
    return mods


def _top_level_imports(tree):
    """Import statements executed at import time (module body, also inside top-level if/try)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                stack.extend(h.body)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in mods:
                    deps.add(f"{base}.{a.name}")
                elif base in mods:
                    deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def _layer(name: str) -> int:
    short = name.removeprefix("dsfast.train").lstrip(".") or "__init__"
    short = short.split(".")[0]
    return next(i for i, layer in enumerate(TRAIN_LAYERS) if short in layer)


def test_train_layers_import_downwards():
    graph = _graph()
    for src, deps in graph.items():
        if not src.startswith("dsfast.train"):
            continue
        for dst in deps:
            if not dst.startswith("dsfast.train") or dst == "dsfast.train":
                continue
            same_package = any(src.startswith(f"dsfast.train.{p}") and dst.startswith(f"dsfast.train.{p}")
                               for p in ("methods", "families"))
            assert same_package or _layer(dst) < _layer(src), f"{src} imports {dst} (a layer above or beside it)"


@pytest.mark.slow
@pytest.mark.drift
def test_each_module_imports_alone():
    """A fresh interpreter per module (4 at a time), started in the repository root (what a user of a clone
    does; the root is first on sys.path): a cycle hidden by import order, or a module that an installed
    package's import breaks, shows up here.

    Any ``dsfast.train`` module first runs the package's ``__init__``, which imports every layer (through
    the engine), so one of them stands for all (each costs a full DeepSpeed + diffusers import)."""
    names = [m for m in _modules() if not m.startswith("dsfast.train.")] + ["dsfast.train.errors"]
    pending, running, failed = names, {}, {}
    while pending or running:
        while pending and len(running) < 4:
            m = pending.pop()
            running[m] = subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT.parent,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        m, p = next(iter(running.items()))
        _, err = p.communicate(timeout=600)
        del running[m]
        if p.returncode:
            failed[m] = err.strip().splitlines()[-1:]
    assert not failed, failed
