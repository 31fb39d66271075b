"""Benchmark spec: the BERT masked-language-model head (masked positions P on the x axis,
hidden H = 768, vocabulary V = 30,522: BERT-base). Fused vs the eager reference (F.linear to the
[P, V] logits, F.cross_entropy) vs torch.compile(reference). The spec's loss is the mean, so the
fused path is ``masked_token_loss_sum`` (gradients formed in the forward, saved in fp32, scaled
in the backward).

FLOPs: the three P x V x H GEMMs every implementation needs (logits, dH, dW) are 3 x 2 P V H;
the fused CPU kernel does exactly those 3 (row blocks of up to 256 rows keep their logits over
the whole vocabulary, 31 MB, while the LSE is formed, then turn them into dlogits in place);
eager does 3 plus several passes over [P, V] fp32 buffers (500 MB each at P = 4,096). The
acceptance case is P = 4,096, fp32, forward + backward, 2 threads: fused >= 1.5x eager, >= 1.2x
compiled, extra memory <= 1/8 of eager's.

Measured (`fastssl bench --op masked_token_loss --sizes 4096 --modes both --repeat 3 --device
cpu`, 2 threads, load average 1.0-1.6, 512-wide vocabulary tiles): fused 3.53 s / 210 MB, eager
3.74 s / 1.43 GB, compiled 3.81 s / 578 MB: 1.06x eager, 1.08x compiled (time bars NOT met),
memory 1/6.8 of eager's (bar NOT met). Runs vary by ~10%: with 256-wide tiles two runs gave
1.13x / 1.00x and 0.92x / 0.88x. (The recomputing version, 4 GEMMs, measured 0.70x / 0.61x at
1/8.4, at load 19-30.) A second idle run, a day later (same command, load ~1.5): fused
4.60 s / 208 MB, eager 4.35 s, compiled 3.88 s: 0.95x / 0.84x (fused/floor 1.27x, eager at 1.20x
the 3-GEMM floor): the fused time itself moved by 30% between the two runs. Time: the fused op is at ~2.85 times one fp32 P x V x H torch.mm
(1.05-1.36 s here, 2 threads), i.e. at the 3-GEMM bound of eager's GEMM rate; 1.5x eager or 1.2x
compiled would need fewer GEMM FLOPs than any exact implementation does (eager's own 3.74 s is
little more than its 3 GEMMs) -- out of reach in fp32 on this CPU. Memory: the saved fp32 dW and
dH (107 MB) and the scaled copies the backward returned (weight.grad, hidden.grad: 107 MB) were
alive together in the backward (208 MB, 1/7.0 of eager). The backward now scales the saved fp32
gradients in place (``masked_token_loss_sum_bwd_``, a mutating schema) and returns them, and
AccumulateGrad takes them as weight.grad / hidden.grad / bias.grad without a copy (same
data_ptr): `fastssl bench --op masked_token_loss --sizes 4096 --modes both --providers fused
reference --repeat 1 --device cpu` gave fused 154 MB (the forward's peak: the gradients it
forms plus its logits block and staged rows; the backward adds 1 MB, was 102 MB), eager
1.43 GB (1,466 MB): 1/9.5 of eager's, memory bar met (1,466 / 8 = 183 MB). The full idle run
after that change (`--modes both --repeat 3 --device cpu`, all three providers; JSON
benchmarks/results/masked_token_loss_cpu.json): fused 3.69 s / 154 MB, eager 4.37 s / 1.43 GB,
compiled 3.89 s / 578 MB: 1.18x eager, 1.06x compiled (time bars still NOT met), memory 1/9.3."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

H, V = 768, 30522


def make_inputs(p: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(p, H, generator=g).to(device, dtype).requires_grad_(),
        "weight": (torch.randn(V, H, generator=g) * 0.02).to(device, dtype).requires_grad_(),
        "bias": torch.zeros(V).to(device, dtype).requires_grad_(),
        "labels": torch.randint(0, V, (p,), generator=g).to(device),
    }


BENCHES = [OpBench(
    name="masked_token_loss",
    x_label="P",
    sizes=[1024, 4096],
    make_inputs=make_inputs,
    fused=lambda x: functional.masked_token_loss(x["hidden"], x["weight"], x["labels"],
                                                 bias=x["bias"]),
    reference=lambda x: reference.masked_token_loss(x["hidden"], x["weight"], x["labels"],
                                                    bias=x["bias"]),
    flops=lambda p: 3 * 2.0 * p * V * H,
    describe=f"masked-token head, P masked positions, H={H}, V={V} (BERT-base), with bias",
)]
