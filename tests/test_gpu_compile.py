"""Every Triton kernel compiled for real GPU targets (sm_80, sm_90) through the project's own launchers.

No GPU is needed: ``dsfast.kernels._gpu_compile`` swaps in a stub Triton driver for the target and
launches on meta tensors (any size, no memory), in a subprocess, since the test session runs Triton's
interpreter. Each case is an op x dtype x shape; the shapes include N = 17, 24 and 32 (32-wide Gram
tiles), N=1024 x 3x1024x1024 and 6.4e9 elements (more than 2^31). Checked per compiled launch: it
compiles, nothing spills, its shared memory fits the target's per-block limit, no 32-bit index
arithmetic can overflow for that launch's arguments, and in fp32, bf16 and fp16 every dot of the
matrix-product kernels runs on the tensor cores (each TTGIR dot has an MMA layout, at least as many
as the TTIR has dots, and the PTX holds mma / wgmma instructions). ``make test-triton-oldest`` runs this
file against the oldest supported Triton too. Compiles are cached by Triton (~/.triton/cache), so reruns take seconds.
"""
import functools
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from dsfast.kernels._gpu_compile import DOT_KERNELS, DTYPES, OPS, SHAPES, TAIL_OPS, TAIL_SHAPES

pytestmark = pytest.mark.slow  # make test-fast leaves it to make test

ARCHS = (80, 90)
CASES = [(arch, op, dtype, shape) for arch in ARCHS for op in OPS for dtype in DTYPES for shape in SHAPES
         if op not in TAIL_OPS or shape in TAIL_SHAPES]


@functools.cache
def compiled() -> dict:
    """(arch, op, dtype, shape) -> list of launch records; both architectures compile in parallel."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSFAST_TRITON_GPU_TILES")}
    env["DSFAST_POISON_OUTPUTS"] = "0"
    procs = {arch: subprocess.Popen([sys.executable, "-W", "ignore", "-m", "dsfast.kernels._gpu_compile",
                                     "--arch", str(arch)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for arch in ARCHS}
    records = defaultdict(list)
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch} compile run failed:\n{err[-4000:]}"
        for line in out.splitlines():
            rec = json.loads(line)
            records[(arch, rec["op"], rec["dtype"], rec["shape"])].append(rec)
    return records


def check_launches(launches, dtype: str) -> None:
    """Every launch compiled, spill-free, within the shared memory and int32 limits, its dots on the tensor cores."""
    assert launches, "no kernel was launched"
    errors = [r["error"] for r in launches if "error" in r]
    assert not errors, errors[0]
    for r in launches:
        where = f"{r['kernel']} grid={r['grid']} num_warps={r['num_warps']}"
        assert r["spill_bytes"] == 0, f"{where}: {r['registers']} registers, {r['spill_bytes']} bytes spilled"
        assert r["shared_bytes"] <= r["shared_limit"], \
            f"{where}: {r['shared_bytes']} bytes of shared memory > the {r['shared_limit']} a block may use"
        assert not r["i32_overflows"], f"{where}: 32-bit index arithmetic overflows: {r['i32_overflows']}"
        if r["kernel"] in DOT_KERNELS and dtype != "fp64":
            assert r["dots"] > 0, f"{where}: no dot"
            assert r["fma_dots"] == 0 and r["tc_dots"] >= r["dots"], \
                f"{where}: {r['fma_dots']} dots on the FMA units, {r['tc_dots']} on the tensor cores of {r['dots']}"
            assert r["mma"] + r["wgmma"] > 0, f"{where}: no tensor-core instruction (FMA-unit dot)"


@pytest.mark.parametrize("arch, op, dtype, shape", CASES, ids=lambda v: f"sm{v}" if isinstance(v, int) else str(v))
def test_compiles(arch, op, dtype, shape):
    check_launches(compiled()[(arch, op, dtype, shape)], dtype)


# The one-pass loss's kernels with per-sample hf-MSE weights (sse_weights, float32 as a trainer passes them): the
# SSE_W variants of the Gram forward and the hf Gram backward, at the headline batch and at N = 1024 x 3x1024²
# (32-wide tiles, > 2^31 elements), every dtype.
WEIGHTED_SHAPES = ("headline", "n1024")
WEIGHTED_SCRIPT = """
import json, sys, torch
from dsfast.kernels import _gpu_compile as G
from dsfast.kernels import domainstudio_loss as K

arch = int(sys.argv[1])
for dname, dtype in G.DTYPES.items():
    for sname in sys.argv[2:]:
        x = torch.empty(G.SHAPES[sname], dtype=dtype, device="meta")
        n = x.shape[0]
        g = torch.empty(n, n, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device="meta")
        sw = torch.empty(n, dtype=torch.float32, device="meta")
        calls = {
            "domainstudio_pair_grams": lambda: K.domainstudio_pair_grams(
                x, torch.empty_like(x), torch.empty_like(x), G.WEIGHTS, sw),
            "domainstudio_grams_backward": lambda: K.domainstudio_grams_backward(
                g, g, g.new_empty(()), x, torch.empty_like(x), G.WEIGHTS, sw),
        }
        for op, call in calls.items():
            with G.compiling_for(arch) as launches:
                call()
            for launch in launches:
                print(json.dumps({"op": op, "dtype": dname, "shape": sname, **G.analyse(arch, *launch)}), flush=True)
"""


@functools.cache
def compiled_weighted() -> dict:
    """(arch, op, dtype, shape) -> launch records of the weighted one-pass kernels; both architectures in parallel."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSFAST_TRITON_GPU_TILES")}
    env["DSFAST_POISON_OUTPUTS"] = "0"
    procs = {arch: subprocess.Popen([sys.executable, "-W", "ignore", "-c", WEIGHTED_SCRIPT, str(arch), *WEIGHTED_SHAPES],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    records = defaultdict(list)
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch} weighted compile run failed:\n{err[-4000:]}"
        for line in out.splitlines():
            rec = json.loads(line)
            records[(arch, rec["op"], rec["dtype"], rec["shape"])].append(rec)
    return records


@pytest.mark.parametrize("arch", ARCHS, ids=lambda v: f"sm{v}")
def test_compiles_with_hfmse_weights(arch):
    for op in ("domainstudio_pair_grams", "domainstudio_grams_backward"):
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            for shape in WEIGHTED_SHAPES:
                launches = compiled_weighted()[(arch, op, dtype, shape)]
                check_launches(launches, dtype)
                # the weighted variant (SSE_W) is its own compile, not the unweighted kernel
                plain = {r["kernel"]: r["hash"] for r in compiled()[(arch, op, dtype, shape)]}
                for r in launches:
                    assert r["hash"] != plain[r["kernel"]], f"{op} {dtype} {shape}: {r['kernel']} is the unweighted compile"


@pytest.mark.parametrize("op", ["domainstudio_pair_grams", "gram"])
def test_no_recompile_within_a_size_class(op):
    """N = 17, 24 and 32 (one Gram tile class, 32) with other images: one compiled split-K kernel (N, D, the
    split counts are not specialised; strides and widths keep their divisibility)."""
    for arch in ARCHS:
        kernels = defaultdict(set)
        for shape in ("n17", "n24", "n32"):
            for r in compiled()[(arch, op, "fp32", shape)]:
                kernels[r["kernel"]].add(r["hash"])
        assert kernels and all(len(h) == 1 for h in kernels.values()), f"sm_{arch}: {dict(kernels)}"
