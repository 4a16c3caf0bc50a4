"""The Grams do not follow torch's global TF32 switch (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision("high")``), which diffusion scripts turn on: TF32 products carry
~1e-3 relative error, which swamps the KL between two close softmaxes.

* CUDA extension: every cuBLAS-type call in the CUDA-reachable sources sits in a scope that holds an
  ``at::NoTF32Guard`` (a source check here; tests/test_cuda_compile.py compiles them);
* Triton: every ``tl.dot`` names its ``input_precision`` (fp32: 3xTF32, tests/test_tf32x3_accuracy.py),
  so Triton's own default never applies;
* torch backend (the reference): the Gram is a float64 product, rounded once;
* on a GPU, every available backend with TF32 switched on against float64.
"""
import re
from pathlib import Path

import pytest
import torch

from dsfast import reference
from dsfast.ops import available_backends
from dsfast.ops._backend import kernel_namespace

ROOT = Path(__file__).resolve().parents[1]
# CUDA code: csrc/cuda, and the device-generic gram (csrc/cpu/pairwise_similarity_kl.cpp), which
# csrc/cuda/bindings.cpp registers for CUDA too.
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [ROOT / "csrc" / "cpu" / "pairwise_similarity_kl.cpp"]
GEMM = re.compile(r"(?:\bat::|\.)(?:addmm_?|addmm_out|mm_out|mm|matmul|bmm|baddbmm_?|addmv_?|mv|linear|einsum)\s*\(")
GUARD = re.compile(r"\bat::NoTF32Guard\s+\w+\s*;")


def _strip_comments(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", lambda m: " " * len(m.group(0)), code, flags=re.S)
    return re.sub(r"//[^\n]*", lambda m: " " * len(m.group(0)), code)


def unguarded_gemms(code: str) -> list[int]:
    """Line numbers of the GEMM calls not inside the scope of an ``at::NoTF32Guard`` declared before them."""
    code = _strip_comments(code)
    depth, depths = 0, []
    for ch in code:
        depth += ch == "{"
        depth -= ch == "}"
        depths.append(depth)
    guards = [m.start() for m in GUARD.finditer(code)]
    bad = []
    for call in GEMM.finditer(code):
        q = call.start()
        # a guard at p (block depth d) covers q when its block is still open at q
        if not any(p < q and min(depths[p:q]) >= depths[p] for p in guards):
            bad.append(code.count("\n", 0, q) + 1)
    return bad


def test_scope_check_sees_unguarded_calls():
    guarded = "void f() {\n  const at::NoTF32Guard g;\n  if (a) {\n    out.addmm_(p, p.t());\n  }\n}\n"
    outside = "void f() {\n  {\n    const at::NoTF32Guard g;\n  }\n  at::mm_out(q, m, p);\n}\n"
    before = "void f() {\n  at::mm_out(q, m, p);\n  const at::NoTF32Guard g;\n}\n"
    other = "void f() {\n  const at::NoTF32Guard g;\n}\nvoid h() {\n  x.addmm_(a, b);\n}\n"
    assert unguarded_gemms(guarded) == []
    assert unguarded_gemms(outside) == [5]
    assert unguarded_gemms(before) == [2]
    assert unguarded_gemms(other) == [5]


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_gemms_hold_no_tf32_guard(source):
    assert unguarded_gemms(source.read_text()) == [], f"{source.name}: cuBLAS calls outside an at::NoTF32Guard scope"


def test_cuda_sources_have_gemms():
    """The check above looks at something: the Gram sources do call cuBLAS."""
    assert sum(len(GEMM.findall(_strip_comments(p.read_text()))) for p in CUDA_SOURCES) >= 8


def _call(code: str, start: int) -> str:
    """The call expression that opens at ``start`` (up to its matching parenthesis)."""
    depth = 0
    for i in range(start, len(code)):
        depth += code[i] == "("
        depth -= code[i] == ")"
        if code[i] == ")" and depth == 0:
            return code[start:i + 1]
    raise ValueError("unbalanced call")


def test_triton_dots_name_their_precision():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        code = path.read_text()
        for m in re.finditer(r"\btl\.dot\(", code):
            assert "input_precision=" in _call(code, m.start()), f"{path.name}: a tl.dot without input_precision"


@pytest.fixture
def tf32_on():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # the loosest: TF32 (and bf16 where a backend has it)
    yield
    torch.set_float32_matmul_precision(previous)


def test_reference_gram_is_float64_rounded_once(tf32_on, gen):
    x = torch.randn(6, 3, 32, 32, generator=gen)
    flat = x.reshape(6, -1).double()
    assert torch.equal(reference.gram(x), (flat @ flat.T).float())


def _gpu_gram(op: str, backend: str, x: torch.Tensor, w: list) -> torch.Tensor:
    if backend == "torch":
        return reference.gram(x if op == "gram" else reference.high_frequency(x, "domainstudio"))
    ops = kernel_namespace(backend)
    if op == "gram":
        return ops.gram(x.reshape(x.shape[0], -1))
    if op == "hf_gram":
        return ops.hf_gram(x, w)
    return ops.domainstudio_grams(x, None, w)[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["gram", "hf_gram", "domainstudio_grams"])
def test_gpu_grams_with_tf32_on(tf32_on, op, gen):
    x = torch.randn(16, 3, 64, 64, generator=gen).cuda()
    w = list(reference.STENCILS["domainstudio"])
    flat = (x if op == "gram" else reference.high_frequency(x.double(), "domainstudio")).reshape(16, -1).double()
    truth = flat @ flat.T
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for backend in available_backends(x.device):
            err = ((_gpu_gram(op, backend, x, w).double() - truth).abs().max() / truth.abs().max()).item()
            assert err < 1e-5, f"{backend} {op}: relative error {err:.2e} with TF32 on"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
