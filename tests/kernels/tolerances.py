"""The one table of kernel-vs-oracle tolerances, per dtype of the kernel's inputs.

fp32 kernels accumulate in fp32 like the reference and differ only in summation order. 16-bit
kernels round their inputs, the [N, 4d] intermediate and the output, and are held against an
fp32 oracle computed from the same (rounded) inputs. The fp32 entry is tight enough that a
tanh-approximate GELU or a missing bias fails (tests/kernels/test_routed_expert.py checks).
"""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}

ARGMAX_AGREEMENT_BF16 = 0.999  # fraction of rows whose bf16 argmax matches the fp32 oracle
