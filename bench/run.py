"""Run a benchmark suite, write JSON lines, regenerate the markdown tables and the plots.

    python -m bench.run --suite cpu             # make bench: reduced CPU sweep + tiny training step + step split (~12 min, 2 cores)
    python -m bench.run --suite cpu --split-only  # only the split of a training step, demo + sd-small (~2 min)
    python -m bench.run --suite gpu             # make bench-gpu: the full op sweep (one <= 10 min device call)
    python -m bench.run --suite gpu-train       # training step: adm256, sd15, sdxl (+ largest micro-batch)
    python -m bench.run --suite cpu --quick     # one tiny shape, seconds (the smoke test)
    python -m bench.run --report-only           # only rebuild tables and plots from bench/results/

Output, per device (``<device>`` = slugified CPU model or ``torch.cuda.get_device_name``):
``bench/results/<device>/kernels-<suite>.jsonl`` (one row per op x pass x shape x dtype x provider),
``training-<suite>.jsonl``, ``split-<suite>.jsonl`` (a step's parts), ``table.md`` (every kernel row), ``time_vs_size.png``, ``memory_vs_n.png``;
and the summary between the marker comments of ``bench/README.md``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "bench", "README.md")
START, END = "<!-- dsfast-bench:start -->", "<!-- dsfast-bench:end -->"

ALL_NS = (4, 16, 64, 256)
ALL_SHAPES = ((3, 64, 64), (4, 64, 64), (3, 256, 256), (4, 128, 128), (3, 512, 512), (3, 1024, 1024))
HEADLINE = dict(n=16, shape="3x256x256", dtype="float32", op="hf_pairwise_similarity_kl", pass_="fwd+bwd")
LOSS_OPS = ("pairwise_similarity_kl", "hf_pairwise_similarity_kl", "hf_mse", "domainstudio_loss")


# -- environment ---------------------------------------------------------------------------------
def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd() -> str | None:
    """The widest vector ISA /proc/cpuinfo's flags list: "AVX-512" (avx512f), "AVX2+FMA", "AVX2", or "SSE" (None
    where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2+FMA" if "fma" in flags else "AVX2"
    return "SSE"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def environment(device: torch.device, suite: str, threads: int) -> dict:
    import dsfast

    commit, dirty = git_commit()
    env = {
        "suite": suite,
        "run_id": datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "threads": threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dsfast": getattr(dsfast, "__version__", None),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_simd"] = cpu_simd()
    return env


# -- plans ---------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}[name]


def _parse_shape(s: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in s.lower().split("x"))
    return c, h, w


def cpu_plan(providers: list[str], ops: list[str], quick: bool, headline_only: bool = False):
    """The reduced CPU sweep (<= 10 min on 2 cores), most important first, so a slow machine's time budget
    cuts the last rows: the headline row (N=16, 3x256x256, fp32, fused hf-KL fwd+bwd: C++ vs eager
    reference vs official vs torch.compile), every op at that configuration (float32, also with the
    baseline-ISA C++ loops, and bfloat16),
    N in {4, 16, 64, 256} at 3x64x64 (memory vs N), N=16 at 4x64x64, 4x128x128, 3x512x512 (time vs size).
    ``headline_only``: the float32 rows at N=16, 3x256x256 only (torch.compile of DomainStudioLoss included)."""
    from bench.peers import BASELINE_ISA

    head = [p for p in providers if p != "compile"]  # the baseline-ISA C++ loops at this configuration only
    base = [p for p in head if p != BASELINE_ISA]
    fp32, bf16 = torch.float32, torch.bfloat16
    if quick:
        return [(4, 3, 32, 32, fp32, ops, base)]
    head_ops = [o for o in ops if o == "hf_pairwise_similarity_kl"]
    rest = [o for o in ops if o not in head_ops]
    plan = []
    if head_ops:  # the headline row first, torch.compile included
        plan.append((16, 3, 256, 256, fp32, head_ops, head + [p for p in providers if p == "compile"]))
    plan.append((16, 3, 256, 256, fp32, rest, head))
    if "compile" in providers and "domainstudio_loss" in rest:
        plan.append((16, 3, 256, 256, fp32, ["domainstudio_loss"], ["compile"]))  # reference: just above
    if headline_only:
        return plan
    plan.append((16, 3, 256, 256, bf16, ops, base))
    for n in (4, 16, 64, 256):  # memory vs N (all four N of the issue, at the smallest shape)
        plan.append((n, 3, 64, 64, fp32, ops, base))
    for c, h, w in ((4, 64, 64), (4, 128, 128), (3, 512, 512)):  # time vs size at N=16 (with 3x64^2, 3x256^2)
        plan.append((16, c, h, w, fp32, ops, base))
    return plan


def gpu_plan(providers: list[str], ops: list[str], ns, shapes, dtypes, quick: bool):
    """The full sweep, headline configuration first, then by size (so a time budget cuts the largest).

    To fit one <= 10 min device call: the official double loop runs at N=4, and at N=16 in float32;
    torch.compile (seconds of compile per graph and shape) runs every compilable op at the headline
    configuration and the two fused losses over N at 3x256x256 float32 (the memory-vs-N plot).
    ``--providers compile`` with ``--n``/``--shapes`` runs more of it in a separate call.
    """
    if quick:
        return [(4, 3, 64, 64, torch.float32, ops, [p for p in providers if p != "compile"])]
    configs = [(n, c, h, w, dt) for dt in dtypes for n in ns for (c, h, w) in shapes]
    head = (16, 3, 256, 256, torch.float32)
    configs.sort(key=lambda k: (k != head, k[0] * k[1] * k[2] * k[3] * torch.empty((), dtype=k[4]).element_size()))
    only_compile = providers == ["reference", "compile"]  # an explicit compile run: compile everything asked
    plan = []
    for n, c, h, w, dt in configs:
        base = [p for p in providers if p != "compile"
                and not (p == "official" and (n > 16 or (n > 4 and dt != torch.float32)))]
        if not only_compile:
            plan.append((n, c, h, w, dt, ops, base))
        if "compile" in providers:
            if only_compile:
                cops = ops
            elif (n, c, h, w, dt) == head:
                cops = [o for o in ops if o in set(LOSS_OPS) | {"high_frequency", "haar_dwt2"}]
            elif (c, h, w, dt) == (3, 256, 256, torch.float32):
                cops = [o for o in ops if o in ("hf_pairwise_similarity_kl", "domainstudio_loss")]
            else:
                cops = []
            if cops:
                plan.append((n, c, h, w, dt, cops, ["reference", "compile"] if only_compile else ["compile"]))
    return plan


# -- output --------------------------------------------------------------------------------------
class Writer:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.f = open(path, "w")
        self.rows = []

    def __call__(self, row: dict):
        self.rows.append(row)
        self.f.write(json.dumps(row, default=str) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def load_rows(device_dir: str, kind: str) -> list[dict]:
    """Rows of ``kind`` (kernels/training) of one device folder; quick-run files only when nothing else."""
    files = sorted(glob.glob(os.path.join(device_dir, f"{kind}-*.jsonl")))
    full = [f for f in files if not f.endswith("-quick.jsonl")]
    rows = []
    for path in full or files:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    # Several files (split or repeated runs) may hold the same row: keep the latest run's.
    latest = {}
    for r in sorted(rows, key=lambda r: r.get("run_id", "")):
        key = ((r.get("op"), r.get("pass"), r.get("n"), r.get("shape"), r.get("dtype"), r.get("provider"))
               if kind == "kernels" else (r.get("model"), r.get("variant"), r.get("batch")))
        latest[key] = r
    return list(latest.values())


def _fmt_ms(s):
    return "" if s is None else (f"{s * 1e3:.3g}" if s * 1e3 < 100 else f"{s * 1e3:.0f}")


def _fmt_mib(b):
    return "" if b is None else f"{b / 2**20:.1f}"


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def kernel_table(rows: list[dict], with_config=True) -> str:
    head = (["op", "pass"] + (["N", "C×H×W", "dtype"] if with_config else [])
            + ["provider", "median ms", "p20–p80 ms", "speed-up vs ref", "peak extra MiB", "GB/s", "% copy BW"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            continue
        cells = [r["op"], r["pass"]] + ([str(r["n"]), r["shape"], r["dtype"]] if with_config else []) + [
            r["provider"], _fmt_ms(r["median_s"]), f"{_fmt_ms(r['p20_s'])}–{_fmt_ms(r['p80_s'])}",
            _fmt(r.get("speedup_vs_reference"), ".2f") + ("×" if r.get("speedup_vs_reference") else ""),
            _fmt_mib(r.get("peak_extra_bytes")), _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy_bw"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PROVIDER_ORDER = ["reference", "official", "compile", "pywt", "pytorch_wavelets", "ptwt",
                  "dsfast-cpp", "dsfast-cpp-baseline", "dsfast-cuda", "dsfast-triton", "dsfast-torch"]


def _provider_key(p):
    return (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER), p)


def pivot_table(rows: list[dict]) -> str:
    """One line per op x pass, one column per provider: ``median ms (speed-up)``."""
    ok = [r for r in rows if r.get("status") == "ok"]
    providers = sorted({r["provider"] for r in ok}, key=_provider_key)
    cells = {(r["op"], r["pass"], r["provider"]): r for r in ok}
    keys = []
    for r in _order(ok):
        if (r["op"], r["pass"]) not in keys:
            keys.append((r["op"], r["pass"]))
    lines = ["| op | pass | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
    for op, pass_ in keys:
        row = []
        for p in providers:
            r = cells.get((op, pass_, p))
            if r is None:
                row.append("")
            else:
                sp = r.get("speedup_vs_reference")
                row.append(f"{_fmt_ms(r['median_s'])}" + (f" ({sp:.2f}×)" if sp is not None and p != "reference" else ""))
        lines.append(f"| {op} | {pass_} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def training_table(rows: list[dict]) -> str:
    head = ["model", "params", "input", "variant", "micro-batch", "s/step", "peak MiB", "largest micro-batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | | {r.get('latent', '')} | {r['variant']} | {r.get('batch', '')} | "
                         f"{r.get('status')}: {r.get('reason', '')} | | |")
            continue
        largest = ""
        if "max_micro_batch_note" in r:
            largest = f"{r.get('max_micro_batch')} ({r['max_micro_batch_note']})"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['latent']} | {r['variant']} | {r['batch']} | "
            f"{r['s_per_step']:.3g} | {_fmt_mib(r['peak_bytes'])} | {largest} |")
    return "\n".join(lines)


def split_table(rows: list[dict]) -> str:
    """One line per model x variant: ms per step, and each part of the split step in ms (share of the parts' sum)."""
    from bench.training import PART_LABELS, PARTS

    head = (["model", "params", "input × batch", "variant", "ms/step", "parts' sum ms"] + [PART_LABELS[p] for p in PARTS]
            + ["loss fwd+bwd share", "step vs dsfast"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok = [r for r in rows if r.get("status") == "ok"]
    dsfast = {(r["model"], r["batch"]): r for r in ok if r["variant"] == "dsfast"}
    for r in sorted(ok, key=lambda r: (r["model"], r["batch"], r["variant"] != "official")):
        base = dsfast.get((r["model"], r["batch"]))
        ratio = f"{r['s_per_step'] / base['s_per_step']:.2f}×" if base else ""
        lines.append("| " + " | ".join(
            [r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['latent']} × {r['batch']}", r["variant"],
             _fmt_ms(r["s_per_step"]), _fmt_ms(r["parts_sum_s"])]
            + [f"{_fmt_ms(r[f'{p}_s'])} ({r[f'{p}_pct']:.1f}%)" for p in PARTS]
            + [f"{r['loss_fwd_pct'] + r['loss_bwd_pct']:.1f}%", ratio]) + " |")
    return "\n".join(lines)


def _order(rows):
    ops = ["haar_dwt2", "haar_wavedec2_l3", "haar_idwt2", "haar_waverec2_l3", "high_frequency",
           "pairwise_similarity_kl", "hf_pairwise_similarity_kl", "hf_mse", "domainstudio_loss"]
    passes = ["fwd", "bwd", "fwd+bwd"]

    def key(r):
        return (ops.index(r["op"]) if r["op"] in ops else 99, r["dtype"], r["n"], r["c"] * r["h"] * r["w"],
                passes.index(r["pass"]), _provider_key(r["provider"]))

    return sorted(rows, key=key)


def _skip_summary(rows) -> str:
    counts = {}
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            reason = re.sub(r"[\d.]+ GiB", "… GiB", r.get("reason", ""))[:110]
            counts[(r["status"], reason)] = counts.get((r["status"], reason), 0) + 1
    if not counts:
        return ""
    return "\n".join(f"- {status}, {n} rows: {reason}" for (status, reason), n in sorted(counts.items()))


FUSED_OPS = ("hf_pairwise_similarity_kl", "domainstudio_loss")


def _cpu_isa() -> str | None:
    try:
        from dsfast._extension import cpu_isa

        return cpu_isa()
    except ImportError:
        return None


def roof_summary(rows: list[dict]) -> str:
    """The fused ops' forward+backward at the headline configuration: share of the roof and ratio to
    torch.compile(reference), per C++ ISA copy measured (the closing lines of a CPU run)."""
    ok = {(r["op"], r["pass"], r["provider"]): r for r in rows if r.get("status") == "ok"
          and (r["n"], r["shape"], r["dtype"]) == (HEADLINE["n"], HEADLINE["shape"], HEADLINE["dtype"])}
    lines = []
    for op in FUSED_OPS:
        comp = ok.get((op, "fwd+bwd", "compile"))
        for provider in ("dsfast-cpp", "dsfast-cpp-baseline"):
            r = ok.get((op, "fwd+bwd", provider))
            if r is None or "pct_roof" not in r:
                continue
            isa = "baseline" if provider.endswith("baseline") else r.get("cpu_isa")
            ratio = f", {comp['median_s'] / r['median_s']:.2f}x torch.compile(reference)" if comp else ""
            lines.append(f"  {op} fwd+bwd, C++ loops {isa}: {r['median_s'] * 1e3:.2f} ms = {r['pct_roof']:.0f}% of "
                         f"its roof ({r['roof_s'] * 1e3:.2f} ms, {r['roof_bound']}-bound){ratio}")
    return "\n".join(["roof shares (N=16, 3x256x256, float32):"] + lines) if lines else ""


def domainstudio_summary(rows: list[dict], copy_gbps: float | None, fma_gfmas: float | None = None) -> str:
    """The one-pass DomainStudio loss against torch.compile(reference), and the fused ops' time as a share of
    their roof: max(traffic / copy bandwidth, FMAs / FMA peak), both measured in the same run (bench/roof.py;
    minimum traffic: each input read once, each output written once per pass)."""
    ok = {(r["op"], r["pass"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    dsfast = sorted({p for (_, _, p) in ok if p.startswith("dsfast-") and p != "dsfast-torch"}, key=_provider_key)
    if not dsfast or not any(op == "domainstudio_loss" for op, _, _ in ok):
        return ""
    measured = ", ".join(
        ([f"copy bandwidth {copy_gbps:.1f} GB/s (`dst.copy_(src)` of 128 MiB)"] if copy_gbps else [])
        + ([f"FMA peak {fma_gfmas:.0f} GFMA/s (float32 `torch.mm` 2048³)"] if fma_gfmas else []))
    lines = ["**One pass over the data** — the whole `DomainStudioLoss` (4·KL_img + 4·KL_hf + 1·hfMSE) against "
             "`torch.compile(reference)`, and the fused ops' time as a share of their roof, max(traffic / copy "
             "bandwidth, FMAs / FMA peak) (`bench/roof.py`)" + (f", measured in the same run: {measured}" if measured
                                                                else "")
             + ". `dsfast-cpp` runs the C++ loops of the CPU's ISA, `dsfast-cpp-baseline` their baseline copy:", "",
             "| op | pass | provider | median ms | vs torch.compile | vs eager reference | ideal MB | GB/s | % copy BW "
             "| roof ms | bound | % of roof |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for op in FUSED_OPS:
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            comp = ok.get((op, pass_, "compile"))
            for p in dsfast:
                r = ok.get((op, pass_, p))
                if r is None:
                    continue
                vs_compile = f"{comp['median_s'] / r['median_s']:.2f}×" if comp else ""
                lines.append(
                    f"| {op} | {pass_} | {p} | {_fmt_ms(r['median_s'])} | {vs_compile} | "
                    f"{_fmt(r.get('speedup_vs_reference'), '.2f')}× | {r['ideal_bytes'] / 1e6:.1f} | "
                    f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('pct_copy_bw'), '.0f')} | "
                    f"{_fmt_ms(r.get('roof_s'))} | {r.get('roof_bound', '')} | {_fmt(r.get('pct_roof'), '.0f')} |")
    return "\n".join(lines)


def device_section(device_dir: str, rel: str) -> str:
    kernels = load_rows(device_dir, "kernels")
    train = load_rows(device_dir, "training")
    split = load_rows(device_dir, "split")
    if not kernels and not train and not split:
        return ""
    meta = max(kernels or train or split, key=lambda r: r.get("run_id", ""))
    out = [f"### {meta['device']} ({meta['device_type']})", ""]
    out.append(f"torch {meta['torch']}, triton {meta.get('triton')}, dsfast {meta.get('dsfast')}, "
               f"commit `{(meta.get('git_commit') or '?')[:10]}`{' (dirty)' if meta.get('git_dirty') else ''}, "
               f"{meta['threads']} thread(s), run {meta['run_id']}, suite `{meta['suite']}`"
               + (", timed in thread CPU time (`--clock thread`)." if meta.get("clock") == "thread" else ".")
               + (f" Copy bandwidth measured in the run: {meta['copy_gbps']:.1f} GB/s." if meta.get("copy_gbps") else "")
               + (f" C++ CPU loops: {meta['cpu_isa']}." if meta.get("cpu_isa") else ""))
    out.append("")
    if kernels:
        head = [r for r in kernels if r.get("n") == HEADLINE["n"] and r.get("shape") == HEADLINE["shape"]
                and r.get("dtype") == HEADLINE["dtype"]]
        if not head:  # quick runs: the one shape they have
            first = next((r for r in kernels if r.get("status") == "ok"), kernels[0])
            head = [r for r in kernels if (r.get("n"), r.get("shape"), r.get("dtype"))
                    == (first.get("n"), first.get("shape"), first.get("dtype"))]
        h0 = head[0] if head else {}
        headline = [r for r in head if r["op"] == HEADLINE["op"] and r["pass"] == HEADLINE["pass_"]
                    and r.get("status") == "ok"]
        if headline:
            out.append(f"**Headline** — `hf_pairwise_similarity_kl`, forward+backward, N={h0['n']}, "
                       f"{h0['shape']}, {h0['dtype']}:")
            out.append("")
            out.append(kernel_table(_order(headline), with_config=False))
            out.append("")
        summary = domainstudio_summary(head, meta.get("copy_gbps"), meta.get("fma_gfmas"))
        if summary:
            out += [summary, ""]
        out.append(f"Every op at N={h0.get('n')}, {h0.get('shape')}, {h0.get('dtype')}: median ms (speed-up over "
                   f"the eager reference). Every row, with p20/p80, memory and GB/s: [`{rel}/table.md`]({rel}/table.md).")
        out.append("")
        out.append(pivot_table(head))
        out.append("")
        for png, what in (("time_vs_size.png", "time vs size"), ("memory_vs_n.png", "peak extra memory vs N")):
            if os.path.exists(os.path.join(device_dir, png)):
                out.append(f"![{what}]({rel}/{png})")
        out.append("")
        skips = _skip_summary(kernels)
        if skips:
            out += ["Rows not measured:", "", skips, ""]
    if train:
        out += ["Training step (DomainStudio; see `bench/training.py`):", "", training_table(train), ""]
    split_ok = [r for r in split if r.get("status") == "ok"]
    if split_ok:
        s0 = max(split_ok, key=lambda r: r.get("run_id", ""))
        out += [f"One DomainStudio step split into its parts (`--split-only`; see \"What the loss costs in a step\"): "
                f"{s0['device']} ({s0.get('cpu_simd') or 'ISA unknown'}), {s0['threads']} thread(s), "
                f"{'thread CPU time' if s0.get('clock') == 'thread' else 'wall time'}, medians of {s0['steps']} steps "
                f"after {s0['warmup']} warm-up, run {s0['run_id']}; ms (share of the parts' sum):", "",
                split_table(split), ""]
    if _skip_summary(split):
        out += ["Split rows not measured:", "", _skip_summary(split), ""]
    return "\n".join(out)


def write_device_table(device_dir: str):
    rows = load_rows(device_dir, "kernels")
    if not rows:
        return
    with open(os.path.join(device_dir, "table.md"), "w") as f:
        f.write(f"# {rows[0]['device']}: every kernel row\n\nTimes in ms (median, p20–p80); speed-up over the eager "
                "reference; peak extra memory in MiB (see bench/README.md for how it is measured); GB/s from the "
                "ideal bytes of the op.\n\n")
        f.write(kernel_table(_order(rows)) + "\n")
        skips = _skip_summary(rows)
        if skips:
            f.write("\nRows not measured:\n\n" + skips + "\n")


def plot_device(device_dir: str):
    try:
        import matplotlib
    except ImportError:  # a GPU image without it (make gpu-check): the JSON lines and tables are written
        print(f"matplotlib is not installed: no plots in {device_dir}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load_rows(device_dir, "kernels") if r.get("status") == "ok" and r["pass"] == "fwd+bwd"
            and r["dtype"] == "float32"]
    if not rows:
        rows = [r for r in load_rows(device_dir, "kernels") if r.get("status") == "ok" and r["pass"] == "fwd"
                and r["dtype"] == "float32"]
    if not rows:
        return
    ops = [o for o in ("haar_dwt2", "haar_wavedec2_l3", "haar_idwt2", "haar_waverec2_l3", "high_frequency",
                       "pairwise_similarity_kl", "hf_pairwise_similarity_kl", "hf_mse", "domainstudio_loss")
           if any(r["op"] == o for r in rows)]
    pass_name = rows[0]["pass"]
    device = rows[0]["device"]
    palette = plt.get_cmap("tab10").colors
    color = {p: palette[i % len(palette)] for i, p in enumerate(PROVIDER_ORDER)}

    def grid(title):
        cols = 3
        nrows = (len(ops) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        fig.suptitle(f"{device}: {title}")
        for ax in axes.flat[len(ops):]:
            ax.axis("off")
        return fig, axes.flat

    # time vs size at the most common N
    ns = [r["n"] for r in rows]
    n_fix = 16 if 16 in ns else max(set(ns), key=ns.count)
    fig, axes = grid(f"time vs per-sample size, N={n_fix}, float32, {pass_name}")
    for ax, op in zip(axes, ops):
        sub = [r for r in rows if r["op"] == op and r["n"] == n_fix]
        for prov in sorted({r["provider"] for r in sub}, key=_provider_key):
            pts = sorted((r["c"] * r["h"] * r["w"], r["median_s"] * 1e3) for r in sub if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=color.get(prov))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("C×H×W per sample")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(device_dir, "time_vs_size.png"), dpi=80)
    plt.close(fig)

    # memory vs N at the most common shape
    n_per_shape = {}
    for r in rows:
        n_per_shape.setdefault(r["shape"], set()).add(r["n"])
    s_fix = ("3x256x256" if len(n_per_shape.get("3x256x256", ())) >= 3
             else max(n_per_shape, key=lambda k: (len(n_per_shape[k]), k)))
    fig, axes = grid(f"peak extra memory vs N, {s_fix}, float32, {pass_name}")
    for ax, op in zip(axes, ops):
        sub = [r for r in rows if r["op"] == op and r["shape"] == s_fix and r.get("peak_extra_bytes") is not None]
        for prov in sorted({r["provider"] for r in sub}, key=_provider_key):
            pts = sorted((r["n"], r["peak_extra_bytes"] / 2**20) for r in sub if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=color.get(prov))
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(op)
        ax.set_xlabel("N")
        ax.set_ylabel("peak extra MiB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(device_dir, "memory_vs_n.png"), dpi=80)
    plt.close(fig)


def update_readme(results_dir: str, readme: str):
    sections = []
    base = os.path.dirname(os.path.abspath(readme))
    for device_dir in sorted(glob.glob(os.path.join(results_dir, "*"))):
        if os.path.isdir(device_dir):
            sec = device_section(device_dir, os.path.relpath(device_dir, base))
            if sec:
                sections.append(sec)
    block = "\n\n".join([START, "<!-- generated by `python -m bench.run`; edits between the markers are lost -->",
                         *sections, END])
    text = open(readme).read() if os.path.exists(readme) else f"# dsfast benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(readme, "w") as f:
        f.write(text)


def report(results_dir: str, readme: str, only: str | None = None):
    for device_dir in sorted(glob.glob(os.path.join(results_dir, "*"))):
        if os.path.isdir(device_dir) and (only is None or os.path.abspath(device_dir) == os.path.abspath(only)):
            write_device_table(device_dir)
            plot_device(device_dir)
    update_readme(results_dir, readme)


# -- main ----------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("cpu", "gpu", "gpu-train"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="one tiny shape, few repeats (smoke test)")
    ap.add_argument("--results-dir", default=RESULTS)
    ap.add_argument("--readme", default=README, help="markdown file whose marker block is regenerated")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: all cores)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the sweep; rows after it are recorded as skipped "
                         "(default cpu 480, gpu 450, gpu-train 500)")
    ap.add_argument("--ops", default=None, help="comma-separated subset of ops")
    ap.add_argument("--providers", default=None, help="comma-separated subset of providers")
    ap.add_argument("--n", default=None, help="GPU: comma-separated batch sizes (default 4,16,64,256)")
    ap.add_argument("--shapes", default=None, help="GPU: comma-separated CxHxW (default the issue's six)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="GPU: dtypes (default fp32,bf16)")
    ap.add_argument("--max-input-gib", type=float, default=4.0,
                    help="GPU: skip rows whose inputs together exceed this (default 4 GiB)")
    ap.add_argument("--models", default=None, help="training models (cpu: tiny; gpu-train: adm256,sd15,sdxl)")
    ap.add_argument("--no-training", action="store_true", help="cpu suite: skip the training step")
    ap.add_argument("--no-split", action="store_true", help="cpu suite: skip the split of a training step")
    ap.add_argument("--split-only", action="store_true",
                    help="cpu suite: only the split of a training step into its parts (official vs dsfast)")
    ap.add_argument("--split-models", default="demo,sd-small",
                    help="models of the split (bench/training.py MODELS; default demo,sd-small)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="cpu suite: 'thread' times the calling thread's CPU time (needs --threads 1; for a "
                         "machine shared with other jobs)")
    ap.add_argument("--headline-only", action="store_true",
                    help="cpu suite: only the N=16, 3x256x256, float32 rows (with torch.compile where planned)")
    ap.add_argument("--no-batch-search", action="store_true", help="gpu-train: skip the largest micro-batch search")
    ap.add_argument("--tag", default=None,
                    help="suffix of the output files (kernels-<suite>-<tag>.jsonl), to keep a split run's parts; "
                         "the tables merge every file, the latest row winning")
    ap.add_argument("--report-only", action="store_true", help="rebuild tables/plots from the results folder")
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in logs as they happen

    warnings.filterwarnings("ignore", message=".*reduction: 'mean' divides.*")
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.pop("DSFAST_POISON_OUTPUTS", None)  # a test-only debug fill; never time it

    if args.report_only:
        report(args.results_dir, args.readme)
        print(f"updated {args.readme}")
        return 0

    from bench import kernels, peers, roof, training

    suite = args.suite
    if args.split_only and (suite != "cpu" or args.no_split):
        ap.error("--split-only needs the cpu suite and no --no-split")
    split_models = args.split_models.split(",")
    unknown = set(split_models) - set(training.MODELS)
    if unknown:
        ap.error(f"unknown --split-models {sorted(unknown)}; known: {list(training.MODELS)}")

    if suite == "cpu":
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print(f"--suite {suite} needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    threads = args.threads or (os.cpu_count() if device.type == "cpu" else torch.get_num_threads())
    if args.clock == "thread" and (device.type != "cpu" or threads != 1):
        ap.error("--clock thread needs the cpu suite and --threads 1")
    torch.set_num_threads(threads)
    budget = args.time_budget or {"cpu": 480, "gpu": 450, "gpu-train": 500}[suite]
    if args.quick:
        budget = args.time_budget or 120
    t_start = time.monotonic()
    deadline = t_start + budget

    env = environment(device, suite, threads)
    env["clock"] = args.clock
    device_dir = os.path.join(args.results_dir, slugify(env["device"]))
    tag = suite + (f"-{slugify(args.tag)}" if args.tag else "") + ("-quick" if args.quick else "")
    print(f"dsfast bench --suite {tag}: {env['device']}, torch {env['torch']}, {threads} thread(s), "
          f"budget {budget:.0f} s -> {device_dir}")

    if suite in ("cpu", "gpu") and not args.split_only:
        ops = args.ops.split(",") if args.ops else list(peers.OPS)
        unknown = set(ops) - set(peers.OPS)
        if unknown:
            ap.error(f"unknown ops {sorted(unknown)}; known: {list(peers.OPS)}")
        providers = peers.providers_for(device)
        if args.providers:
            providers = [p for p in providers if p in args.providers.split(",")]
            if "reference" not in providers:
                providers.insert(0, "reference")  # the speed-up baseline
        elif args.quick:
            providers = [p for p in providers if p not in ("compile", "pytorch_wavelets", "ptwt")]
        if device.type == "cpu":
            plan = cpu_plan(providers, ops, args.quick, args.headline_only)
            timer = (kernels.Timer(device, min_time=0.002, min_reps=2, max_reps=3, clock=args.clock) if args.quick
                     else kernels.Timer(device, min_time=0.1, min_reps=5, max_reps=25, clock=args.clock))
            max_input = None
        else:
            ns = [int(v) for v in args.n.split(",")] if args.n else ALL_NS
            shapes = [_parse_shape(s) for s in args.shapes.split(",")] if args.shapes else ALL_SHAPES
            dtypes = [_dtype(d) for d in args.dtypes.split(",")]
            plan = gpu_plan(providers, ops, ns, shapes, dtypes, args.quick)
            timer = kernels.Timer(device, min_time=0.01, min_reps=5, max_reps=30)
            max_input = int(args.max_input_gib * 2**30)
        copy_gbps = kernels.copy_bandwidth_gbps(device, clock=args.clock)
        env["copy_gbps"] = copy_gbps
        fma_gfmas = None
        if device.type == "cpu":
            fma_gfmas = env["fma_gfmas"] = roof.fma_peak_gfmas(clock=args.clock)
            env["cpu_isa"] = _cpu_isa()
            print(f"FMA peak (float32 torch.mm 2048^3): {fma_gfmas:.1f} GFMA/s; C++ CPU loops: {env['cpu_isa']}")
        print(f"copy bandwidth: {copy_gbps:.1f} GB/s; {len(plan)} plan entries")
        writer = Writer(os.path.join(device_dir, f"kernels-{tag}.jsonl"))
        try:
            kernels.run_sweep(plan, device=device, timer=timer, base_row=env, emit=writer, deadline=deadline,
                              copy_gbps=copy_gbps, max_input_bytes=max_input, fma_gfmas=fma_gfmas)
        finally:
            writer.close()
        ok = sum(r.get("status") == "ok" for r in writer.rows)
        print(f"{ok} rows measured, {len(writer.rows) - ok} skipped/error, {time.monotonic() - t_start:.0f} s")
        if device.type == "cpu":
            print(roof_summary(writer.rows))

    if suite == "gpu-train" or (suite == "cpu" and not args.no_training and not args.split_only):
        models = args.models.split(",") if args.models else (["tiny"] if suite == "cpu" else ["adm256", "sd15", "sdxl"])
        writer = Writer(os.path.join(device_dir, f"training-{tag}.jsonl"))
        train_deadline = deadline + (60 if suite == "cpu" else 0)  # the CPU step gets its own minute
        try:
            training.run(models, training.VARIANTS, device, base_row=env, emit=writer, deadline=train_deadline,
                         warmup=1 if args.quick else 2, steps=1 if args.quick else (3 if suite == "cpu" else 5),
                         batch=4 if args.quick else None, latent=(3, 16, 16) if args.quick and suite == "cpu" else None,
                         search=device.type == "cuda" and not args.quick and not args.no_batch_search)
        finally:
            writer.close()

    if suite == "cpu" and not args.no_split:
        writer = Writer(os.path.join(device_dir, f"split-{tag}.jsonl"))
        try:  # quick: the tiny model at 3x16x16, one timed step; the split gets its own 3 minutes
            training.run_split(["tiny"] if args.quick else split_models, device, base_row=env, emit=writer,
                               deadline=deadline + 60 + 180,
                               warmup=1 if args.quick else 2, steps=1 if args.quick else 5,
                               batch=4 if args.quick else None, latent=(3, 16, 16) if args.quick else None,
                               clock=args.clock)
        finally:
            writer.close()

    report(args.results_dir, args.readme, only=device_dir)
    print(f"wrote {device_dir} and {args.readme} in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
