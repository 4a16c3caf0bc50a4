"""Timing, peak-memory and bandwidth measurement, and the op sweep.

Timing
------
CPU: ``time.perf_counter`` around each call, thread count fixed with ``torch.set_num_threads`` and
recorded; ``--clock thread`` (one thread only) times the CPU time of the calling thread instead, which
on a machine shared with other jobs leaves out their time slices. GPU: a CUDA event pair around each call, the L2 cache flushed (a 256 MiB buffer zeroed)
before each call outside the events, as ``triton.testing.do_bench`` does. Each measurement warms up
(the first call also compiles, for ``torch.compile``; that time is recorded as ``warmup_s``), then
repeats until ``min_time`` seconds and ``min_reps`` calls (at most ``max_reps``; calls slower than
``slow`` seconds, such as the official double loop, skip further warm-up and take 3 calls); rows give
the median, 20th and 80th percentile. ``first_call_s`` (fwd+bwd rows) is the first forward with autograd:
for ``compile`` it holds the compile time of the training graph, ``warmup_s`` of the fwd row that of
the inference graph.

Passes
------
``fwd``      one forward under ``torch.no_grad()`` (inference cost, no graph);
``bwd``      ``torch.autograd.grad`` of a graph built by a forward outside the timed region (a fresh graph
             per call: torch.compile's donated buffers forbid ``retain_graph``); random cotangents for
             tensor outputs, 1 for scalar losses;
``fwd+bwd``  forward with autograd recording, then ``torch.autograd.grad`` (a training step's view).
``autograd.grad`` returns the gradients instead of accumulating into ``.grad``, so repeats stay equal.

Peak extra memory
-----------------
GPU: ``torch.cuda.max_memory_allocated()`` during one pass minus ``memory_allocated()`` before it
(inputs, and for ``bwd`` the saved graph, are already allocated, so this is the memory the pass adds).
CPU: torch's CPU allocator as seen by ``torch.profiler`` (``profile_memory=True``): the peak of the
running sum of every allocation and free during one pass. It counts every tensor torch allocates
(outputs, intermediates, gradients, the C++ extension's ``at::empty``); it does not count memory that
libraries allocate themselves (oneDNN/MKL scratch, OpenMP stacks, a kernel's ``std::vector``). For
pywt (numpy) the same pass runs under ``tracemalloc``, which sees numpy's buffers.

Bandwidth
---------
``gbps`` = the op's ideal bytes (each input read once, each output written once per pass; see
``OpSpec.fwd_bytes``) / median time. ``pct_copy_bw`` compares it with a large same-device copy
(``dst.copy_(src)``, 2 x bytes / time) measured in the same run.

Roof (CPU)
----------
``roof_s`` = max(traffic bytes / copy bandwidth, FMAs / FMA peak), both measured in the same run (the
FMA peak: a large float32 ``torch.mm`` on the same threads), with the per-op traffic and FMA models of
:mod:`bench.roof`; ``pct_roof`` = 100 x roof_s / median time, ``roof_bound`` says which term sets it.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time
import tracemalloc

import torch

from bench import peers, roof

PASSES = ("fwd", "bwd", "fwd+bwd")


# -- timing --------------------------------------------------------------------------------------
class Timer:
    """Times zero-argument callables on one device; ``settings`` from the suite."""

    def __init__(self, device: torch.device, *, min_time: float, min_reps: int, max_reps: int, warmup: int = 1,
                 slow: float = 0.25, clock: str = "wall"):
        self.device, self.slow = device, slow
        # CPU "thread": CPU time of the calling thread (single-threaded runs on a shared machine,
        # where wall time also counts the other processes' time slices).
        self.clock = time.thread_time if clock == "thread" else time.perf_counter
        self.min_time, self.min_reps, self.max_reps, self.warmup = min_time, min_reps, max_reps, warmup
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _one(self, fn, setup=None) -> float:
        state = () if setup is None else (setup(),)  # untimed (bwd: builds the graph)
        if self.device.type == "cuda":
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*state)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = self.clock()
        fn(*state)
        return self.clock() - t0

    def measure(self, fn, setup=None) -> dict:
        """Warm up, then time ``fn`` repeatedly (``fn(setup())`` when ``setup`` is given); seconds."""
        self.sync()
        t0 = time.perf_counter()
        self._one(fn, setup)
        self.sync()
        first = time.perf_counter() - t0
        if first > self.slow:  # e.g. the official double loop: the first call was the warm-up
            est, min_reps = first, min(self.min_reps, 3)
        else:
            for _ in range(max(1, self.warmup)):
                est = self._one(fn, setup)
            min_reps = self.min_reps
        reps = int(min(self.max_reps, max(min_reps, math.ceil(self.min_time / max(est, 1e-7)))))
        times = sorted(self._one(fn, setup) for _ in range(reps))
        return {
            "median_s": statistics.median(times),
            "p20_s": _quantile(times, 0.2),
            "p80_s": _quantile(times, 0.8),
            "min_s": times[0],
            "reps": reps,
            "warmup_s": first,
        }


def _quantile(sorted_times: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_times) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


# -- memory ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on fd 2; hide them (only around the profiled pass)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_extra_bytes(fn, setup=None) -> int:
    """Peak of the running sum of torch CPU allocations minus frees while ``fn`` runs (torch.profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    state = () if setup is None else (setup(),)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*state)
        del result, state
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    running = peak = 0
    for _, size in sorted(allocations):
        running += size
        peak = max(peak, running)
    return peak


def numpy_peak_extra_bytes(fn, setup=None) -> int:
    state = () if setup is None else (setup(),)
    tracemalloc.start()
    try:
        result = fn(*state)
        del result
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def cuda_peak_extra_bytes(fn, device, setup=None) -> int:
    state = () if setup is None else (setup(),)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn(*state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result, state
    return peak - base


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, clock: str = "wall") -> float:
    """Same-device copy bandwidth (read + write), GB/s (1e9 bytes/s)."""
    if nbytes is None:
        nbytes = 1 * 2**30 if device.type == "cuda" else 128 * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, min_time=0.2, min_reps=5, max_reps=50, warmup=2, clock=clock)
    t = timer.measure(lambda: dst.copy_(src))["median_s"]
    return 2 * nbytes / t / 1e9


# -- one measurement row --------------------------------------------------------------------------
def _cotangents(outs: list[torch.Tensor], seed: int = 1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cots = []
    for o in outs:
        if o.dim() == 0:
            cots.append(None)
        else:
            cots.append(torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype))
    return cots


def pass_fns(call, leaves):
    """``{pass: (setup, fn)}``: ``fn()`` (or ``fn(setup())``, ``setup`` untimed) runs the pass once."""

    def fwd():
        with torch.no_grad():
            return call()

    fns = {"fwd": (None, fwd)}
    if leaves is None:
        return fns
    t0 = time.perf_counter()
    probe = [o for o in peers.flatten_tensors(call()) if o.requires_grad]
    fns["first_call_s"] = time.perf_counter() - t0  # includes torch.compile's compile of the training graph
    cots = _cotangents(probe)
    del probe

    def graph():  # the forward of the bwd pass, run outside the timed region
        return [o for o in peers.flatten_tensors(call()) if o.requires_grad]

    def bwd(outs):
        # No retain_graph: a fresh graph per call (torch.compile's donated buffers forbid reusing one).
        return torch.autograd.grad(outs, leaves, cots, allow_unused=True)

    def fwd_bwd():
        return bwd(graph())

    fns["bwd"] = (graph, bwd)
    fns["fwd+bwd"] = (None, fwd_bwd)
    return fns


def measure_provider(provider: str, op: str, inputs: dict, timer: Timer, passes=PASSES, with_memory=True) -> dict:
    """``{pass: result dict}`` for one provider and op (times in seconds, memory in bytes)."""
    with peers.isa_for(provider):
        return _measure(provider, op, inputs, timer, passes, with_memory)


def _measure(provider: str, op: str, inputs: dict, timer: Timer, passes, with_memory) -> dict:
    call, leaves = peers.build(provider, op, inputs)
    fns = pass_fns(call, leaves)
    device = inputs["x"].device
    results = {}
    for p in passes:
        if p not in fns:
            continue  # no autograd (pywt): forward rows only
        setup, fn = fns[p]
        res = timer.measure(fn, setup)
        res["status"] = "ok"
        if p == "fwd+bwd":
            res["first_call_s"] = fns["first_call_s"]
        if with_memory:
            if device.type == "cuda":
                res["peak_extra_bytes"] = cuda_peak_extra_bytes(fn, device, setup)
                res["memory_method"] = "cuda max_memory_allocated - memory_allocated"
            elif provider == "pywt":
                res["peak_extra_bytes"] = numpy_peak_extra_bytes(fn, setup)
                res["memory_method"] = "tracemalloc (numpy)"
            else:
                res["peak_extra_bytes"] = cpu_peak_extra_bytes(fn, setup)
                res["memory_method"] = "torch.profiler CPU allocator"
        results[p] = res
    fns.clear()
    return results


# -- the sweep ------------------------------------------------------------------------------------
def shape_str(c, h, w) -> str:
    return f"{c}x{h}x{w}"


def run_sweep(plan, *, device, timer, base_row: dict, emit, deadline: float, copy_gbps: float | None,
              max_input_bytes: int | None, fma_gfmas: float | None = None, log=print):
    """Run ``plan`` (list of ``(n, c, h, w, dtype, ops, providers)``), calling ``emit(row)`` per row.

    ``fma_gfmas`` (CPU: the FMA peak measured in the run) with ``copy_gbps`` adds each row's roof.
    Rows that would pass ``deadline`` (time.monotonic), exceed ``max_input_bytes`` (all the op's inputs
    together), or run out of memory are emitted with ``status`` ``skipped`` and the reason.
    """
    peers.configure_compile()
    reference_median = {}  # (op, pass, n, shape, dtype) -> reference median, shared across plan entries
    for n, c, h, w, dtype, ops, providers in plan:
        elt = torch.empty((), dtype=dtype).element_size()
        tensor_bytes = n * c * h * w * elt
        dname = str(dtype).removeprefix("torch.")
        common = dict(base_row, n=n, c=c, h=h, w=w, shape=shape_str(c, h, w), dtype=dname,
                      tensor_bytes=tensor_bytes)
        inputs = None
        for op in ops:
            spec = peers.OPS[op]
            op_bytes = tensor_bytes * len(spec.inputs)
            for provider in providers:
                row = dict(common, op=op, provider=provider)
                if peers.supports(provider, op, n, dtype, device, tensor_bytes) is not None:
                    continue  # structural (the provider has no such op/dtype; official N cap): no row
                reason = None
                if max_input_bytes is not None and op_bytes > max_input_bytes:
                    reason = f"inputs {op_bytes / 2**30:.2f} GiB over the row budget {max_input_bytes / 2**30:.2f} GiB"
                if reason is None and time.monotonic() > deadline:
                    reason = "time budget of the suite exhausted"
                if reason is not None:
                    for p in PASSES:
                        emit(dict(row, **{"pass": p}, status="skipped", reason=reason))
                    continue
                try:
                    if inputs is None:
                        inputs = peers.make_inputs(n, c, h, w, dtype, device)
                    results = measure_provider(provider, op, inputs, timer)
                except peers.Unsupported as err:
                    log(f"  skip {op} {provider}: {err}")
                    continue
                except torch.cuda.OutOfMemoryError as err:
                    results = {p: {"status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0][:120]}"}
                               for p in PASSES}
                except Exception as err:  # a peer library failing on a dtype/shape is a row, not a crash
                    results = {p: {"status": "error", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                               for p in PASSES}
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                shares = {}  # pass -> % of the roof, for the log line
                for p, res in results.items():
                    out = dict(row, **{"pass": p})
                    out.update(res)
                    if res.get("status") == "ok":
                        key = (op, p, n, c, h, w, dtype)
                        if provider == "reference":
                            reference_median[key] = res["median_s"]
                        if key in reference_median:
                            out["speedup_vs_reference"] = reference_median[key] / res["median_s"]
                        ideal = {"fwd": spec.fwd_bytes, "bwd": spec.bwd_bytes,
                                 "fwd+bwd": spec.fwd_bytes + spec.bwd_bytes}[p] * tensor_bytes
                        out["ideal_bytes"] = int(ideal)
                        out["gbps"] = ideal / res["median_s"] / 1e9
                        if copy_gbps:
                            out["pct_copy_bw"] = 100 * out["gbps"] / copy_gbps
                        bound = (roof.roof(op, p, n, c * h * w, elt, copy_gbps, fma_gfmas)
                                 if copy_gbps and fma_gfmas else None)
                        if bound is not None:
                            out.update(bound, pct_roof=100 * bound["roof_s"] / res["median_s"])
                            shares[p] = out["pct_roof"]
                    emit(out)
                what = f"  {op:26s} {provider:18s} N={n:<4d} {shape_str(c, h, w):12s} {dname:9s}"
                shown = "fwd+bwd" if "fwd+bwd" in results else "fwd"
                res = results[shown]
                if res.get("status") == "ok":
                    share = f" {shares[shown]:5.1f}% of roof" if shown in shares else ""
                    log(f"{what} {shown:7s} {res['median_s'] * 1e3:10.3f} ms{share}")
                else:
                    log(f"{what} {res.get('status')}: {res.get('reason')}")
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
