"""Smoke test of the benchmark harness: `python -m bench.run --suite cpu --quick` into a temporary folder."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED = {"device", "device_type", "threads", "torch", "triton", "dsfast", "git_commit", "op", "pass", "n",
            "shape", "dtype", "provider", "status", "median_s", "p20_s", "p80_s", "peak_extra_bytes",
            "memory_method", "gbps", "copy_gbps", "speedup_vs_reference", "fma_gfmas", "cpu_isa", "roof_s",
            "roof_bound", "pct_roof"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_run_quick(tmp_path):
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text("# benchmarks\n\nintro kept\n\n<!-- dsfast-bench:start -->\nold\n<!-- dsfast-bench:end -->\n\ntail kept\n")
    env = {k: v for k, v in os.environ.items() if k != "DSFAST_POISON_OUTPUTS"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--suite", "cpu", "--quick", "--threads", "1",
         "--results-dir", str(results), "--readme", str(readme)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (device_dir,) = [p for p in results.iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (device_dir / "kernels-cpu-quick.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["status"] in ("ok", "skipped") for r in rows), [r for r in rows if r["status"] == "error"]
    for r in ok:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["median_s"] > 0
        assert r["threads"] == 1 and r["peak_extra_bytes"] >= 0
        assert r["roof_s"] > 0 and r["pct_roof"] == pytest.approx(100 * r["roof_s"] / r["median_s"])
    from bench import peers
    from dsfast.ops import available_backends

    expected = ["reference"] + [f"dsfast-{b}" for b in available_backends("cpu") if b != "triton"]
    for op in peers.OPS:
        for provider in expected:
            for p in ("fwd", "bwd", "fwd+bwd"):
                assert any(r["op"] == op and r["provider"] == provider and r["pass"] == p for r in ok), (op, provider, p)
    assert all(r["speedup_vs_reference"] == 1.0 for r in ok if r["provider"] == "reference")
    assert {r["provider"] for r in ok if r["op"] == "hf_pairwise_similarity_kl"} >= {"reference", "official"}
    assert any(r["provider"] == "pywt" and r["pass"] == "fwd" for r in ok)

    train = [json.loads(line) for line in (device_dir / "training-cpu-quick.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in train if r["status"] == "ok"} == {"official", "dsfast"}
    assert all(r["s_per_step"] > 0 and r["peak_bytes"] > 0 for r in train)

    from bench.training import PARTS

    split = [json.loads(line) for line in (device_dir / "split-cpu-quick.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in split) == ["dsfast", "official"]
    for r in split:
        assert r["cpu_simd"] and r["device"] == r["cpu"] and all(r[f"{p}_s"] > 0 for p in PARTS), r
        assert sum(r[f"{p}_pct"] for p in PARTS) == pytest.approx(100)

    for png in ("time_vs_size.png", "memory_vs_n.png"):
        data = (device_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    table = (device_dir / "table.md").read_text()
    assert "| hf_pairwise_similarity_kl | fwd+bwd |" in table
    text = readme.read_text()
    assert "intro kept" in text and "tail kept" in text and "\nold\n" not in text
    assert text.count("<!-- dsfast-bench:start -->") == 1 and "**Headline**" in text
    assert "time_vs_size.png" in text and "Training step" in text and "One DomainStudio step split" in text
