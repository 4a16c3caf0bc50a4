"""Compile the Triton kernels for a GPU target on a machine without a GPU (tests and ``bench.static`` only).

Nothing in the library imports this module. :func:`compiling_for` swaps Triton's active driver for a
stub whose target is ``GPUTarget("cuda", arch, 32)`` and makes every ``kernel[grid](...)`` launch a
compile only (``JITFunction.run(..., warmup=True)``): the project's own launchers then run unchanged
on ``meta`` tensors (no memory at any size; their data pointer is 0, so 16-byte aligned like a CUDA
allocation), with exactly the grids, constexprs and i32/i64 argument specialisation of a real launch.
Each compiled kernel keeps its TTIR/TTGIR/PTX/cubin; :func:`analyse` reads registers and spills
(``cuobjdump -res-usage``, shipped with Triton), shared memory, tensor-core instructions, the widest
global load/store and the CTAs per SM that those resources allow.

Run as a script it compiles every case for one architecture and prints one JSON record per launch
(the tests run it in a subprocess so ``TRITON_INTERPRET`` of the test session does not apply).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.jit import JITFunction

from . import triton_interpreter_enabled

# Per-SM limits (CUDA occupancy rules): registers, shared memory, resident threads and CTAs; and the
# shared memory one block may use (the opt-in maximum, which Triton's driver reports as max_shared_mem).
SM_LIMITS = {
    80: {"name": "A100", "sms": 108, "regs": 65536, "smem": 164 * 1024, "threads": 2048, "ctas": 32,
         "smem_block": 163 * 1024},
    90: {"name": "H100", "sms": 132, "regs": 65536, "smem": 228 * 1024, "threads": 2048, "ctas": 32,
         "smem_block": 227 * 1024},
}


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        limits = SM_LIMITS[self.arch]
        return {"multiprocessor_count": limits["sms"], "max_shared_mem": limits["smem_block"]}


class StubDriver(DriverBase):
    """A Triton driver for a CUDA target that is not there: it compiles, it never launches."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _Utils(arch)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stub driver never builds a launcher")

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        raise NotImplementedError("the stub driver never launches")

    def get_current_device(self):
        return self.arch  # one JIT cache per target architecture

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass


@contextlib.contextmanager
def compiling_for(arch: int):
    """Within the block, Triton launches compile for sm_<arch>; each is recorded as (name, grid, int args, kernel,
    bytes of its tensor arguments)."""
    launches = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        ints = {name: v for name, v in zip(self.arg_names, args) if isinstance(v, int) and not isinstance(v, bool)}
        tensors = {id(v): v for v in args if isinstance(v, torch.Tensor)}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        launches.append((self.fn.__name__, tuple(grid), ints, kernel, nbytes))
        return kernel

    config = triton.runtime.driver
    previous = config._active  # None until something asked for the (here absent) CUDA driver
    config.set_active(StubDriver(arch))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original
        config.set_active(previous)


@functools.cache
def _cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) of a one-kernel cubin."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump is not in this Triton wheel (backends/nvidia/bin/)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    spill = sum(int(v) for v in re.findall(r"(?:SPILL_STORES|SPILL_LOADS):(\d+)", text))
    # Older cuobjdump reports no spill counters: local memory or a stack frame then means spills.
    if not re.search(r"SPILL_STORES", text):
        spill = max(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", text))
    return regs, spill


_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}


def _widest(ptx: str, op: str) -> int:
    """Widest global access of a PTX op ('ld' or 'st') in bytes per thread (cp.async counts as a load)."""
    widest = 0
    for m in re.finditer(rf"\b{op}\.global((?:\.[\w:]+)+)", ptx):
        parts = m.group(1).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((p[1:] for p in reversed(parts) if re.fullmatch(r"[bufs]\d+", p)), None)
        if bits in _BYTES:
            widest = max(widest, vec * _BYTES[bits])
    if op == "ld":
        for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
            widest = max(widest, int(m.group(1), 0))
    return widest


def dot_units(ttir: str, ttgir: str) -> tuple[int, int, int]:
    """(dots in the TTIR, TTGIR dots on the tensor cores, TTGIR dots on the FMA units) of one kernel.

    A TTGIR dot (``tt.dot``, or ``warp_group_dot`` for wgmma) runs on the tensor cores when its result
    has an NVIDIA MMA layout, on the FMA units when it keeps a blocked one. The TTGIR may hold more
    dots than the TTIR (3xTF32 is three dots), never fewer on the tensor cores if every one is there.
    """
    mma = set(re.findall(r"^(#[\w]+) = #ttg\.nvidia_mma<", ttgir, re.M))
    tensor_core = fma = 0
    for m in re.finditer(r"\b(?:tt\.dot|ttng\.warp_group_dot)\b.*->\s*tensor<[^,>]+,\s*(#[\w.]+)", ttgir):
        if m.group(1) in mma or m.group(1).startswith("#ttg.nvidia_mma"):
            tensor_core += 1
        else:
            fma += 1
    return len(re.findall(r"\btt\.dot\b", ttir)), tensor_core, fma


def analyse(arch: int, name: str, grid: tuple, ints: dict, kernel, nbytes: int) -> dict:
    """Static figures of one compiled launch (``nbytes``: the bytes its tensor arguments hold; per CTA, what
    each CTA reads or writes if every byte is touched once)."""
    meta = kernel.metadata
    regs, spill = resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    warps = meta.num_warps
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // meta.shared if meta.shared else lim["ctas"]
    ctas_per_sm = min(by_regs, by_smem, lim["threads"] // (32 * warps), lim["ctas"])
    ctas = _prod(grid)
    dots, tc_dots, fma_dots = dot_units(kernel.asm["ttir"], kernel.asm["ttgir"])
    return {
        "arch": f"sm_{arch}", "kernel": name, "hash": kernel.hash, "grid": list(grid), "ctas": ctas,
        "num_warps": warps, "num_stages": meta.num_stages, "registers": regs, "spill_bytes": spill,
        "shared_bytes": meta.shared, "shared_limit": lim["smem_block"], "ctas_per_sm": ctas_per_sm,
        "waves": round(ctas / (ctas_per_sm * lim["sms"]), 2) if ctas_per_sm else None,
        "tensor_bytes": nbytes, "bytes_per_cta": nbytes // ctas,
        "mma": len(re.findall(r"\bmma\.sync\.", ptx)), "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        "fma": len(re.findall(r"\bfma\.rn\.", ptx)), "dots": dots, "tc_dots": tc_dots, "fma_dots": fma_dots,
        "load_bytes": _widest(ptx, "ld"), "store_bytes": _widest(ptx, "st"),
        "i32_overflows": i32_overflows(kernel.asm["ttir"], ints, grid),
    }


# --------------------------------------------------------------------------------------------------
# 32-bit index overflow: interval arithmetic over the TTIR with the launch's actual integer arguments
# --------------------------------------------------------------------------------------------------
I32 = (-(2**31), 2**31 - 1)
_DEF = re.compile(r"^\s*(%[\w]+)\s*=\s*([a-z_]+\.[a-z_]+)\b(.*)$")
_FOR = re.compile(r"scf\.for\s+(%[\w]+)\s*=\s*(%[\w]+)\s+to\s+(%[\w]+)")
_ARG = re.compile(r"(%[\w]+):\s*(i32|i64|i1)\b")


def _result_type(rest: str) -> str:
    rest = re.sub(r"\s*loc\(.*$", "", rest)
    t = rest.rsplit(":", 1)[-1]
    for sep in ("->", " to "):
        if sep in t:
            t = t.rsplit(sep, 1)[-1]
    return t.strip()


def _interval(op: str, ops: list, rest: str, grid: tuple):
    if op == "arith.constant":
        m = re.search(r"(?:dense<)?(-?\d+)>?\s*:", rest)
        return (int(m.group(1)),) * 2 if m and "." not in rest.split(":")[0] else None
    if op == "tt.get_program_id":
        axis = "xyz".index(re.search(r"\b([xyz])\b", rest).group(1))
        return (0, int(grid[axis]) - 1 if axis < len(grid) else 0)
    if op == "tt.make_range":
        lo, hi = int(re.search(r"start = (-?\d+)", rest).group(1)), int(re.search(r"end = (-?\d+)", rest).group(1))
        return (lo, hi - 1)
    if op in ("arith.cmpi", "arith.andi", "arith.ori", "arith.xori") and "i1" in _result_type(rest):
        return (0, 1)
    if any(v is None for v in ops) or not ops:
        return None
    if op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "arith.extsi", "arith.trunci"):
        return ops[0]
    if op == "arith.select":
        return (min(ops[1][0], ops[2][0]), max(ops[1][1], ops[2][1]))
    (a0, a1), (b0, b1) = ops[0], ops[1]
    if op == "arith.addi":
        return (a0 + b0, a1 + b1)
    if op == "arith.subi":
        return (a0 - b1, a1 - b0)
    if op == "arith.muli":
        p = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
        return (min(p), max(p))
    if op == "arith.divsi" and b0 > 0:
        p = (int(a0 / b0), int(a0 / b1), int(a1 / b0), int(a1 / b1))
        return (min(p), max(p))
    if op == "arith.remsi" and b0 > 0:
        return (0 if a0 >= 0 else -(b1 - 1), b1 - 1)
    if op == "arith.minsi":
        return (min(a0, b0), min(a1, b1))
    if op == "arith.maxsi":
        return (max(a0, b0), max(a1, b1))
    return None


def i32_overflows(ttir: str, ints: dict, grid: tuple) -> list[str]:
    """The i32 values of the TTIR whose range, for these integer arguments and grid, leaves int32.

    Each value's range is derived from constants, the launch's integer arguments (by name; Triton
    turns ints equal to 1 into constants), program ids (< grid) and aranges, through integer
    arithmetic; a result typed i32 whose range passes 2^31 would wrap on the GPU.
    """
    lines = [ln for ln in ttir.splitlines() if not ln.startswith("#loc")]
    env, defs = {}, {}
    header = next(ln for ln in lines if "tt.func" in ln)
    for name, _ in _ARG.findall(header):
        if name[1:] in ints:
            env[name] = (ints[name[1:]],) * 2
    bad = []
    for ln in lines:
        loop = _FOR.search(ln)
        if loop:
            iv, lo, hi = loop.groups()
            if env.get(lo) is not None and env.get(hi) is not None:
                env[iv] = (env[lo][0], max(env[lo][0], env[hi][1] - 1))
        m = _DEF.match(ln)
        if not m:
            continue
        name, op, rest = m.groups()
        operands = re.findall(r"%[\w]+", re.sub(r"\s*loc\(.*$", "", rest).split(":")[0])
        iv = _interval(op, [env.get(o) for o in operands], rest, grid)
        defs[name] = (op, operands)
        if op == "arith.subi" and iv is not None:
            # a - (a // b) * b, the remainder of a >= 0 by b > 0: [0, b - 1]
            a, prod = operands
            pop, pargs = defs.get(prod, ("", []))
            for q, b in ((pargs + [None, None])[:2], (pargs + [None, None])[1::-1]):
                if pop == "arith.muli" and defs.get(q, ("", []))[0] == "arith.divsi" and defs[q][1] == [a, b] \
                        and env.get(a) is not None and env[a][0] >= 0 and env.get(b) is not None and env[b][0] > 0:
                    iv = (0, env[b][1] - 1)
        env[name] = iv
        typ = _result_type(rest)
        if iv is not None and re.search(r"(^|x)i32>?$", typ) and (iv[0] < I32[0] or iv[1] > I32[1]):
            bad.append(f"{name} = {op} in [{iv[0]}, {iv[1]}] : {typ}")
    return bad


# --------------------------------------------------------------------------------------------------
# The cases: every launcher x dtype x shape
# --------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# (N, C, H, W): tests, the headline DomainStudio batch, N = 17, 24 and 32 (the 32-wide Gram tiles, a
# common batch size), N=1024 at 1024^2 (3.2e9 elements > 2^31), and 6.4e9 elements (band N*C*h*w still
# < 2^31, so i32-specialised, while 2*band and 3*band are not).
SHAPES = {
    "small": (4, 3, 16, 16),
    "headline": (16, 3, 256, 256),
    "n17": (17, 3, 64, 64),
    "n24": (24, 4, 128, 128),
    "n32": (32, 3, 256, 256),
    "n1024": (1024, 3, 1024, 1024),
    "n2048": (2048, 3, 1024, 1024),
}
WEIGHTS = (0.5, -0.5, -0.5, 0.5)
OPS = ("haar_dwt2", "haar_idwt2", "high_frequency", "high_frequency_backward", "gram", "gram_backward", "hf_gram",
       "hf_gram_backward", "domainstudio_grams", "domainstudio_grams_backward", "domainstudio_pair_grams",
       "similarity_kl", "similarity_kl_backward", "domainstudio_terms", "domainstudio_terms_backward")
# The N x N tails keep whole rows in registers: compiled (and spill-free) up to N=1024.
TAIL_OPS = ("similarity_kl", "similarity_kl_backward", "domainstudio_terms", "domainstudio_terms_backward")
TAIL_SHAPES = ("small", "headline", "n32", "n1024")
# Kernels whose work is a matrix product: their fp32/bf16/fp16 dots must run on the tensor cores.
DOT_KERNELS = ("_gram_kernel", "_gram_backward_kernel", "_hf_gram_backward_kernel")


def launchers():
    """name -> function(x) calling one public launcher of dsfast.kernels on meta tensor x (N, C, H, W)."""
    from dsfast.kernels import domainstudio_loss, haar_dwt2, hf_pairwise_similarity_kl, high_frequency, pairwise_similarity_kl

    def half(x):  # (N, C, H/2, W/2)
        return (*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2)

    def gram_grad(x, *batches):
        return torch.empty(*batches, x.shape[0], x.shape[0],
                           dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)

    def scalar(x):
        return gram_grad(x).new_empty(())

    lambdas = (4.0, 4.0, 1.0)

    return {
        "haar_dwt2": haar_dwt2.haar_dwt2,
        "haar_idwt2": lambda x: haar_dwt2.haar_idwt2(x.new_empty(4, *half(x))),
        "high_frequency": lambda x: high_frequency.high_frequency(x, WEIGHTS),
        "high_frequency_backward": lambda x: high_frequency.high_frequency_backward(
            x.new_empty(half(x)), WEIGHTS),
        "gram": pairwise_similarity_kl.gram,
        "gram_backward": lambda x: pairwise_similarity_kl.gram_backward(gram_grad(x), x),
        "hf_gram": lambda x: hf_pairwise_similarity_kl.hf_gram(x, WEIGHTS),
        "hf_gram_backward": lambda x: hf_pairwise_similarity_kl.hf_gram_backward(gram_grad(x), x, WEIGHTS),
        # The N x N tail on the Grams of x (anchors as row weights in the backward case).
        "similarity_kl": lambda x: pairwise_similarity_kl.similarity_kl(
            gram_grad(x), gram_grad(x), None, 1.0, True, 0.01),
        "similarity_kl_backward": lambda x: pairwise_similarity_kl.similarity_kl_backward(
            gram_grad(x).new_empty(()), gram_grad(x), gram_grad(x), x.new_empty(x.shape[0], dtype=torch.float64), 1.0,
            False, 0.01),
        # with a target (the adapted batch; the source batch's call has none)
        "domainstudio_grams": lambda x: domainstudio_loss.domainstudio_grams(x, torch.empty_like(x), WEIGHTS),
        "domainstudio_grams_backward": lambda x: domainstudio_loss.domainstudio_grams_backward(
            gram_grad(x), gram_grad(x), scalar(x), x, torch.empty_like(x), WEIGHTS),
        # source x, adapted and target like it: both batches in one launch
        "domainstudio_pair_grams": lambda x: domainstudio_loss.domainstudio_pair_grams(
            x, torch.empty_like(x), torch.empty_like(x), WEIGHTS),
        # the whole loss's tail on the pair's Grams (anchors as row weights in the backward case)
        "domainstudio_terms": lambda x: domainstudio_loss.domainstudio_terms(
            gram_grad(x, 2), gram_grad(x, 2), scalar(x).new_empty(2, domainstudio_loss.sse_tiles(x.shape[0])), None, lambdas, 1.0, True, 0.01, 1e-3),
        "domainstudio_terms_backward": lambda x: domainstudio_loss.domainstudio_terms_backward(
            [scalar(x)] * 4, gram_grad(x, 2), gram_grad(x, 2), x.new_empty(x.shape[0], dtype=torch.float64),
            lambdas, 1.0, False, 0.01, 1e-3),
    }


def compile_all(arch: int, shapes=SHAPES, dtypes=DTYPES, ops=None):
    """Yield one analysed record per kernel launch of every (op, dtype, shape) case, for sm_<arch>."""
    table = launchers()
    for op in ops or OPS:
        for dname, dtype in dtypes.items():
            for sname, shape in shapes.items():
                if op in TAIL_OPS and sname not in TAIL_SHAPES:
                    continue
                x = torch.empty(shape, dtype=dtype, device="meta")
                with compiling_for(arch) as launches:
                    try:
                        table[op](x)
                        error = None
                    except Exception as err:  # reported per case by the tests
                        error = f"{type(err).__name__}: {str(err)[:2000]}"
                base = {"op": op, "dtype": dname, "shape": sname, "dims": list(shape)}
                if error is not None:
                    yield {**base, "error": error}
                for name, grid, ints, kernel, nbytes in launches:
                    yield {**base, **analyse(arch, name, grid, ints, kernel, nbytes)}


def loss_launches(arch: int, shape, dtype: torch.dtype) -> dict:
    """GPU launches of one call of the whole DomainStudio loss (Triton backend, default options, the adapted
    batch differentiated), forward and backward, at ``shape`` for sm_<arch>: {pass: {"triton": [kernel names],
    "torch": [aten ops], "bytes_per_cta": [per Triton launch]}} (:mod:`._launch_count`, on meta tensors)."""
    from ._launch_count import LaunchCounter

    module = importlib.import_module("dsfast.ops.domainstudio_loss")  # the module (dsfast.ops exports the function)

    source, adapted, real = (torch.empty(shape, dtype=dtype, device="meta") for _ in range(3))
    adapted.requires_grad_()
    resolve = module.resolve_backend
    module.resolve_backend = lambda backend, device: "triton"  # meta tensors: no backend claims them
    found = {}
    try:
        with compiling_for(arch) as launches:
            with LaunchCounter() as forward:
                total = module.domainstudio_loss(source, adapted, real, backend="triton", check_finite=False).total
            per_cta_fwd = [nbytes // max(1, _prod(grid)) for _, grid, _, _, nbytes in launches]
            launches.clear()
            with LaunchCounter() as backward:
                total.backward()
            per_cta_bwd = [nbytes // max(1, _prod(grid)) for _, grid, _, _, nbytes in launches]
    finally:
        module.resolve_backend = resolve
    for name, counter, per_cta in (("forward", forward, per_cta_fwd), ("backward", backward, per_cta_bwd)):
        found[name] = {"triton": counter.triton, "torch": counter.torch, "bytes_per_cta": per_cta}
    return found


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SM_LIMITS), required=True)
    parser.add_argument("--ops", nargs="*", default=None)
    parser.add_argument("--shapes", nargs="*", default=None)
    parser.add_argument("--dtypes", nargs="*", default=None)
    args = parser.parse_args(argv)
    if triton_interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: this compiles for a real GPU target")
    shapes = {k: SHAPES[k] for k in args.shapes} if args.shapes else SHAPES
    dtypes = {k: DTYPES[k] for k in args.dtypes} if args.dtypes else DTYPES
    for rec in compile_all(args.arch, shapes=shapes, dtypes=dtypes, ops=args.ops):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
