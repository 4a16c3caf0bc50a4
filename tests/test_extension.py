"""dsfast._C at first use: the sources are found, the cache is per environment, a missing compiler is one clear error."""
import sys

import pytest
import torch

from dsfast import _extension


def test_sources_found():
    root = _extension.sources_root()
    assert root is not None
    files = _extension.source_files(root, with_cuda=False)
    assert files[0] == "bindings.cpp" and any(f.startswith("cpu/") for f in files)
    assert not any(f.startswith("cuda/") for f in files)
    assert any(f.endswith(".cu") for f in _extension.source_files(root, with_cuda=True))


def test_cache_is_per_environment_and_torch(monkeypatch, tmp_path):
    monkeypatch.delenv("DSFAST_EXTENSIONS_DIR", raising=False)
    a = _extension.cache_dir(False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    b = _extension.cache_dir(False)
    assert a != b and a.parent == b.parent
    assert torch.__version__ in a.name and f"py{sys.version_info[0]}.{sys.version_info[1]}" in a.name
    monkeypatch.setenv("DSFAST_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert _extension.cache_dir(True).parent == tmp_path / "ext"


def test_no_prebuilt_and_no_compiler_is_one_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dsfast._C", None)  # as if the package was installed without it
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ImportError, match="no C\\+\\+ compiler"):
        _extension.load()
    monkeypatch.setenv("DSFAST_BUILD_EXT", "0")
    with pytest.raises(ImportError, match="DSFAST_BUILD_EXT=0"):
        _extension.load()
