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
