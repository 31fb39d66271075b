"""Triton kernels: one file per fused op = kernels + launchers (+ autograd.Function), each with
an ``AOT_KERNELS`` list for ``fastssl gpu-report``."""
