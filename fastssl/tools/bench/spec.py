"""What a benchmark of one op is: inputs per size, and the providers compared on them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# provider name -> fn(inputs) -> output. The output of a differentiable op is the loss
# (a scalar, or anything whose .sum() can be back-propagated).
ProviderFn = Callable[[dict], torch.Tensor]


@dataclass
class OpBench:
    """A benchmark of one op, compared across providers on identical inputs.

    Attributes:
        name: what ``fastssl bench --op`` takes, e.g. ``"nt_xent"``.
        x_label: what the size means, e.g. ``"2N"`` or ``"batch"``.
        sizes: the default sizes (the x axis of the plots).
        make_inputs: ``(size, dtype, device) -> dict`` of fresh inputs; tensors that need
            gradients have ``requires_grad`` set. Called once per measured run.
        fused: the fastssl op, ``fn(inputs) -> output``.
        reference: the pure-PyTorch reference, ``fn(inputs) -> output``; the harness also
            times ``torch.compile(reference)`` as provider ``"compiled"``.
        extra_providers: further baselines (e.g. a peer library when installed), by name.
        differentiable: whether modes ``backward``/``both`` make sense.
        flops: ``size -> FLOPs`` of the op's floor (e.g. two matmul-equivalents), or None.
        skip: ``(provider, size, device) -> reason or None``: skip cases that cannot fit.
        unit: optional throughput unit for the table: ``(size, seconds) -> (value, label)``.
        describe: a one-line description of the setup (dims, dtype) for the table header.
    """

    name: str
    x_label: str
    sizes: list
    make_inputs: Callable[[int, torch.dtype, torch.device], dict]
    fused: ProviderFn
    reference: ProviderFn
    extra_providers: dict = field(default_factory=dict)
    differentiable: bool = True
    flops: Optional[Callable[[int], float]] = None
    skip: Optional[Callable[[str, int, torch.device], Optional[str]]] = None
    unit: Optional[Callable[[int, float], tuple]] = None
    describe: str = ""

    @property
    def modes(self) -> tuple:
        return ("forward", "backward", "both") if self.differentiable else ("forward",)

    def providers(self) -> list:
        return ["fused", "reference", "compiled", *self.extra_providers]
