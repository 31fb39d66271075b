"""NT-Xent, fused vs eager reference vs torch.compile(reference), forward+backward.

    pytest benchmarks/bench_ntxent.py --benchmark-group-by=param:size
    FASTSSL_BENCH_SIZES=2048,8192,16384 pytest benchmarks/bench_ntxent.py

Each test times fwd+bwd on fresh inputs per round (made in the untimed setup); torch.compile
compiles during the warm-up round, outside the timed rounds. Peak memory per case is recorded in
``extra_info["peak_mb"]``, measured in a separate process by ``fastssl.tools.bench.worker``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import bench_sizes
from fastssl.tools.bench.op_ntxent import BENCHES

SPEC = BENCHES[0]
PROVIDERS = {"fused": SPEC.fused, "reference": SPEC.reference}


def _peak_mb(provider, size, device):
    job = {"op": SPEC.name, "provider": provider, "size": size, "modes": ["both"],
           "dtype": "float32", "device": device.type, "repeat": 1, "max_seconds": 1}
    out = subprocess.run([sys.executable, "-m", "fastssl.tools.bench.worker", json.dumps(job)],
                         capture_output=True, text=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    rows = [json.loads(l[7:]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    return rows[0].get("peak_mb") if rows else None


@pytest.mark.parametrize("size", bench_sizes([2048, 4096]))
@pytest.mark.parametrize("provider", ["fused", "reference", "compiled"])
def test_nt_xent_fwd_bwd(benchmark, provider, size, device):
    reason = SPEC.skip(provider, size, device)
    if reason:
        pytest.skip(reason)
    fn = torch.compile(SPEC.reference) if provider == "compiled" else PROVIDERS[provider]

    def setup():
        return (SPEC.make_inputs(size, torch.float32, device),), {}

    def step(inputs):
        fn(inputs).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"nt_xent fwd+bwd 2N={size}"
    benchmark.extra_info["peak_mb"] = _peak_mb(provider, size, device)
    benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=1)
