"""pytest-benchmark versions of the key CPU rows (N=16, 3x256x256, float32).

    python -m pytest bench/test_bench_cpu.py -m bench --benchmark-only [--benchmark-json out.json]

Threads: DSFAST_BENCH_THREADS (default: all cores). Not collected by `make test` (`pytest tests`).
The full sweep with memory and the tables is `python -m bench.run --suite cpu`.
"""
import pytest
import torch

from bench import kernels, peers

pytestmark = pytest.mark.bench

N, C, H, W = 16, 3, 256, 256
DEVICE = torch.device("cpu")
PROVIDERS = [p for p in peers.providers_for(DEVICE)]


@pytest.fixture(scope="module")
def inputs():
    return peers.make_inputs(N, C, H, W, torch.float32, DEVICE)


def _run(benchmark, inputs, op, provider, pass_):
    if peers.supports(provider, op, N, torch.float32, DEVICE):
        pytest.skip(peers.supports(provider, op, N, torch.float32, DEVICE))
    call, leaves = peers.build(provider, op, inputs)
    fns = kernels.pass_fns(call, leaves)
    if pass_ not in fns:
        pytest.skip(f"{provider}: no autograd")
    setup, fn = fns[pass_]
    benchmark.group = f"{op} {pass_} N={N} {C}x{H}x{W} float32"
    benchmark.extra_info.update(threads=torch.get_num_threads(), provider=provider, op=op, pass_=pass_)
    if setup is None:
        benchmark(fn)
    else:
        benchmark.pedantic(fn, setup=lambda: ((setup(),), {}), rounds=10, warmup_rounds=1)


# The headline: the fused hf pairwise-similarity KL, forward + backward.
@pytest.mark.parametrize("provider", ["reference", "official", "compile"] + [p for p in PROVIDERS if p.startswith("dsfast-")])
def test_hf_pairwise_similarity_kl_fwd_bwd(benchmark, inputs, provider):
    _run(benchmark, inputs, "hf_pairwise_similarity_kl", provider, "fwd+bwd")


@pytest.mark.parametrize("provider", ["reference", "official"] + [p for p in PROVIDERS if p.startswith("dsfast-")])
def test_domainstudio_loss_fwd_bwd(benchmark, inputs, provider):
    _run(benchmark, inputs, "domainstudio_loss", provider, "fwd+bwd")


@pytest.mark.parametrize("provider", ["reference", "official"] + [p for p in PROVIDERS if p.startswith("dsfast-")])
def test_high_frequency_fwd_bwd(benchmark, inputs, provider):
    _run(benchmark, inputs, "high_frequency", provider, "fwd+bwd")


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "official" and p != "compile"])
def test_haar_dwt2_fwd(benchmark, inputs, provider):
    _run(benchmark, inputs, "haar_dwt2", provider, "fwd")


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "official" and p != "compile"])
def test_haar_wavedec2_l3_fwd_bwd(benchmark, inputs, provider):
    _run(benchmark, inputs, "haar_wavedec2_l3", provider, "fwd+bwd" if provider != "pywt" else "fwd")
