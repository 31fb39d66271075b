"""pytest-benchmark suites: ``pytest benchmarks/bench_<op>.py`` (see benchmarks/README.md).

Sizes default to small values so a suite runs in about a minute here; set
``FASTSSL_BENCH_SIZES=2048,8192,16384`` for the sizes of the committed results.
"""
import os

import pytest


def bench_sizes(default):
    env = os.environ.get("FASTSSL_BENCH_SIZES")
    return [int(s) for s in env.split(",")] if env else default


@pytest.fixture(params=["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else []))
def device(request):
    import torch
    return torch.device(request.param)
