"""Masks and additive key biases from lengths (one launch) against the pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_length_masks.py
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from yan_kernels import ops
from yan_kernels.length_masks import BLOCK, length_masks, length_masks_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Lx,Ly", [(1, 1), (5, 300), (BLOCK + 1, 7)])
def test_matches_the_reference(device, dtype, Lx, Ly) -> None:
    """Lengths of 0 (no real key: the bias is all zeros), 1, full and in between, widths that
    cut the block and span two."""
    src_len = torch.tensor([0, 1, Lx, max(Lx // 2, 1)], device=device)
    tgt_len = torch.tensor([1, 0, max(Ly // 3, 1), Ly], device=device)
    got = length_masks(src_len, tgt_len, Lx, Ly, dtype)
    want = length_masks_ref(src_len, tgt_len, Lx, Ly, dtype)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)
    src_mask, _, src_bias, _ = got
    assert src_mask[1].tolist() == [True] + [False] * (Lx - 1)
    assert (src_bias[0] == 0).all()  # a row without a real key attends everywhere
    if Lx > 1:
        assert src_bias[1, 1:].eq(float("-inf")).all() and src_bias[1, 0] == 0


def test_facade(device) -> None:
    n = torch.tensor([3, 1], device=device)
    with ops.force("triton"):
        a = ops.length_masks(n, n, 4, 5, torch.float32)
    with ops.force("ref"):
        b = ops.length_masks(n, n, 4, 5, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
