"""The C++ CPU loops' copies per ISA (csrc/cpu/isa.h): baseline, AVX2+FMA, AVX-512.

Every copy this CPU runs is forced in turn (``torch.ops.dsfast._set_cpu_isa``, the test hook behind
``DSFAST_CPU_ISA``) and every C++ kernel that runs the per-ISA loops, forward and backward, is compared
with the float64 reference (float64 to 1e-10, float32 to 1e-5, relative to the largest value), on shapes
whose rows are longer than a vector and not a multiple of one (the vector loops and their tails both
run) and one big enough for several chunks per thread, with unit-scale cotangents, outputs poisoned
with NaN. (The kernels, not the losses: a loss's gradient can hide a wrong Gram backward under its
larger hf-MSE part.) The
choice itself: the best ISA by cpuid/xgetbv agrees with the kernel's /proc/cpuinfo flags, an ISA the
CPU lacks or an unknown name is one clear error, and DSFAST_CPU_ISA works from the environment. The
built library: the wider copies hold ymm/zmm FMAs, and no VEX/EVEX instruction is outside them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import require_backend

require_backend("cpp")
import dsfast.ops  # noqa: E402,F401  (registers torch.ops.dsfast.*)
from dsfast import reference as R  # noqa: E402
from dsfast._extension import cpu_isa  # noqa: E402

OPS = torch.ops.dsfast

ISAS = ("baseline", "avx2", "avx512")


def cpu_flags() -> set[str] | None:
    """The CPU flags the Linux kernel reports (it clears those the OS does not support), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def supported_isas() -> list[str]:
    flags = cpu_flags()
    if flags is None:
        return ["baseline"]
    best = 2 if "avx512f" in flags else 1 if {"avx2", "fma"} <= flags else 0
    return list(ISAS[: best + 1])


SUPPORTED = supported_isas()
LACKING = [isa for isa in ISAS if isa not in SUPPORTED]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "1")


@pytest.fixture(params=SUPPORTED)
def isa(request):
    before = torch.ops.dsfast._set_cpu_isa(request.param)
    assert cpu_isa() == request.param
    yield request.param
    torch.ops.dsfast._set_cpu_isa(before)


def rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check(out: torch.Tensor, ref: torch.Tensor, what: str):
    """Max error relative to the largest reference value: float64 1e-10, float32 1e-5 (tests/test_cpp_kernels.py)."""
    assert out.shape == ref.shape and torch.isfinite(out).all(), f"{what}: unwritten (NaN-poisoned) elements"
    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    assert err <= (1e-10 if out.dtype == torch.float64 else 1e-5), f"{what}: relative error {err:.2e}"


def vjp(fn, x: torch.Tensor, cotangents):
    """Gradient of sum(<fn(x)_i, cotangent_i>) with respect to x, by autograd of the float64 reference."""
    x = x.double().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    (grad,) = torch.autograd.grad(outs, x, [c.double() for c in cotangents])
    return grad


W = list(R.STENCILS["domainstudio"])
ROWS = (5, 3, 36, 70)  # hf rows of 35: two AVX-512 vectors of floats and a tail; N=5: a partial 4x4 block
BIG = (16, 3, 66, 258)  # several chunks per thread, full small_mm blocks, a ragged last chunk
DTYPES = [torch.float64, torch.float32]
SHAPES = [pytest.param(ROWS, id="rows"), pytest.param(BIG, id="big", marks=pytest.mark.slow)]


def hf(x):
    return R.high_frequency(x, "domainstudio")


def grams(x, t):
    """The reference of domainstudio_grams: image Gram, hf Gram, hf sum of squared errors."""
    d = hf(x) - (hf(t) if t is not None else 0)
    return R.gram(x.flatten(1)), R.gram(hf(x).flatten(1)), (d * d).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_haar(isa, dtype, gen):
    x = rand(ROWS, dtype, gen)
    ll, (h, v, d) = R.haar_dwt2(x.double())
    check(OPS.haar_dwt2(x), torch.stack((ll, h, v, d)), f"haar_dwt2 {isa}")
    bands = rand((4, 5, 3, 18, 35), dtype, gen)  # haar_idwt2 is also the backward of haar_dwt2
    check(OPS.haar_idwt2(bands), R.haar_idwt2(bands[0].double(), tuple(bands[1:].double())), f"haar_idwt2 {isa}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_high_frequency(isa, dtype, gen):
    x = rand(ROWS, dtype, gen)
    check(OPS.high_frequency(x, W), hf(x.double()), f"high_frequency {isa}")
    g = rand((5, 3, 18, 35), dtype, gen)
    check(OPS.high_frequency_backward(g, W), vjp(hf, x, [g]), f"high_frequency_backward {isa}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hf_gram(isa, dtype, shape, gen):
    x = rand(shape, dtype, gen)
    fn = lambda x: R.gram(hf(x).flatten(1))  # noqa: E731
    check(OPS.hf_gram(x, W), fn(x.double()), f"hf_gram {isa}")
    g = rand((shape[0], shape[0]), dtype, gen)
    check(OPS.hf_gram_backward(g, x, W), vjp(fn, x, [g]), f"hf_gram_backward {isa}")


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_domainstudio_grams(isa, dtype, shape, with_target, gen):
    x = rand(shape, dtype, gen)
    t = rand(shape, dtype, gen) if with_target else None
    t64 = t.double() if with_target else None
    for out, ref, what in zip(OPS.domainstudio_grams(x, t, W), grams(x.double(), t64), ("image", "hf", "sse")):
        check(out, ref, f"domainstudio_grams {what} {isa}")
    n = shape[0]
    cotangents = [rand((n, n), dtype, gen), rand((n, n), dtype, gen), rand((), dtype, gen)]
    check(OPS.domainstudio_grams_backward(*cotangents, x, t, W), vjp(lambda x: grams(x, t64), x, cotangents),
          f"domainstudio_grams_backward {isa}")


def test_best_isa_is_chosen():
    if os.environ.get("DSFAST_CPU_ISA"):
        pytest.skip("DSFAST_CPU_ISA is set")
    before = torch.ops.dsfast._set_cpu_isa("baseline")  # the first call chose it; restore below
    torch.ops.dsfast._set_cpu_isa(before)
    assert before == SUPPORTED[-1]


@pytest.mark.parametrize("requested,supported", [("avx512", "avx2"), ("avx512", "baseline"), ("avx2", "baseline")])
def test_isa_the_cpu_lacks_is_refused(requested, supported):
    needs = {"avx2": "AVX2 and FMA", "avx512": r"AVX-512 \(AVX512F\)"}[requested]
    with pytest.raises(RuntimeError, match=rf"DSFAST_CPU_ISA={requested}: this CPU \(or its OS\) lacks {needs}; "
                                           rf"it runs {', '.join(ISAS[:ISAS.index(supported) + 1])}"):
        torch.ops.dsfast._check_cpu_isa(requested, supported)
    assert torch.ops.dsfast._check_cpu_isa(supported, requested) == supported


def test_unknown_isa_is_refused():
    with pytest.raises(RuntimeError, match=r"DSFAST_CPU_ISA='avx3' is not one of baseline, avx2, avx512"):
        torch.ops.dsfast._check_cpu_isa("avx3", "avx512")
    for isa in LACKING + ["AVX2", ""]:
        with pytest.raises(RuntimeError, match="set_cpu_isa"):
            torch.ops.dsfast._set_cpu_isa(isa)
    assert cpu_isa() in SUPPORTED


RUN = ("import torch, dsfast.ops as o; from dsfast._extension import cpu_isa; "
       "o.haar_dwt2(torch.ones(1, 1, 2, 2), backend='cpp'); print(cpu_isa())")


def run_with(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DSFAST_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("value", [SUPPORTED[0], SUPPORTED[-1], "sse9"] + LACKING)
def test_environment_variable(value):
    proc = run_with(value)
    if value in SUPPORTED:
        assert proc.returncode == 0 and proc.stdout.split() == [value], proc.stderr
    else:
        assert proc.returncode != 0
        expected = (f"DSFAST_CPU_ISA={value}: this CPU (or its OS) lacks" if value in ISAS
                    else f"DSFAST_CPU_ISA='{value}' is not one of baseline, avx2, avx512")
        assert expected in proc.stderr, proc.stderr


def _disassembly() -> dict[str, str]:
    """Function name -> its instructions, from objdump of the built dsfast._C."""
    try:
        import dsfast._C as built
    except ImportError:
        pytest.skip("dsfast._C was built at first use (no module file to disassemble)")
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", built.__file__], capture_output=True,
                          text=True, check=True).stdout
    functions, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            functions[name] = []
        elif name is not None and "\t" in line:
            functions[name].append(line.split("\t", 1)[1])
    return {k: "\n".join(v) for k, v in functions.items()}


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 Linux")
def test_isa_copies_use_their_instructions():
    functions = _disassembly()

    def fmas(isa, function, register):
        """Packed FMAs on ``register`` in the ISA's copy of ``function`` (a regex: with the helpers the
        compiler may or may not have inlined into it)."""
        code = "\n".join(v for k, v in functions.items() if f"dsfast::cpu::{isa}::" in k and re.search(function, k)
                         and not k.endswith("@plt"))
        return len(re.findall(rf"^vfn?madd\w+p[sd] .*%{register}", code, re.M))

    for function in (r"(small_mm|rows4_times)<float", r"block44<float>", r"hf_rows<float>"):  # the hot loops
        assert fmas("avx2", function, "ymm") > 0, f"avx2 {function}: no ymm FMA"
        assert fmas("avx512", function, "zmm") > 0, f"avx512 {function}: no zmm FMA"
    # Outside the AVX copies no instruction needs AVX (VEX/EVEX-encoded: v...): the baseline copy, the
    # drivers and any inline code the linker merged must run on a CPU without it.
    wide = [k for k, v in functions.items() if not re.search(r"dsfast::cpu::avx(2|512)::", k)
            and re.search(r"^v\w+ ", v, re.M)]
    assert not wide, f"AVX instructions outside the AVX copies: {wide[:5]}"
