"""Tensor descriptors for Hopper's TMA copy engine, shared by the kernel launchers.

A kernel compiled with a descriptor argument loads whole tiles with one `cp.async.bulk.tensor`
each, zero-filled past the tensor's bounds: no per-element address arithmetic or masks in the
main loop. Descriptors need 16-bit (or wider) elements with a unit inner stride and 16-byte
aligned base and strides; `ready` says whether the tensors qualify, and launchers fall back to
pointer loads when they do not. The CPU interpreter runs descriptor kernels too (tests)."""

from __future__ import annotations

import torch
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor


def ready(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can describe these 2-D tensors: 16-bit elements on a Hopper (or
    newer) GPU; 16- or 32-bit on the CPU, where the interpreter runs descriptor kernels."""
    t0 = tensors[0]
    if t0.device.type == "cuda" and torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    return all(
        t.dim() == 2
        and (t.element_size() == 2 or (t.element_size() == 4 and t.device.type == "cpu"))
        and t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors
    )


def descriptor(t: Tensor, block: list[int]) -> TensorDescriptor:
    """A descriptor of 2-D `t` that loads [block[0], block[1]] tiles."""
    return TensorDescriptor.from_tensor(t, block)
