"""Test configuration shared by every test module.

Triton kernels run under the interpreter on this CPU-only machine: TRITON_INTERPRET must be
set before Triton is first imported, so it is set here, before any test imports fastssl.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _triton_kernels_on_cpu(request):
    """A test parametrized with ``backend="triton"`` runs on CPU tensors: inside it, the ops'
    Triton kernels replace the C++ ones on the CPU key (``fastssl._dispatch.triton_on_cpu``,
    the interpreter), for its forward, backward and any torch.compile alike."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "triton" \
            or torch.cuda.is_available():
        yield
        return
    from fastssl import _dispatch
    with _dispatch.triton_on_cpu():
        yield
def pytest_configure(config):
    # torch.compile's inductor imports torch.fx.experimental.optimization, which imports
    # torch.utils.mkldnn, whose classes decorate 14 methods with the deprecated
    # torch.jit.script_method: 14 DeprecationWarnings per session from torch itself (raised in
    # torch/jit/_script.py), none from fastssl (which never uses TorchScript). Silenced by
    # message, category and module, so any other deprecation still shows.
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning:torch\.jit\._script")
