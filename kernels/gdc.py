"""Grid dependency control inside a kernel: programmatic dependent launch (`yan_kernels.pdl`)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """With PDL: wait until the previous grid has completed and its writes are visible, then
    let the next grid launch. Call it before the kernel's first load or store."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
