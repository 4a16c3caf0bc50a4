"""pytest configuration for the pytest-benchmark suite in bench/ (never collected by `make test`,
which runs `pytest tests`). Run it with `python -m pytest bench -m bench --benchmark-only`."""
import os
import warnings

import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a pytest-benchmark timing (bench/, not part of `make test`)")
    os.environ.pop("DSFAST_POISON_OUTPUTS", None)
    torch.set_num_threads(int(os.environ.get("DSFAST_BENCH_THREADS", os.cpu_count() or 1)))
    warnings.filterwarnings("ignore", message=".*reduction: 'mean' divides.*")
