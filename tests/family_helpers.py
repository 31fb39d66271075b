"""Shared checks of the contrastive-family tests (info_nce, clip_loss, supcon): the fused op
vs an fp64 truth, with plain PyTorch's own error in the test dtype as the tolerance
(tests/helpers.py)."""
from __future__ import annotations

import torch

from helpers import assert_close_to_truth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def compare(name, fused, reference, tensors, dtype, *, grad_out=True):
    """Runs ``fused(*xs)`` on the inputs cast to ``dtype``, ``reference`` on the same values in
    fp64 (truth) and in ``dtype`` (plain PyTorch's own error), then compares the loss and the
    gradient of every input that requires grad (float leaves in ``tensors``).

    ``tensors``: fp64 masters; a master with ``requires_grad`` gets a gradient checked.
    """
    def leaves(target_dtype):
        out = []
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                x = t.detach().to(dtype).to(target_dtype)
                out.append(x.requires_grad_(t.requires_grad))
            else:
                out.append(t)
        return out

    runs = {}
    for key, fn, dt in (("fused", fused, dtype), ("truth", reference, torch.float64),
                        ("lowp", reference, dtype)):
        xs = leaves(dt)
        loss = fn(*xs)
        wrt = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = torch.autograd.grad(loss, wrt) if wrt else []
        runs[key] = (loss, grads)
    assert runs["fused"][0].dtype == dtype, f"{name}: loss dtype {runs['fused'][0].dtype}"
    assert_close_to_truth(f"{name} loss", runs["fused"][0], runs["truth"][0], runs["lowp"][0],
                          dtype)
    for i, (gf, gt, gl) in enumerate(zip(runs["fused"][1], runs["truth"][1], runs["lowp"][1])):
        assert gf.dtype == dtype or gf.dim() == 0, f"{name}: grad {i} dtype {gf.dtype}"
        assert_close_to_truth(f"{name} grad[{i}]", gf, gt, gl, dtype)
