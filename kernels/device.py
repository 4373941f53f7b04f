"""What the launchers ask of the CUDA device they launch on, read once per device."""

from __future__ import annotations

import functools

import torch


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device."""
    return _properties(_index(device)).multi_processor_count


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    p = _properties(_index(device))
    return p.major, p.minor


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)
