"""The C++ CPU loops' copies per ISA (csrc/cpu/isa.h): baseline, AVX2+FMA, AVX-512.

Every copy this CPU runs is forced in turn (``torch.ops.dsfast._set_cpu_isa``, the test hook behind
``DSFAST_CPU_ISA``) and every dispatched C++ op, forward and backward, is compared with the float64
reference (float64 to 1e-10, float32 to 1e-5, relative), on shapes whose rows are longer than a vector
and not a multiple of one (the vector loops and their tails both run), outputs poisoned with NaN. The
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
from dsfast import ops  # noqa: E402
from dsfast._extension import cpu_isa  # noqa: E402
from tests.test_ops import forward_backward, rel_err  # noqa: E402

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


@pytest.fixture(params=SUPPORTED)
def isa(request):
    before = torch.ops.dsfast._set_cpu_isa(request.param)
    assert cpu_isa() == request.param
    yield request.param
    torch.ops.dsfast._set_cpu_isa(before)


def images(count, shape):
    return lambda gen: [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]


ROWS = (5, 3, 36, 70)  # hf rows of 35: two AVX-512 vectors of floats and a tail; N=5: a partial 4x4 block
BIG = (16, 3, 66, 258)  # several chunks per thread, full small_mm blocks, a ragged last chunk
OP_CASES = {
    "haar_dwt2": (lambda x: ops.haar_dwt2(x, backend="cpp"), images(1, ROWS)),
    "haar_idwt2": (lambda ll, h, v, d: ops.haar_idwt2(ll, (h, v, d), backend="cpp"), images(4, (5, 3, 18, 35))),
    "high_frequency": (lambda x: ops.high_frequency(x, backend="cpp"), images(1, ROWS)),
    "hf_mse": (lambda a, t: ops.hf_mse(a, t, backend="cpp"), images(2, ROWS)),
    "hf_pairwise_similarity_kl": (lambda s, a: ops.hf_pairwise_similarity_kl(s, a, backend="cpp"), images(2, ROWS)),
    "hf_pairwise_similarity_kl[big]": (lambda s, a: ops.hf_pairwise_similarity_kl(s, a, backend="cpp"),
                                       images(2, BIG)),
    "domainstudio_loss": (lambda s, a, r: ops.domainstudio_loss(s, a, r, backend="cpp"), images(3, ROWS)),
    "domainstudio_loss[big]": (lambda s, a, r: ops.domainstudio_loss(s, a, r, backend="cpp", detach_source=False),
                               images(3, BIG)),
}
REFERENCE = {
    "haar_dwt2": lambda x: ops.haar_dwt2(x, backend="torch"),
    "haar_idwt2": lambda ll, h, v, d: ops.haar_idwt2(ll, (h, v, d), backend="torch"),
    "high_frequency": lambda x: ops.high_frequency(x, backend="torch"),
    "hf_mse": lambda a, t: ops.hf_mse(a, t, backend="torch"),
    "hf_pairwise_similarity_kl": lambda s, a: ops.hf_pairwise_similarity_kl(s, a, backend="torch"),
    "domainstudio_loss": lambda s, a, r: ops.domainstudio_loss(s, a, r, backend="torch"),
}
REFERENCE["hf_pairwise_similarity_kl[big]"] = REFERENCE["hf_pairwise_similarity_kl"]
REFERENCE["domainstudio_loss[big]"] = lambda s, a, r: ops.domainstudio_loss(s, a, r, backend="torch",
                                                                           detach_source=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_every_isa_matches_the_reference(isa, name, dtype, gen, seed, monkeypatch):
    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "1")
    fn, build = OP_CASES[name]
    inputs64 = build(gen)
    outs, grads = forward_backward(fn, [x.to(dtype) for x in inputs64], seed)
    ref_outs, ref_grads = forward_backward(REFERENCE[name], inputs64, seed)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert len(outs) == len(ref_outs)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel_err(out, ref) <= tol, f"{name} forward, {isa}: {rel_err(out, ref):.2e}"
    for grad, ref in zip(grads, ref_grads):
        assert (grad is None) == (ref is None)
        if grad is not None:
            assert torch.isfinite(grad).all(), f"{name} backward, {isa}: unwritten (poisoned) elements"
            assert rel_err(grad, ref) <= tol, f"{name} backward, {isa}: {rel_err(grad, ref):.2e}"


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
