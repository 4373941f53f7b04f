"""Programmatic dependent launch (PDL): let a kernel start while the one before it finishes.

Inside a CUDA graph a chain of small kernels (an AR decode step at batch 1, a YAN sample's
fused GEMMs) still pays, per launch, the time from one grid's last block exiting to the next
grid's first block running: a few microseconds that no fusion of arithmetic removes. On Hopper
(sm_90) a launch may carry the programmatic-stream-serialization attribute (Triton's
`launch_pdl=True`): the next grid is then scheduled as soon as every block of the running one
has executed `griddepcontrol.launch_dependents` (or exited), and its blocks wait at
`griddepcontrol.wait` until the running grid has completed and its memory is visible. Stream
capture records the attribute as a programmatic edge, so captured graphs keep it.

The kernels that take a `PDL` constexpr (every kernel of a YAN sample and of the AR decode step:
all but the Mamba scan and the Philox test kernel) call `yan_kernels.gdc.grid_dependency(PDL)`
first thing: wait for the grid before (every load and store after it sees that grid's writes,
whoever launched it: a Triton kernel, cuBLAS or a torch op), then let the next grid launch.
Nothing is read or written before the wait, so a kernel with the flag is correct after any
predecessor (the wait is a no-op without the launch attribute).

Off by default until a GPU measurement says it pays (`bench versus --ar-steps
triton,triton+pdl`, `bench sampler --compare fused/triton,fused/triton+pdl`): set
`YAN_KERNELS_PDL=1` (the server, the benches), or `with pdl.use(True):` around a graph capture.
Never on a device below sm_90, the CPU or the interpreter. This module only decides (it does
not import triton); the launchers pass `launch_options(device)` to their kernels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .device import capability

ENV = "YAN_KERNELS_PDL"
MIN_CAPABILITY = (9, 0)
ARCHS = (90,)  # the compile guard's targets for the PDL variants (`griddepcontrol` is sm_90+)
_override: list[bool] = []  # the innermost `use(...)`


def requested() -> bool:
    """Whether PDL is asked for: the innermost `use(...)`, else `YAN_KERNELS_PDL` ("1" on)."""
    if _override:
        return _override[-1]
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def supported(device: torch.device) -> bool:
    """A CUDA device of sm_90 or newer, not under Triton's interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return capability(device) >= MIN_CAPABILITY


def enabled(device: torch.device) -> bool:
    """Whether launches on `device` carry PDL now (asked for and supported)."""
    return requested() and supported(device)


def launch_options(device: torch.device) -> dict[str, object]:
    """The `PDL` constexpr and, when on, Triton's `launch_pdl` option, for a kernel launch."""
    on = enabled(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@contextlib.contextmanager
def use(on: bool) -> Iterator[None]:
    """PDL on or off for the launches (and graph captures) inside, whatever the environment."""
    _override.append(bool(on))
    try:
        yield
    finally:
        _override.pop()


__all__ = ["ENV", "enabled", "launch_options", "requested", "supported", "use"]
