"""Ahead-of-time entries for ``fastssl gpu-report``, derived from the kernel's own argument list.

An op module lists the configurations its launchers use in ``AOT_KERNELS``; each entry is
built with :func:`aot_entry`, which reads the kernel's parameters (names, and which are
``tl.constexpr``) from the ``@triton.jit`` function itself, so no op file copies an argument
list by hand and a kernel whose arguments change cannot drift from its report entry:

* a non-constexpr argument named in ``pointers`` is a pointer, typed from the small map
  below (torch dtype or Triton type name -> ``"*bf16"`` etc.);
* a non-constexpr argument named in ``floats`` is an fp32 scalar;
* every other non-constexpr argument is an ``"i32"`` (sizes, strides, counts);
* every constexpr without a default must be given in ``constexprs``; unknown names anywhere
  raise ``ValueError`` (a typo would otherwise compile a different kernel than the launcher's).

Entries carry ``"op"``, ``"dtype"`` (``"fp32"`` / ``"bf16"`` / ``"fp16"``), ``"D"`` (the
embedding width the configuration is for, or None) and, for an arch-specific configuration,
``"arch"`` (e.g. 90: ``fastssl gpu-report`` then compiles it only for that arch).

Works on the compiled ``JITFunction`` and on the interpreter's ``InterpretedFunction`` (tests
import the op modules under ``TRITON_INTERPRET=1``), for triton 3.6 and 3.9.
"""
from __future__ import annotations

import inspect

import torch

# torch dtype -> Triton signature type name.
SIG_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
            torch.int8: "i8", torch.int16: "i16", torch.bool: "i1"}
_SIG_NAMES = frozenset(SIG_TYPE.values())


def sig_type(t) -> str:
    """``torch.bfloat16`` or ``"bf16"`` -> ``"bf16"`` (ValueError for anything else)."""
    if isinstance(t, torch.dtype):
        if t not in SIG_TYPE:
            raise ValueError(f"no Triton signature type for {t}")
        return SIG_TYPE[t]
    if isinstance(t, str) and t in _SIG_NAMES:
        return t
    raise ValueError(f"not a torch dtype or Triton type name: {t!r}")


def kernel_params(fn) -> list:
    """``[(name, is_constexpr, has_default)]`` of a ``@triton.jit`` kernel, in order."""
    params = getattr(fn, "params", None)
    if params is not None:  # JITFunction
        return [(p.name, bool(p.is_constexpr), p.default is not inspect.Parameter.empty)
                for p in params]
    py = getattr(fn, "fn", fn)  # InterpretedFunction wraps the Python function
    out = []
    for p in inspect.signature(py).parameters.values():
        ann = p.annotation
        is_c = (ann is not inspect.Parameter.empty and
                ("constexpr" in ann if isinstance(ann, str)
                 else getattr(ann, "__name__", "") == "constexpr"))
        out.append((p.name, is_c, p.default is not inspect.Parameter.empty))
    return out


def signature_of(fn, pointers: dict, floats=(), constexprs: dict | None = None) -> dict:
    """The ``ASTSource`` signature of ``fn``: pointers typed from ``pointers``, ``floats`` as
    fp32, other runtime arguments i32, constexprs as ``"constexpr"``."""
    params = kernel_params(fn)
    names = {n for n, _, _ in params}
    const_names = {n for n, c, _ in params if c}
    constexprs = constexprs or {}
    name = getattr(fn, "__name__", str(fn))
    for label, given in (("pointers", pointers), ("floats", floats), ("constexprs", constexprs)):
        unknown = set(given) - names
        if unknown:
            raise ValueError(f"{name}: {label} names unknown arguments {sorted(unknown)}")
    wrong = (set(pointers) | set(floats)) & const_names
    if wrong:
        raise ValueError(f"{name}: {sorted(wrong)} are constexpr, not runtime arguments")
    not_const = set(constexprs) - const_names
    if not_const:
        raise ValueError(f"{name}: {sorted(not_const)} are not constexpr parameters")
    missing = [n for n, c, has_default in params if c and not has_default and n not in constexprs]
    if missing:
        raise ValueError(f"{name}: constexprs missing for {missing}")
    sig = {}
    for n, c, _ in params:
        if c:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = "*" + sig_type(pointers[n])
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def aot_entry(fn, *, op: str, dtype, D: int | None, pointers: dict, constexprs: dict,
              floats=(), tensor_cores: bool, num_warps: int = 4, num_stages: int = 3,
              arch: int | None = None, tag: str = "", name: str | None = None,
              attrs: dict | None = None) -> dict:
    """One ``AOT_KERNELS`` entry (see the module docstring).

    Args:
        fn: the ``@triton.jit`` kernel.
        op: public op the kernel serves ("nt_xent", "clip_loss", ...).
        dtype: the input dtype of the configuration (torch dtype or "fp32"/"bf16"/"fp16").
        D: the embedding width the configuration was picked for (None: width-independent).
        pointers: ``{argument: torch dtype or type name}`` for every pointer argument.
        constexprs: values of the constexpr parameters, as the launcher passes them.
        floats: names of fp32 scalar arguments.
        tensor_cores: whether the kernel must use tensor-core instructions (checked by
            ``fastssl gpu-report``'s tests).
        arch: compute capability (80, 90) when the configuration is specific to one arch.
        tag: extra label for the default name (e.g. the config name).
        name: report name; default ``"{op}:{kernel}[{dtype},D{D},{tag},sm_{arch}]"``.
        attrs: ``ASTSource`` attrs; default: every pointer 16-byte divisible (torch's
            allocations are 256-byte aligned, which is what the launcher's JIT specialises on).
    """
    ty = sig_type(dtype)
    signature = signature_of(fn, pointers, floats, constexprs)
    if name is None:
        parts = [ty] + ([f"D{D}"] if D is not None else []) + ([tag] if tag else []) + \
                ([f"sm_{arch}"] if arch is not None else [])
        name = f"{op}:{fn.__name__}[{','.join(parts)}]"
    if attrs is None:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature)
                 if signature[n].startswith("*")}
    entry = dict(name=name, fn=fn, signature=signature, constexprs=dict(constexprs),
                 attrs=attrs, tensor_cores=bool(tensor_cores), num_warps=int(num_warps),
                 num_stages=int(num_stages), op=op, dtype=ty, D=D)
    if arch is not None:
        entry["arch"] = int(arch)
    return entry
