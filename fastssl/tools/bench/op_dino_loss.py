"""Benchmark spec: the DINO head loss (``fastssl.dino_loss``), 2 global + 6 local crops of B
samples (the x axis), bottleneck 256, K prototypes, separate student and teacher last layers.
Fused (K-streamed) vs the eager reference (DINO's DINOLoss: [rows, K] logits, log-softmax per
crop pair) vs torch.compile(reference).

Two specs: ``dino_loss`` (K = 65,536, DINO's default; the issue's acceptance at B = 64) and
``dino_loss_k262k`` (K = 262,144, DINOv3's head, at B = 256; the reference is skipped where its
estimated memory, EAGER_BYTES_PER_LOGIT per student logit, exceeds 80% of what is free)."""
from __future__ import annotations

import torch

from ... import functional, reference
from .spec import OpBench

N_GLOBAL, N_LOCAL, BOTTLENECK = 2, 6, 256
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
# Eager's peak per element of the student logits [8B, K] (fp32, forward + backward): measured
# 749 MB at B = 64, K = 65,536 (`fastssl bench --op dino_loss --sizes 64`, 2026-12-02), i.e.
# ~22 bytes (logits, log-softmax per pair, their gradients). At B = 256, K = 262,144: ~12 GB.
EAGER_BYTES_PER_LOGIT = 22.3


def _inputs(k: int):
    def make_inputs(b: int, dtype: torch.dtype, device: torch.device) -> dict:
        g = torch.Generator().manual_seed(0)
        n_crops = N_GLOBAL + N_LOCAL

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        return {
            "student_h": rand(n_crops * b, BOTTLENECK).requires_grad_(),
            "teacher_h": rand(N_GLOBAL * b, BOTTLENECK),
            "weight_student": rand(k, BOTTLENECK).requires_grad_(),
            "weight_teacher": rand(k, BOTTLENECK),
            "center": torch.zeros(1, k, device=device),
        }
    return make_inputs


def _args(x: dict) -> tuple:
    return (x["student_h"], x["teacher_h"], x["weight_student"], x["weight_teacher"],
            x["center"])


def fused(x: dict) -> torch.Tensor:
    return functional.dino_loss(*_args(x), n_global=N_GLOBAL, student_temp=STUDENT_TEMP,
                                teacher_temp=TEACHER_TEMP)[0]


def eager(x: dict) -> torch.Tensor:
    return reference.dino_loss(*_args(x), n_global=N_GLOBAL, student_temp=STUDENT_TEMP,
                               teacher_temp=TEACHER_TEMP)[0]


def _floor(k: int):
    # The GEMMs eager cannot avoid: student and teacher logits, then dh and dW of the student:
    # (3 S + T) rows x K x d x 2 FLOPs, S = 8 B, T = 2 B.
    return lambda b: 2.0 * (3 * (N_GLOBAL + N_LOCAL) * b + N_GLOBAL * b) * k * BOTTLENECK


def _available_ram() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float("inf")


def _skip(k: int):
    def skip(provider: str, b: int, device: torch.device):
        if provider not in ("reference", "compiled"):
            return None
        need = EAGER_BYTES_PER_LOGIT * (N_GLOBAL + N_LOCAL) * b * k
        free = (torch.cuda.mem_get_info()[0] if device.type == "cuda" else _available_ram())
        if need > 0.8 * free:
            return (f"needs ~{need / 2**30:.0f} GiB for its [rows, K] logits, "
                    f"{free / 2**30:.0f} GiB free")
        return None
    return skip


BENCHES = [
    OpBench(name="dino_loss", x_label="B", sizes=[16, 64], make_inputs=_inputs(65536),
            fused=fused, reference=eager, flops=_floor(65536), skip=_skip(65536),
            describe=f"DINO head loss, {N_GLOBAL}+{N_LOCAL} crops x B, d={BOTTLENECK}, "
                     f"K=65536, tau_s={STUDENT_TEMP}, tau_t={TEACHER_TEMP}"),
    OpBench(name="dino_loss_k262k", x_label="B", sizes=[256], make_inputs=_inputs(262144),
            fused=fused, reference=eager, flops=_floor(262144), skip=_skip(262144),
            describe=f"DINO head loss, {N_GLOBAL}+{N_LOCAL} crops x B, d={BOTTLENECK}, "
                     f"K=262144 (DINOv3), tau_s={STUDENT_TEMP}, tau_t={TEACHER_TEMP}"),
]
