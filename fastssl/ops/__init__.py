"""Triton kernels: one module per fused op (kernels + launchers + autograd), each exposing
``AOT_KERNELS`` for ``fastssl gpu-report``. Imported lazily by the public API."""
