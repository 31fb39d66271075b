"""pytest-benchmark suite of the MoCo machinery: EMA update and queue enqueue.

    python -m pytest benchmarks/bench_moco.py --benchmark-only --benchmark-group-by=param:size

Providers of one group run on identical inputs (the OpBench specs of fastssl/bench); the
torch.compile warm-up happens in untimed rounds. Every timed enqueue wraps around the end of
the queue (fastssl/tools/bench/op_queue.py resets the pointer before each call).
"""
from __future__ import annotations

import pytest
import torch

from fastssl.tools.bench import op_ema, op_queue

EMA = op_ema.BENCHES[0]
QUEUE = op_queue.BENCHES[0]
_compiled: dict = {}


def _provider(spec, name):
    if name == "fused":
        return spec.fused
    if name == "reference":
        return spec.reference
    if name == "compiled":
        if spec.name not in _compiled:
            _compiled[spec.name] = torch.compile(spec.reference)
        return _compiled[spec.name]
    return spec.extra_providers[name]


@pytest.mark.parametrize("provider", EMA.providers())
@pytest.mark.parametrize("size", [25, 100])
def test_ema(benchmark, provider, size):
    fn = _provider(EMA, provider)
    inp = EMA.make_inputs(size, torch.float32, torch.device("cpu"))
    benchmark.extra_info.update(op="ema", provider=provider, size=size)
    benchmark.pedantic(fn, args=(inp,), rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", QUEUE.providers())
@pytest.mark.parametrize("size", [256, 4096])
def test_enqueue(benchmark, provider, size):
    fn = _provider(QUEUE, provider)
    inp = QUEUE.make_inputs(size, torch.float32, torch.device("cpu"))
    benchmark.extra_info.update(op="moco_enqueue", provider=provider, size=size)
    benchmark.pedantic(fn, args=(inp,), rounds=20, iterations=1, warmup_rounds=1)
