"""Kernel tests run the Triton kernels on CUDA when there is a device, else in Triton's CPU
interpreter. The interpreter is chosen when `triton` is first imported, so the variable is set
here, at collection time, before any test imports a kernel file (the root conftest sets it too,
in case another test module imports triton earlier)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def device() -> torch.device:
    """CUDA when present; else the CPU, with the kernels in the interpreter (checked)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    import triton.language.random as tl_random

    # triton's own @jit helpers (tl.zeros, tl.rand, ...) are bound when triton is imported
    if type(tl_random.philox).__name__ != "InterpretedFunction":
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set: add "
            '`os.environ.setdefault("TRITON_INTERPRET", "1")` (when CUDA is absent) at the top '
            "of tests/conftest.py"
        )
    return torch.device("cpu")
