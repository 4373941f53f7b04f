"""One facade per fused op, and the switch that picks Triton or the pure-torch reference.

The choice is made once per process: Triton when a CUDA device is present and `triton` imports,
else the reference. `YAN_KERNELS=ref|triton` in the environment overrides it, and `force()` (a
context manager) or `set_backend()` override both, for tests and benchmarks.

A facade runs the Triton kernel only where it can run: on CUDA tensors, or on CPU tensors under
the Triton interpreter (`TRITON_INTERPRET=1`, which must be set before `triton` is first
imported). It also falls back to the reference when autograd is recording through an input,
because the kernels have no backward.

This module imports neither `triton` nor the kernel files at import time, so the model can ask
`use_triton()` without binding `@triton.jit` before a test has set `TRITON_INTERPRET`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from yan_kernels.decoder_argmax import DecodeResult

Backend = Literal["auto", "ref", "triton"]
_BACKENDS = ("auto", "ref", "triton")
_override: Backend = "auto"  # set by force() / set_backend(); "auto" defers to env + hardware


def triton_available() -> bool:
    """Whether `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _decided() -> bool:
    """The once-per-process choice: env `YAN_KERNELS`, else CUDA present and Triton importable."""
    env = os.environ.get("YAN_KERNELS", "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"YAN_KERNELS must be one of {', '.join(_BACKENDS)}, got {env!r}")
    if env == "ref":
        return False
    if env == "triton":
        if not triton_available():
            raise RuntimeError("YAN_KERNELS=triton but the triton package is not installed")
        return True
    return torch.cuda.is_available() and triton_available()


def use_triton() -> bool:
    """True when the Triton kernels are selected (see the module docstring for the rules)."""
    if _override != "auto":
        return _override == "triton"
    return _decided()


def set_backend(backend: Backend) -> None:
    """Select `"triton"` or `"ref"` for the rest of the process; `"auto"` restores the default."""
    global _override
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package")
    _override = backend


@contextmanager
def force(backend: Backend) -> Iterator[None]:
    """`with force("ref"): ...` runs the block with that backend, then restores the previous."""
    previous = _override
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _take_triton(*tensors: Tensor | None) -> bool:
    """Triton selected, and the kernel can run here: one device it can reach, one dtype it
    supports (mixed dtypes, e.g. fp32 weights under autocast, go to the reference), no grad."""
    ts = [t for t in tensors if t is not None]
    if not use_triton():
        return False
    if (
        len({t.dtype for t in ts if t.is_floating_point()}) != 1
        or ts[0].dtype not in _KERNEL_DTYPES
    ):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False  # no backward in the kernels: let autograd see the reference
    return all(t.is_cuda for t in ts) or (interpreting() and not any(t.is_cuda for t in ts))


def routed_expert_euler(
    h: Tensor,
    expert: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    z: Tensor | None = None,
    dt: float = 1.0,
) -> Tensor:
    """`z + dt * FFN_expert(h)` per token (or `FFN_expert(h)` when z is None): h [N, d],
    expert [N] long, w1 [K, d, F], b1 [K, F], w2 [K, F, d], b2 [K, d], z [N, d] -> [N, d]."""
    from yan_kernels import routed_expert as m  # the submodule, imported on first use

    fn = m.routed_expert_euler_ref
    if _take_triton(h, w1, b1, w2, b2, z) and expert.device == h.device:
        fn = m.routed_expert_euler
    return fn(h, expert, w1, b1, w2, b2, z, dt)


def routed_expert(
    h: Tensor, expert: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Only the routed expert's field per token: h [N, d], expert [N] -> [N, d]."""
    return routed_expert_euler(h, expert, w1, b1, w2, b2, None, 1.0)


def decoder_argmax(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    temperature: Tensor | float | None = None,
    seed: Tensor | None = None,
    labels: Tensor | None = None,
) -> DecodeResult:
    """lm_head + softmax statistics per row without materializing logits: x [N, d],
    weight [V, d], bias [V] -> DecodeResult (see `yan_kernels.decoder_argmax`)."""
    from yan_kernels import decoder_argmax as m

    fn = m.decoder_argmax if _take_triton(x, weight, bias) else m.decoder_argmax_ref
    return fn(x, weight, bias, temperature, seed, labels)
