"""MoCo machinery: the momentum (EMA) update of a key/target encoder and the MoCo key queue.

The two non-loss hot spots of momentum-encoder methods (MoCo, BYOL, DINO-style teachers).
Naive code loops over every tensor of the model (161 for a ResNet-50) and reads the queue
pointer back to the host every step; here the EMA is one pass over all tensors (one launch
on GPU, one multi-threaded vectorised pass on CPU) and the queue pointer never leaves the
device.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from . import _dispatch, _validate, distributed, reference

TensorsOrModule = Union[nn.Module, Sequence[torch.Tensor]]


def _pairs(target: TensorsOrModule, online: TensorsOrModule, buffers: bool):
    """-> (EMA targets, EMA onlines, [(dst, src) buffers to copy])."""
    if isinstance(target, nn.Module) != isinstance(online, nn.Module):
        raise TypeError("target and online must both be nn.Modules or both be sequences of "
                        f"tensors, got {type(target).__name__} and {type(online).__name__}")
    if not isinstance(target, nn.Module):
        if isinstance(target, torch.Tensor) or isinstance(online, torch.Tensor):
            raise TypeError("target and online must be sequences of tensors (e.g. lists), "
                            "not single tensors: wrap them as [tensor]")
        return list(target), list(online), []
    tn = [n for n, _ in target.named_parameters()]
    on = [n for n, _ in online.named_parameters()]
    if tn != on:
        missing = sorted(set(tn) ^ set(on))[:5]
        raise ValueError("target and online modules must have the same parameters (same "
                         f"architecture); they differ in {missing or 'order'}")
    ts = [p for p in target.parameters()]
    os_ = [p for p in online.parameters()]
    copies = []
    if buffers:
        tb = dict(target.named_buffers())
        ob = dict(online.named_buffers())
        if list(tb) != list(ob):
            raise ValueError("target and online modules must have the same buffers; they "
                             f"differ in {sorted(set(tb) ^ set(ob))[:5] or 'order'}")
        for name, b in tb.items():
            if b.is_floating_point():
                ts.append(b)
                os_.append(ob[name])
            else:  # e.g. BatchNorm's num_batches_tracked: copied, an average makes no sense
                copies.append((b, ob[name]))
    return ts, os_, copies


@torch.no_grad()
def ema_update_(target: TensorsOrModule, online: TensorsOrModule, momentum, *,
                buffers: bool = False, backend: str = "auto") -> None:
    r"""Momentum (EMA) update, in place and fused: for every pair of tensors

    .. math:: \theta_t \leftarrow m\,\theta_t + (1 - m)\,\theta_o
              = \operatorname{lerp}(\theta_t, \theta_o, 1 - m)

    as in MoCo (He et al. 2020, https://arxiv.org/abs/1911.05722) and BYOL (Grill et al.
    2020, https://arxiv.org/abs/2006.07733). The result equals
    ``torch._foreach_lerp_(target, online, 1 - momentum)`` (bit for bit on CPU in fp32).

    One pass over all tensors: the C++ kernel splits the concatenated elements evenly
    across threads (AVX-512/AVX2); the Triton kernel updates the whole model in one launch
    per dtype pair; the CUDA C++ kernel likewise (``backend="cuda"``).

    Args:
        target: the EMA (key / teacher) model: an ``nn.Module`` or a sequence of tensors,
            updated in place.
        online: the online (query / student) model, same structure: a module with the same
            parameter names, or a sequence of tensors of the same shapes. Its dtype must equal
            the target's or widen exactly into it (bf16/fp16 online with an fp32 EMA, fp32
            with fp64).
        momentum: m in [0, 1] (a float, or a one-element tensor, read on the host):
            1 keeps the target, 0 copies the online model.
        buffers: with modules, also average the floating-point buffers (BatchNorm running
            statistics) and copy the others (``num_batches_tracked``). Default: parameters
            only, as MoCo and BYOL.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"cuda"``, ``"triton"``
            or ``"reference"`` (the Python loop); ``FASTSSL_BACKEND`` overrides ``"auto"``.

    Raises:
        TypeError: a module paired with a sequence, non-tensors, unsupported dtype pairs.
        ValueError: momentum outside [0, 1] or NaN, lists of different lengths, tensors of
            different shapes, tensors on several devices, modules with different parameters.

    Example:
        >>> import torch, fastssl
        >>> online = torch.nn.Linear(4, 3)
        >>> target = fastssl.MomentumEncoder(online).module
        >>> with torch.no_grad():
        ...     _ = online.weight.add_(1.0)
        >>> fastssl.ema_update_(target, online, 0.99)
        >>> bool(torch.allclose(target.weight, online.weight - 0.99))
        True
    """
    m = _validate.momentum(momentum)
    ts, os_, copies = _pairs(target, online, buffers)
    if len(ts) != len(os_) or not ts or not isinstance(ts[0], torch.Tensor):
        _validate.ema_pairs(ts, os_)  # raises, or returns for two empty lists
        return
    be = _dispatch.resolve(backend, ts[0].device, op="ema_update_", cpp_op="ema_update_",
                           has_triton=True, cuda_op="ema_update_")
    w = 1.0 - m
    if be in ("cpp", "cuda"):
        # The C++ op checks every pair (shape, dtype pair, device) before it writes anything,
        # in ~1/10 of the time of the Python checks (which cost ~1-2% of a ResNet-50 update
        # on CPU); on failure the Python checks run to raise the precise ValueError/TypeError.
        try:
            torch.ops.fastssl.ema_update_(ts, os_, float(w))
        except RuntimeError:
            _validate.ema_pairs(ts, os_)
            raise
        for dst, src in copies:
            dst.copy_(src)
        return
    _validate.ema_pairs(ts, os_)
    for dst, src in copies:
        dst.copy_(src)
    if be == "triton":
        from .ops import ema as triton_ema
        triton_ema.ema_update_(ts, os_, w)
    else:
        reference.ema_update_(ts, os_, m)


def momentum_schedule(step: int, total_steps: int, base: float = 0.996,
                      final: float = 1.0) -> float:
    r"""Cosine momentum schedule of BYOL and MoCo v3:

    .. math:: m(k) = \text{final} - (\text{final} - \text{base})\,
              \frac{\cos(\pi k / K) + 1}{2}

    so m(0) = ``base`` and m(K) = ``final``.

    Args:
        step: k, the current step, 0 <= k <= total_steps.
        total_steps: K >= 1.
        base: momentum at step 0, in [0, 1] (BYOL: 0.996; MoCo v3: 0.99).
        final: momentum at the last step, in [0, 1].

    Example:
        >>> import fastssl
        >>> fastssl.momentum_schedule(0, 100), fastssl.momentum_schedule(100, 100)
        (0.996, 1.0)
    """
    total_steps = _validate.positive_int("total_steps", total_steps)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps = {total_steps}], got {step}")
    base = _validate.momentum(base)
    final = _validate.momentum(final)
    if step == 0:
        return base
    if step == total_steps:
        return final
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


BUFFER_MODES = ("ema", "copy", "frozen")


class MomentumEncoder(nn.Module):
    """A momentum (key / target / teacher) copy of an encoder, updated by EMA.

    Holds a deep copy of ``online`` with ``requires_grad=False`` on every parameter; calling
    it runs the copy under ``torch.no_grad()`` (a stop-gradient, as MoCo's key encoder).

    Args:
        online: the encoder to copy.
        buffers: what :meth:`update` does with the copy's buffers (BatchNorm running
            statistics and the like):

            * ``"ema"`` (default): floating buffers get the same EMA as the parameters,
              other buffers (``num_batches_tracked``) are copied. This is timm
              ``ModelEmaV3``'s default (it averages the whole ``state_dict``), so an EMA model
              used in eval mode has statistics that follow the online model, and a key
              encoder run in train mode (MoCo, lightly) still moves its statistics with its
              own forward passes, only blended with the online model's at the momentum.
            * ``"copy"``: parameters by EMA, every buffer copied from the online model (timm
              ``ModelEmaV3(exclude_buffers=True)``).
            * ``"frozen"``: parameters only (lightly's ``update_momentum`` and official MoCo
              touch only parameters); buffers change only through the copy's own forward
              passes in train mode, and stay at their copy-time values in eval mode. This was
              the default before: choose it to keep that behaviour.

            ``True`` and ``False`` (the older boolean form) mean ``"ema"`` and ``"frozen"``.
        backend: the backend :meth:`update` uses (see :func:`ema_update_`).

    Raises:
        TypeError: ``online`` not a module, ``buffers`` not a string or bool.
        ValueError: an unknown ``buffers`` mode.

    Example:
        >>> import torch, fastssl
        >>> online = torch.nn.Linear(8, 4)
        >>> key_encoder = fastssl.MomentumEncoder(online)
        >>> k = key_encoder(torch.randn(2, 8))          # no graph
        >>> key_encoder.update(online, momentum=0.999)  # after optimizer.step()
        >>> k.requires_grad
        False
    """

    def __init__(self, online: nn.Module, *, buffers="ema", backend: str = "auto"):
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        if isinstance(buffers, bool):
            buffers = "ema" if buffers else "frozen"
        if not isinstance(buffers, str):
            raise TypeError(f"buffers must be one of {BUFFER_MODES}, got "
                            f"{type(buffers).__name__}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.module = copy.deepcopy(online)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.buffers_mode = buffers
        self.backend = backend

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum) -> None:
        """``self.module <- momentum * self.module + (1 - momentum) * online`` (parameters;
        buffers as the ``buffers`` mode says)."""
        ema_update_(self.module, online, momentum, buffers=self.buffers_mode == "ema",
                    backend=self.backend)
        if self.buffers_mode == "copy":
            mine, theirs = dict(self.module.named_buffers()), dict(online.named_buffers())
            if list(mine) != list(theirs):
                raise ValueError("the momentum encoder and online must have the same buffers; "
                                 f"they differ in {sorted(set(mine) ^ set(theirs))[:5] or 'order'}")
            for name, dst in mine.items():
                src = theirs[name]
                if dst.shape != src.shape:
                    raise ValueError(f"buffer {name}: shape {tuple(src.shape)} in online, "
                                     f"{tuple(dst.shape)} in the momentum encoder")
                dst.copy_(src)


class MoCoQueue(nn.Module):
    """The MoCo key queue: a ring buffer of the last ``size`` keys (He et al. 2020,
    https://arxiv.org/abs/1911.05722), with its write pointer kept on the device.

    ``enqueue`` never reads the pointer back to the host, so a training step that enqueues
    has no device sync and compiles with ``torch.compile(fullgraph=True)``. A batch whose size
    does not divide ``size`` wraps around and loses nothing (official MoCo asserts
    divisibility); a batch larger than ``size`` leaves its newest ``size`` keys. Keys are
    stored as given (no normalisation), cast to the queue's dtype.

    Args:
        dim: D, the key dimension.
        size: K, the number of keys held.
        dtype: the queue's dtype (float32, bfloat16, float16 or float64).
        device: where the queue lives.
        init: ``"random"`` (unit-norm Gaussian keys, as official MoCo) or ``"zeros"``.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpp"``, ``"cuda"``, ``"triton"`` or
            ``"reference"`` (index_copy_ with device-side indices).

    Attributes:
        buffer: (size, dim) tensor of keys, the negatives to pass to ``info_nce(queue=...)``.
            Slot order is ring order, not age order (the loss does not care).
        ptr: 0-dim int64 tensor on the queue's device: the slot the next key goes to.

    The state (``buffer``, ``ptr``) is saved by ``state_dict()`` and restored by
    ``load_state_dict()``.

    Example:
        >>> import torch, fastssl
        >>> q = fastssl.MoCoQueue(dim=4, size=5, init="zeros")
        >>> q.enqueue(torch.ones(3, 4))
        >>> q.enqueue(2 * torch.ones(3, 4))      # wraps around: slots 3, 4, 0
        >>> q.buffer[:, 0].tolist(), int(q.ptr)
        ([2.0, 1.0, 1.0, 2.0, 2.0], 1)
    """

    def __init__(self, dim: int, size: int, *, dtype: torch.dtype = torch.float32,
                 device=None, init: str = "random", backend: str = "auto"):
        super().__init__()
        dim = _validate.positive_int("dim", dim)
        size = _validate.positive_int("size", size)
        if dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if init == "random":
            buf = torch.randn(size, dim, device=device, dtype=torch.float32)
            buf = torch.nn.functional.normalize(buf, dim=1).to(dtype)
        elif init == "zeros":
            buf = torch.zeros(size, dim, device=device, dtype=dtype)
        else:
            raise ValueError(f"init must be 'random' or 'zeros', got {init!r}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.dim, self.size, self.backend = dim, size, backend
        self.register_buffer("buffer", buf)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=buf.device))
        # Scratch for the GPU kernels' "last block done" election; 0 between calls.
        self.register_buffer("_counter", torch.zeros(1, dtype=torch.int32, device=buf.device),
                             persistent=False)
        self._resolve()

    def _resolve(self) -> None:
        # Picked here (and again after .to()), not per call: the choice is a plain attribute
        # that torch.compile treats as a constant.
        self._backend = _dispatch.resolve(self.backend, self.buffer.device,
                                          op="MoCoQueue.enqueue", cpp_op="moco_enqueue_",
                                          has_triton=True, cuda_op="moco_enqueue_")

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._resolve()
        return out

    def enqueue(self, keys: torch.Tensor, *, gather: bool = False) -> None:
        """Writes ``keys`` at the write pointer and advances it, in place, on the device.

        Args:
            keys: (B, dim) floating keys on the queue's device (detached; cast to the queue's
                dtype). B = 0 is a no-op.
            gather: first concatenate the keys of all ranks (rank order) with
                ``fastssl.distributed.gather_no_grad``; every rank then holds the same queue.
                All ranks must pass the same B.

        Raises:
            TypeError: keys not a floating tensor.
            ValueError: keys not 2-D, keys.shape[1] != dim, keys on another device; a
                corrupted ``ptr`` (not a 0-dim int64 tensor in [0, size)) -- the same error
                on every backend (on CUDA and under ``torch.compile``, an asynchronous
                ``RuntimeError``: see ``fastssl._validate.queue_ptr``).
        """
        _validate.queue_keys(keys, self.dim, self.buffer.device)
        be = self._backend
        # The C++ kernel checks the pointer itself (it reads it on the host anyway): in eager
        # mode the Python check runs only on its failure, to raise the same ValueError as the
        # other backends, so the normal path costs nothing extra. The Triton and CUDA kernels
        # trust the pointer (a corrupted one writes out of bounds) and the reference would
        # wrap it silently: checked first, without a host sync on CUDA. The check runs before
        # the no_grad region: under torch.compile an error raised inside a traced no_grad
        # region leaves grad mode disabled (torch 2.13).
        cpp_checks = be == "cpp" and not _validate._is_compiling()
        if not cpp_checks and keys.shape[0] > 0:
            _validate.queue_ptr(self.ptr, self.size, self.buffer.device)
        with torch.no_grad():
            self._enqueue(keys.detach(), gather, cpp_checks)

    def _enqueue(self, keys: torch.Tensor, gather: bool, cpp_checks: bool) -> None:
        if gather:
            keys = distributed.gather_no_grad(keys, what="MoCoQueue.enqueue")
        if keys.dtype != self.buffer.dtype:
            keys = keys.to(self.buffer.dtype)
        if keys.shape[0] == 0:
            return
        be = self._backend
        if cpp_checks:
            try:
                torch.ops.fastssl.moco_enqueue_(self.buffer, self.ptr, self._counter, keys)
            except RuntimeError:
                _validate.queue_ptr(self.ptr, self.size, self.buffer.device)
                raise
        elif be in ("cpp", "cuda"):
            torch.ops.fastssl.moco_enqueue_(self.buffer, self.ptr, self._counter, keys)
        elif be == "triton":
            torch.ops.fastssl.moco_enqueue_triton_(self.buffer, self.ptr, self._counter, keys)
        else:
            reference.moco_enqueue_(self.buffer, self.ptr, keys)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        p = state_dict.get(prefix + "ptr")
        if isinstance(p, torch.Tensor):
            if p.dim() != 0 or p.dtype != torch.int64:
                raise ValueError(f"{prefix}ptr must be a 0-dim int64 tensor, got {p.dtype} of "
                                 f"shape {tuple(p.shape)}")
            if not 0 <= int(p) < self.size:
                raise ValueError(f"{prefix}ptr = {int(p)} is outside [0, size = {self.size})")
        b = state_dict.get(prefix + "buffer")
        if isinstance(b, torch.Tensor) and tuple(b.shape) != (self.size, self.dim):
            raise ValueError(f"{prefix}buffer has shape {tuple(b.shape)}, but this queue is "
                             f"(size, dim) = ({self.size}, {self.dim})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, size={self.size}, dtype={self.buffer.dtype}, "
                f"backend={self._backend}")
