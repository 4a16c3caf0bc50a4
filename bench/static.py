"""Static (compiled, not timed) figures of the Triton kernels for H100 (sm_90) and A100 (sm_80), and the roofline.

    python -m bench.static                 # both targets -> bench/results/static-sm90/, static-sm80/
    python -m bench.static --arch 90

No GPU is used: every kernel is compiled for the target through the project's launchers
(``dsfast.kernels._gpu_compile``), and the figures are read from the compiled code: registers and spills
(cuobjdump), shared memory, resident CTAs per SM those allow, tensor-core instructions (mma / wgmma in
the PTX), the widest global load and store per thread. The roofline table gives, per op and pass, the
ideal bytes (each input read once, each output written once), the FLOPs, the arithmetic intensity,
the time those bytes take at 3.0 TB/s (an H100's achievable HBM3 bandwidth), and the bytes the eager
reference moves (counted: every aten op of ``dsfast.reference`` reads its inputs and writes its outputs,
views excluded; counted at H, W <= 128 and scaled by the pixels), all for float32. These are compiled/static figures and estimates, not measured times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent
HBM_BYTES_PER_S = 3.0e12
# Launch configurations reported: a small image (launch-bound), the headline batch, a larger image, a large N.
SHAPES = {"n16-64": (16, 3, 64, 64), "headline": (16, 3, 256, 256), "n16-512": (16, 3, 512, 512),
          "n64-1024": (64, 3, 1024, 1024)}
# What one launch costs, host dispatch through the kernel's start (eager PyTorch + Triton on an H100: a few
# µs; an assumption for the estimates, not a measurement).
LAUNCH_US = 4.0
DTYPES = ("fp32", "bf16")


# --------------------------------------------------------------------------------------------------
# Compiled figures (one subprocess per target: TRITON_INTERPRET must be off)
# --------------------------------------------------------------------------------------------------
def compiled(arch: int) -> tuple[list[dict], list[dict]]:
    """(one record per compiled kernel launch, one per (shape, dtype) with the launches of a whole loss call)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DSFAST_POISON_OUTPUTS"] = "0"
    code = ("import json, sys; from dsfast.kernels._gpu_compile import compile_all, loss_launches; "
            f"shapes = {SHAPES!r}; dtypes = {{k: getattr(__import__('torch'), v) for k, v in "
            "{'fp32': 'float32', 'bf16': 'bfloat16'}.items()}; "
            f"[print(json.dumps(r)) for r in compile_all({arch}, shapes=shapes, dtypes=dtypes)]; "
            f"[print(json.dumps({{'loss_launches': loss_launches({arch}, shape, dtype), 'shape': s, 'dtype': d}})) "
            "for s, shape in shapes.items() for d, dtype in dtypes.items()]")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    return [r for r in records if "loss_launches" not in r], [r for r in records if "loss_launches" in r]


def launch_table(calls: list[dict]) -> str:
    """Launches of one domainstudio_loss call (Triton kernels + aten ops that are kernels on a GPU), the bytes
    per CTA of its Triton launches (tensor-argument bytes / CTAs), and two estimates of the pass's time: its
    launches at LAUNCH_US each, and its ideal bytes (3 batches each way) at 3.0 TB/s."""
    rows = ["| dtype | shape | pass | launches | Triton kernels | torch ops | KiB per CTA (Triton launches) "
            "| est. µs in launches | est. µs of HBM traffic |", "|---|---|---|---|---|---|---|---|---|"]
    for c in calls:
        n, ch, h, w = SHAPES[c["shape"]]
        batch = n * ch * h * w * (4 if c["dtype"] == "fp32" else 2)
        for pass_, found in c["loss_launches"].items():
            kernels = ", ".join(f"`{k}`" for k in found["triton"]) or "-"
            ops = ", ".join(o.removeprefix("aten::") for o in found["torch"]) or "-"
            per_cta = ", ".join(f"{b / 1024:.1f}" for b in found["bytes_per_cta"]) or "-"
            launches = len(found["triton"]) + len(found["torch"])
            rows.append(f"| {c['dtype']} | {c['shape']} | {pass_} | {launches} | {kernels} | {ops} | {per_cta} | "
                        f"{launches * LAUNCH_US:.0f} | {3 * batch / HBM_BYTES_PER_S * 1e6:.1f} |")
    return "\n".join(rows)


def kernel_table(records: list[dict]) -> str:
    head = ("| op | dtype | shape | kernel | grid | warps | stages | regs | spill B | smem KiB | CTAs/SM | waves "
            "| KiB/CTA | mma | wgmma | load B | store B |")
    rows = [head, "|" + "---|" * 17]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['op']} | {r['dtype']} | {r['shape']} | compile error: {r['error'][:80]} |")
            continue
        rows.append(
            f"| {r['op']} | {r['dtype']} | {r['shape']} | `{r['kernel']}` | {'x'.join(map(str, r['grid']))} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} | {r['waves']} | {r['bytes_per_cta'] / 1024:.1f} | "
            f"{r['mma']} | {r['wgmma']} | "
            f"{r['load_bytes']} | {r['store_bytes']} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------------------------------
class Traffic(TorchDispatchMode):
    """Bytes every aten op reads (tensor inputs) and writes (tensor outputs); views move nothing."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (torch.Tag.view_copy in func.tags or func.is_view or func._schema.name in ("aten::detach",)):
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


def eager_bytes(shape) -> dict:
    """Bytes the eager reference moves, fwd and fwd+bwd, for the ops of the roofline (float32).

    Counted by running it on CPU at H, W <= 128 and scaled by the pixel count (traffic is linear in the
    pixels; the N x N part is negligible).
    """
    from dsfast import reference as R

    n, c, h, w = shape
    small = (n, c, min(h, 128), min(w, 128))
    scale = (h * w) / (small[2] * small[3])

    ops = {  # each returns its outputs; the backward gets ones as output gradients (made outside the count)
        "hf_pairwise_similarity_kl": lambda s, a: [R.hf_pairwise_similarity_kl(s, a)],
        "pairwise_similarity_kl": lambda s, a: [R.pairwise_similarity_kl(s, a)],
        "high_frequency": lambda s, a: [R.high_frequency(a, "domainstudio")],
        "haar_dwt2": lambda s, a: (lambda ll, bands: [ll, *bands])(*R.haar_dwt2(a)),
        # the whole loss, composed of the reference terms as a user would write it (lambdas 4, 4, 1)
        "domainstudio_loss": lambda s, a: [4 * R.pairwise_similarity_kl(s, a) + 4 * R.hf_pairwise_similarity_kl(s, a)
                                           + R.hf_mse(a, real)],
    }
    found = {}
    real = torch.randn(small)
    for name, fn in ops.items():
        source = torch.randn(small)
        adapted = torch.randn(small, requires_grad=True)
        with Traffic() as fwd:
            outs = fn(source, adapted)
        grads = [torch.ones_like(t) for t in outs]
        with Traffic() as bwd:
            torch.autograd.backward(outs, grads)
        found[name] = {"fwd": round(fwd.bytes * scale), "fwd+bwd": round((fwd.bytes + bwd.bytes) * scale)}
    return found


def roofline(shape) -> list[dict]:
    """Ideal traffic and FLOPs of the fused designs (float32; source detached, as DomainStudio uses it)."""
    n, c, h, w = shape
    e = n * c * h * w * 4  # one batch, bytes
    d_hf = c * h * w // 4
    gram_hf = 2 * n * n * d_hf  # hf(x) hf(x)ᵀ as a full product (the kernels compute the upper half)
    gram = 2 * n * n * c * h * w
    ideal = {
        # fwd: read source and adapted once each; bwd: read adapted, write its gradient
        ("hf_pairwise_similarity_kl", "fwd"): (2 * e, 2 * gram_hf),
        ("hf_pairwise_similarity_kl", "fwd+bwd"): (4 * e, 3 * gram_hf),
        ("pairwise_similarity_kl", "fwd"): (2 * e, 2 * gram),
        ("pairwise_similarity_kl", "fwd+bwd"): (4 * e, 3 * gram),
        ("high_frequency", "fwd"): (e + e // 4, 7 * n * d_hf),
        ("high_frequency", "fwd+bwd"): (e + e // 4 + e // 4 + e, 11 * n * d_hf),
        ("haar_dwt2", "fwd"): (2 * e, 12 * n * d_hf),
        ("haar_dwt2", "fwd+bwd"): (4 * e, 24 * n * d_hf),
        # fwd: read source, adapted and the hf-MSE target once each (both Grams of both batches and the
        # hf-MSE in one pass); bwd: read adapted and target again, write the gradient. hf-MSE per position:
        # two stencils (7 each), difference, square, sum (3); backward: recomputed difference (15), scaled
        # and spread over the 4 pixels (5), added to the Gram terms' gradient (4).
        ("domainstudio_loss", "fwd"): (3 * e, 2 * (gram + gram_hf) + 17 * n * d_hf),
        ("domainstudio_loss", "fwd+bwd"): (6 * e, 3 * (gram + gram_hf) + 41 * n * d_hf),
    }
    eager = eager_bytes(shape)
    rows = []
    for (op, pass_), (nbytes, flops) in ideal.items():
        rows.append({"op": op, "pass": pass_, "shape": "x".join(map(str, shape)), "ideal_bytes": nbytes,
                     "flops": flops, "flop_per_byte": round(flops / nbytes, 3),
                     "time_us_at_3TBps": round(nbytes / HBM_BYTES_PER_S * 1e6, 1),
                     "eager_bytes": eager[op][pass_], "eager_over_ideal": round(eager[op][pass_] / nbytes, 1)})
    return rows


def roofline_table(rows: list[dict]) -> str:
    out = ["| op | pass | N, C×H×W | ideal MB | GFLOP | FLOP/B | µs at 3.0 TB/s | eager reference MB | eager / ideal |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['pass']} | {r['shape']} | {r['ideal_bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | "
                   f"{r['flop_per_byte']} | {r['time_us_at_3TBps']} | {r['eager_bytes'] / 1e6:.1f} | "
                   f"{r['eager_over_ideal']}× |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="static (compiled) kernel report and roofline; no GPU needed")
    ap.add_argument("--arch", type=int, nargs="*", default=[90, 80])
    ap.add_argument("--results-dir", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    import triton

    roof = [r for shape in SHAPES.values() for r in roofline(shape)]
    for arch in args.arch:
        records, calls = compiled(arch)
        out = args.results_dir / f"static-sm{arch}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "kernels.jsonl", "w") as f:
            for r in records:
                r.pop("i32_overflows", None)
                f.write(json.dumps(r) + "\n")
        with open(out / "launches.json", "w") as f:
            json.dump(calls, f, indent=1)
        with open(out / "roofline.json", "w") as f:
            json.dump(roof, f, indent=1)
        (out / "README.md").write_text(
            f"# Static kernel report, sm_{arch} (compiled, not timed)\n\n"
            f"Generated by `python -m bench.static` with Triton {triton.__version__}, torch {torch.__version__}, "
            "without a GPU: each kernel compiled for the target through dsfast's own launchers. CTAs/SM is "
            "what registers, shared memory and threads allow; waves = CTAs / (CTAs/SM x SMs); load/store B = "
            "widest global access per thread (16 = 128-bit vectors; cp.async counts as a load); KiB/CTA = "
            "bytes of the launch's tensor arguments / CTAs (what each CTA reads or writes if every byte is touched "
            "once).\n\n" + kernel_table(records)
            + "\n\n## Launches per domainstudio_loss call (counted, not timed)\n\n"
            "Triton backend, default options, the adapted batch differentiated, `check_finite=False` (the GPU "
            "default); the backward includes the `ones_like` seed of `.backward()`. Counted by "
            f"`dsfast.kernels._launch_count` on meta tensors. Estimates, not timings: launches at {LAUNCH_US:.0f} "
            "µs each (an assumed host-dispatch-to-start cost), traffic = 3 batches per pass at 3.0 TB/s.\n\n"
            + launch_table(calls)
            + "\n\n## Roofline (float32; estimates, not timings)\n\n" + roofline_table(roof) + "\n")
        print(f"wrote {out}/ ({len(records)} launches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
