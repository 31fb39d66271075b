"""pytest-benchmark suite of the contrastive family (info_nce, clip_loss, supcon): fused vs
reference vs torch.compile(reference), forward + backward, on the OpBench specs of
fastssl/tools/bench/op_{info_nce,clip,supcon}.py. Small default sizes; run with

    python -m pytest benchmarks/bench_family.py --benchmark-only

FASTSSL_BENCH_SIZE_SCALE=<k> multiplies the sizes (the acceptance sizes are in
benchmarks/family_acceptance.py).
"""
import os

import pytest
import torch

from fastssl.tools.bench import op_clip, op_info_nce, op_supcon

SCALE = int(os.environ.get("FASTSSL_BENCH_SIZE_SCALE", "1"))
CASES = [(op_info_nce.BENCHES[0], 4096), (op_clip.BENCHES[0], 1024),
         (op_supcon.BENCHES[0], 1024)]
PROVIDERS = ["fused", "reference", "compiled"]

_compiled = {}


def _provider(spec, name):
    if name == "fused":
        return spec.fused
    if name == "reference":
        return spec.reference
    if spec.name not in _compiled:
        _compiled[spec.name] = torch.compile(spec.reference)
    return _compiled[spec.name]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("spec,size", CASES, ids=[c[0].name for c in CASES])
def test_fwd_bwd(benchmark, spec, size, provider):
    size *= SCALE
    fn = _provider(spec, provider)
    benchmark.group = f"{spec.name} {spec.x_label}={size} fwd+bwd"

    def setup():
        return (spec.make_inputs(size, torch.float32, torch.device("cpu")),), {}

    def step(inputs):
        fn(inputs).backward()

    # warmup_rounds=1: compilation happens outside the timed rounds.
    benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=1)
