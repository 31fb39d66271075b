"""Argument checks shared by every public op: clear ``TypeError``/``ValueError`` before any
kernel runs. Messages name the argument and show what was received."""
from __future__ import annotations

import math
from operator import attrgetter
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def tensor(name: str, t, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """Checks that ``t`` is a tensor (of ``ndim`` dims, of a floating dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 "
                        f"or float64), got {t.dtype}")
    return t


def embeddings(name: str, t) -> torch.Tensor:
    """A (N, D) floating embedding matrix with N >= 1 and D >= 1."""
    tensor(name, t, ndim=2)
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must have N >= 1 rows and D >= 1 columns, got shape "
                         f"{tuple(t.shape)}")
    return t


def same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != first.shape:
            raise ValueError(f"{names[0]} and {n} must have the same shape, got "
                             f"{tuple(first.shape)} and {tuple(t.shape)}")


def same_device_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{names[0]} and {n} must be on the same device, got "
                             f"{first.device} and {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{names[0]} and {n} must have the same dtype, got "
                            f"{first.dtype} and {t.dtype}")


def _value_check_async(name: str, value: torch.Tensor) -> None:
    """``value > 0`` and finite, checked without reading the value on the host.

    Why ``torch._assert_async`` and not ``torch._check``: ``torch._check`` takes a Python
    bool (a tensor condition raises TypeError; ``torch._check_tensor_all`` calls ``.item()``,
    a host sync, and under ``torch.compile`` an unbacked symbol with an unreadable message),
    whereas ``_assert_async`` is an op that dynamo traces with no graph break and inductor
    keeps: the compiled graph raises ``RuntimeError(<message>)`` on CPU. On CUDA it is a
    device-side assertion: no host sync; a bad value stops the process at the next sync
    (``device-side assert triggered``) instead of training on a wrong loss.
    """
    v = value.detach()
    torch._assert_async((v > 0) & (v < math.inf),  # NaN fails both comparisons
                        f"{name} must be > 0 and finite")


def _one_float_element(name: str, value) -> None:
    """``value`` is a number or a one-element floating tensor (TypeError/ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def positive_scalar(name: str, value, device: torch.device) -> torch.Tensor:
    """A float or a one-element floating tensor, > 0 and finite; returned as a 0-dim tensor
    (the caller's tensor itself when it is one, so its gradient flows).

    A Python number becomes a float64 0-dim tensor: exact (a Python float is a double), so
    float64 inputs get float64 results with no fp32 rounding of the temperature; the fused
    kernels read fp32 (:func:`scale_tensor`), and a 0-dim tensor never widens the dtype of
    the (N, D) operands it is combined with.

    How a tensor's value is checked (never skipped):

    * CPU tensor, eager: read on the host (no device sync) -> ``ValueError``.
    * under ``torch.compile`` (any device), or a CUDA tensor in eager mode:
      ``torch._assert_async`` (see :func:`_value_check_async`): no graph break, no host sync;
      ``RuntimeError`` naming the argument.
    * meta tensor: nothing to read (shape propagation only), so no value check.
    """
    _one_float_element(name, value)
    if isinstance(value, torch.Tensor):
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}")
        if _is_compiling():
            _value_check_async(name, value)
        elif value.device.type == "cpu":
            v = float(value.detach())
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0 and finite, got {v}")
        elif value.device.type != "meta":
            _value_check_async(name, value)
        return value.reshape(())
    if _is_compiling():
        # A float argument of a compiled function may be symbolic (dynamo makes it dynamic
        # once it changes between calls): no Python value to test, so the tensor is checked.
        t = torch.tensor(value, dtype=torch.float64)
        _value_check_async(name, t)
        return t
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {v}")
    # Made on the embeddings' device by a fill: a CPU tensor copied to CUDA every step would
    # be a synchronous host-to-device copy (a host sync per step).
    return torch.full((), v, dtype=torch.float64, device=device)


def positive_number(name: str, value, *, allow_inf: bool = False) -> None:
    """Construction-time check of a temperature-like argument (a module's ``__init__``):
    a number or a one-element floating tensor, > 0 and finite (``allow_inf``: or +inf).
    A tensor is read once on the host (not a hot path); meta tensors have no value."""
    _one_float_element(name, value)
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return
        value = value.detach().item()
    v = float(value)
    if not (v > 0 and (math.isfinite(v) or (allow_inf and v == math.inf))):
        raise ValueError(f"{name} must be > 0 and {'not NaN' if allow_inf else 'finite'}, "
                         f"got {v}")


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def reduce(rows: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return rows.mean()
    if how == "sum":
        return rows.sum()
    return rows


# ---------------------------------------------------------------------------------------
# MoCo machinery (EMA update, key queue)
# ---------------------------------------------------------------------------------------

# (target dtype, online dtype) pairs the EMA accepts: equal dtypes, or an online dtype that
# widens exactly into the target's (bf16/fp16 parameters into an fp32 EMA, fp32 into fp64).
_SHAPE, _DTYPE, _DEVICE = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")
EMA_DTYPES = frozenset({
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float64, torch.float64),
    (torch.float64, torch.float32)})


def momentum(value) -> float:
    """A momentum in [0, 1]: a float, or a one-element tensor (read on the host)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"momentum must be a float in [0, 1], got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"momentum must have exactly one element, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    v = float(value)
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {v}")
    return v


def ema_pairs(targets: list, onlines: list) -> None:
    """Checks two tensor lists for ``ema_update_``: same length, pairwise same shape, dtype
    pairs in :data:`EMA_DTYPES`, every tensor on one device.

    Runs on every training step, so the common case is a few whole-list comparisons
    (~25 us for a 161-tensor model); only when one fails is the culprit located.
    """
    if len(targets) != len(onlines):
        raise ValueError(f"target and online must hold the same number of tensors, got "
                         f"{len(targets)} and {len(onlines)}")
    if not targets:
        return
    try:
        same_shapes = list(map(_SHAPE, targets)) == list(map(_SHAPE, onlines))
        pairs = set(zip(map(_DTYPE, targets), map(_DTYPE, onlines)))
        devices = set(map(_DEVICE, targets)) | set(map(_DEVICE, onlines))
        ok = (same_shapes and pairs <= EMA_DTYPES and len(devices) == 1
              and all(isinstance(t, torch.Tensor) for t in targets)
              and all(isinstance(o, torch.Tensor) for o in onlines))
    except AttributeError:  # a non-tensor: found below
        ok = False
    if ok:
        return
    for name, ts in (("target", targets), ("online", onlines)):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.shape != o.shape:
            raise ValueError(f"target[{i}] and online[{i}] must have the same shape, got "
                             f"{tuple(t.shape)} and {tuple(o.shape)}")
        if (t.dtype, o.dtype) not in EMA_DTYPES:
            raise TypeError(f"target[{i}] is {t.dtype} and online[{i}] is {o.dtype}: the "
                            "online dtype must equal the target's or widen exactly into it "
                            "(bf16/fp16 -> fp32, fp32 -> fp64)")
    devices = {t.device for t in targets} | {o.device for o in onlines}
    raise ValueError(f"all target and online tensors must be on one device, got "
                     f"{sorted(str(d) for d in devices)}")


def queue_keys(keys, dim: int, device: torch.device) -> torch.Tensor:
    """(B, dim) floating keys on the queue's device."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dim() != 2:
        raise ValueError(f"keys must be 2-D (B, {dim}), got shape {tuple(keys.shape)}")
    if keys.shape[1] != dim:
        raise ValueError(f"keys must have dim = {dim} columns (the queue's dim), got shape "
                         f"{tuple(keys.shape)}")
    if keys.dtype not in FLOAT_DTYPES:
        raise TypeError(f"keys must be a floating-point tensor, got {keys.dtype}")
    if keys.device != device:
        raise ValueError(f"keys are on {keys.device} but the queue is on {device}")
    return keys


def queue_ptr(ptr, size: int, device: torch.device) -> None:
    """``MoCoQueue.ptr``: a 0-dim int64 tensor on the queue's device, in [0, size).

    The same check on every backend, so a corrupted pointer (assigned by hand, or a buffer
    restored without ``load_state_dict``) never wraps silently. The value is read on the host
    only for an eager CPU pointer; on CUDA and under ``torch.compile`` it is a
    ``torch._assert_async`` (no host sync, no graph break; see :func:`_value_check_async`).
    """
    if not isinstance(ptr, torch.Tensor):
        raise TypeError(f"MoCoQueue.ptr must be a torch.Tensor, got {type(ptr).__name__}")
    if ptr.dim() != 0 or ptr.dtype != torch.int64:
        raise ValueError(f"MoCoQueue.ptr must be a 0-dim int64 tensor, got {ptr.dtype} of "
                         f"shape {tuple(ptr.shape)}")
    if ptr.device != device:
        raise ValueError(f"MoCoQueue.ptr is on {ptr.device} but the queue is on {device}")
    if ptr.device.type == "cpu" and not _is_compiling():
        p = int(ptr)
        if not 0 <= p < size:
            raise ValueError(f"MoCoQueue.ptr = {p} is outside [0, size = {size}): the queue "
                             "state is corrupted")
    elif ptr.device.type != "meta":
        torch._assert_async((ptr >= 0) & (ptr < size),
                            f"MoCoQueue.ptr is outside [0, size = {size}): the queue state is "
                            "corrupted")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# --- contrastive family (info_nce, clip_loss, supcon) -------------------------------------

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def labels(name: str, t, n: int, device: torch.device) -> torch.Tensor:
    """An integer (n,) label vector on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, ...), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one label per row), got "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as the features ({device}), got "
                         f"{t.device}")
    return t


def queue(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A (K, D) queue matching ``like`` (N, D) in D, device and dtype."""
    embeddings(name, t)
    if t.shape[1] != like.shape[1]:
        raise ValueError(f"{name} must have D = {like.shape[1]} columns like {like_name}, got "
                         f"shape {tuple(t.shape)}")
    same_device_dtype((like_name, name), (like, t))
    return t


def scale_tensor(value: torch.Tensor, device: torch.device, *, invert: bool = False,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A validated 0-dim scalar as the 0-dim tensor the kernels read: the logit multiplier
    (``1 / value`` with ``invert``, for a temperature), computed in fp32 so that a
    low-precision learnable temperature keeps an fp32-accurate gradient chain. With
    ``dtype=torch.float64`` (float64 inputs) it stays float64: rounding it to fp32 would put
    a 6e-8 relative error into every fp64 logit."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    v = value.to(device=device, dtype=compute).reshape(())
    return 1.0 / v if invert else v


# --- masked-token head (issue 14) -----------------------------------------------------------


def token_labels(name: str, t, shape: tuple, num_classes: int, ignore_index: int,
                 device: torch.device) -> torch.Tensor:
    """Integer labels of ``shape`` on ``device``, each in [0, num_classes) or ``ignore_index``.

    The range is checked before any kernel runs, on every backend: read on the host for an
    eager CPU tensor (``ValueError`` naming the first bad label); on CUDA and under
    ``torch.compile`` a ``torch._assert_async`` (no host sync, no graph break; see
    :func:`_value_check_async`): a CUDA stream runs it before the kernels queued after it,
    and the kernels themselves never index memory with a label (they compare it with column
    indices), so an out-of-range label cannot make them read out of bounds either."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, ...), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one label per position of "
                         f"hidden), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as hidden ({device}), got "
                         f"{t.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if t.device.type == "meta" or t.numel() == 0:
        return t
    ok = (t == ignore_index) | ((t >= 0) & (t < num_classes))
    if t.device.type == "cpu" and not _is_compiling():
        if not bool(ok.all()):
            bad = t.reshape(-1)[~ok.reshape(-1)][0].item()
            raise ValueError(f"{name} must be in [0, {num_classes}) (the vocabulary size) or "
                             f"ignore_index = {ignore_index}, got {bad}")
    else:
        torch._assert_async(ok.all(), f"{name} must be in [0, {num_classes}) (the vocabulary "
                            f"size) or ignore_index = {ignore_index}")
    return t

# --- redundancy reduction (barlow_twins, vicreg) -----------------------------------------


def finite_coefficient(name: str, value) -> float:
    """A loss weight: a Python number (not a tensor: the kernels take it as a constant),
    finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


def two_views(z1, z2, op: str, *, min_rows: int = 2) -> None:
    """(N, D) embeddings of two views: same shape, device and dtype, N >= ``min_rows`` (the
    unbiased batch statistics divide by N - 1)."""
    embeddings("z1", z1)
    embeddings("z2", z2)
    same_shape(("z1", "z2"), (z1, z2))
    same_device_dtype(("z1", "z2"), (z1, z2))
    if z1.shape[0] < min_rows:
        raise ValueError(f"{op} needs N >= {min_rows} rows (the unbiased std/variance over the "
                         f"batch divides by N - 1), got shape {tuple(z1.shape)}")

# --- DINO / iBOT prototype head -------------------------------------------------------------

TEACHERS = ("centering", "sinkhorn")


def prototype_head(student_h, teacher_h, weight_student, weight_teacher, center) -> int:
    """Checks the inputs of ``dino_loss`` / ``ibot_patch_loss``; returns K."""
    embeddings("student_h", student_h)
    embeddings("teacher_h", teacher_h)
    embeddings("weight_student", weight_student)
    embeddings("weight_teacher", weight_teacher)
    d = student_h.shape[1]
    for name, t in (("teacher_h", teacher_h), ("weight_student", weight_student),
                    ("weight_teacher", weight_teacher)):
        if t.shape[1] != d:
            raise ValueError(f"{name} must have d = {d} columns like student_h, got shape "
                             f"{tuple(t.shape)}")
    same_device_dtype(("student_h", "teacher_h", "weight_student", "weight_teacher"),
                      (student_h, teacher_h, weight_student, weight_teacher))
    k = weight_student.shape[0]
    if weight_teacher.shape[0] != k:
        raise ValueError(f"weight_student and weight_teacher must have the same K prototypes, "
                         f"got {tuple(weight_student.shape)} and {tuple(weight_teacher.shape)}")
    tensor("center", center)
    if center.numel() != k or center.dim() not in (1, 2) or center.shape[-1] != k:
        raise ValueError(f"center must have shape ({k},) or (1, {k}), got "
                         f"{tuple(center.shape)}")
    if center.device != student_h.device:
        raise ValueError(f"center must be on {student_h.device} like student_h, got "
                         f"{center.device}")
    return k


def teacher_kind(teacher: str, sinkhorn_iters) -> None:
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    positive_int("sinkhorn_iters", sinkhorn_iters)


def crops(student_rows: int, teacher_rows: int, n_global) -> tuple[int, int]:
    """(B, n_crops) of crop-major DINO rows; at least one (teacher, other student crop) pair."""
    positive_int("n_global", n_global)
    if teacher_rows % n_global:
        raise ValueError(f"teacher_h must have n_global * B rows (n_global = {n_global}), got "
                         f"{teacher_rows} rows")
    b = teacher_rows // n_global
    if student_rows % b:
        raise ValueError(f"student_h must have n_crops * B rows with B = {b} (teacher rows / "
                         f"n_global), got {student_rows} rows")
    n_crops = student_rows // b
    if n_crops < n_global:
        raise ValueError(f"student_h must hold at least the n_global = {n_global} global crops "
                         f"(n_crops * B rows, B = {b}), got {n_crops} crops")
    if n_crops < 2:
        raise ValueError("dino_loss needs at least one (teacher crop, other student crop) pair: "
                         f"got n_global = {n_global} and n_crops = {n_crops}")
    return b, n_crops

# --- masked_patch_loss (MAE) ---------------------------------------------------------------


def masked_patch_inputs(pred, images, mask, patch_size, norm_pix, eps) -> int:
    """Checks MAE loss inputs; returns L, the number of patches per image."""
    tensor("images", images, ndim=4)
    tensor("pred", pred, ndim=3)
    positive_int("patch_size", patch_size)
    if not isinstance(norm_pix, bool):
        raise TypeError(f"norm_pix must be a bool, got {type(norm_pix).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be > 0 and finite, got {eps}")
    b, c, h, w = images.shape
    if min(b, c, h, w) < 1:
        raise ValueError(f"images must be (B, C, H, W) with every size >= 1, got "
                         f"{tuple(images.shape)}")
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"images' height and width must be multiples of patch_size = {p}, "
                         f"got H = {h}, W = {w}")
    n_patches, n_values = (h // p) * (w // p), p * p * c
    if norm_pix and n_values < 2:
        raise ValueError("norm_pix=True needs at least 2 values per patch (p·p·C >= 2): the "
                         "unbiased variance of one value is undefined")
    if tuple(pred.shape) != (b, n_patches, n_values):
        raise ValueError(f"pred must have shape (B, L, p·p·C) = ({b}, {n_patches}, {n_values}) "
                         f"for images of shape {tuple(images.shape)} and patch_size {p}, got "
                         f"{tuple(pred.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mask must be a bool or floating-point tensor (1 = masked, "
                        f"predicted), got {mask.dtype}")
    if tuple(mask.shape) != (b, n_patches):
        raise ValueError(f"mask must have shape (B, L) = ({b}, {n_patches}), got "
                         f"{tuple(mask.shape)}")
    for name, t in (("images", images), ("mask", mask)):
        if t.device != pred.device:
            raise ValueError(f"pred and {name} must be on the same device, got {pred.device} "
                             f"and {t.device}")
    return n_patches
