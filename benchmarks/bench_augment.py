"""pytest-benchmark: SSL augmentation, two SimCLR views per image, 256^2 uint8 -> 224^2 fp32.

    python -m pytest benchmarks/bench_augment.py --benchmark-only --benchmark-columns=median,ops

Providers come from ``fastssl/tools/bench/op_augment.py`` (fused C++ / Triton, the pure-PyTorch
reference, torch.compile of it, and torchvision v2 / kornia when installed). ``ops`` is calls
per second: multiply by the batch size for images per second.
"""
import pytest
import torch

from fastssl.tools.bench.op_augment import BENCHES

SPEC = BENCHES[0]
BATCH = 8  # small by default: the reference takes ~0.1 s per image pair here
PROVIDERS = ["fused", "reference", "compiled", *SPEC.extra_providers]


def _provider(name):
    if name == "fused":
        return SPEC.fused
    if name == "reference":
        return SPEC.reference
    if name == "compiled":
        return torch.compile(SPEC.reference)
    return SPEC.extra_providers[name]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_augment(benchmark, provider):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = SPEC.skip(provider, BATCH, device) if SPEC.skip else None
    if reason:
        pytest.skip(reason)
    fn = _provider(provider)
    inputs = SPEC.make_inputs(BATCH, torch.float32, device)
    fn(inputs)  # compile / first-call work outside the timed region

    def run():
        out = fn(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"augment batch={BATCH} (2 views)"
    benchmark.extra_info["images_per_call"] = BATCH
    v0, v1 = benchmark.pedantic(run, warmup_rounds=1, rounds=3, iterations=1)
    assert v0.shape == v1.shape == (BATCH, 3, 224, 224)
