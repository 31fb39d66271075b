"""Triton kernels: one module per fused op (kernels + launchers + autograd.Function), each
listing its ahead-of-time configurations in ``AOT_KERNELS`` (see ``fastssl gpu-report``)."""
