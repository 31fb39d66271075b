"""Python glue for the C++ kernels of ``csrc/cpu``: one module per op, each registering the
fake (meta) implementation and the autograd formula of its ``torch.ops.fastssl`` ops, so they
work under autograd, ``torch.compile`` and ``torch.library.opcheck``.

The modules are imported lazily by ``fastssl.functional`` when the C++ backend is used.
"""
