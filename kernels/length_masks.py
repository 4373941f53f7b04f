"""A padded batch's masks and additive attention biases from its lengths, in one launch.

A captured YAN sample receives each row's source and target length and needs, for both, the
boolean prefix mask ([B, L], True on the row's first `length` positions) and the additive key
bias SDPA takes (0 at real keys, -inf at padding; a row with no real key attends everywhere, as
`key_padding_mask` does). In torch ops that is an `arange`, a compare, and four more small
launches for the bias, per side: twelve launches of a few microseconds at batch 1, for a few
hundred bytes. This kernel writes all four tensors in one launch: program (b, side) fills row b
of one side's mask and bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .gdc import grid_dependency


@triton.jit
def _length_masks_kernel(
    src_len_ptr,  # [B] int64
    tgt_len_ptr,  # [B] int64
    src_mask_ptr,  # [B, Lx] bool
    tgt_mask_ptr,  # [B, Ly] bool
    src_bias_ptr,  # [B, Lx]
    tgt_bias_ptr,  # [B, Ly]
    Lx,
    Ly,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    b = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        n = tl.load(src_len_ptr + b)
        width = Lx
        mask_row = src_mask_ptr + b * Lx
        bias_row = src_bias_ptr + b * Lx
    else:
        n = tl.load(tgt_len_ptr + b)
        width = Ly
        mask_row = tgt_mask_ptr + b * Ly
        bias_row = tgt_bias_ptr + b * Ly
    for p0 in range(0, width, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        inside = p < width
        real = p < n
        tl.store(mask_row + p, real.to(tl.int1), mask=inside)
        keep = real | (n <= 0)  # no real key: attend everywhere
        bias = tl.where(keep, 0.0, float("-inf"))
        tl.store(bias_row + p, bias.to(bias_row.dtype.element_ty), mask=inside)


BLOCK = 256


def length_masks(
    src_len: Tensor, tgt_len: Tensor, Lx: int, Ly: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton launcher: lengths [B] long (one device) -> (src_mask [B, Lx] bool, tgt_mask
    [B, Ly] bool, src_bias [B, Lx], tgt_bias [B, Ly] in `dtype`). One launch, no host
    synchronization (graph-capturable)."""
    assert src_len.dtype == tgt_len.dtype == torch.long and src_len.shape == tgt_len.shape
    B = src_len.shape[0]
    dev = src_len.device
    src_mask = torch.empty(B, Lx, dtype=torch.bool, device=dev)
    tgt_mask = torch.empty(B, Ly, dtype=torch.bool, device=dev)
    src_bias = torch.empty(B, Lx, dtype=dtype, device=dev)
    tgt_bias = torch.empty(B, Ly, dtype=dtype, device=dev)
    if B:
        _length_masks_kernel[(B, 2)](
            src_len.contiguous(), tgt_len.contiguous(), src_mask, tgt_mask, src_bias, tgt_bias,
            Lx, Ly, BLOCK=BLOCK, num_warps=4,
            **pdl.launch_options(src_len.device),
        )  # fmt: skip
    return src_mask, tgt_mask, src_bias, tgt_bias


def prefix_mask_and_bias(n: Tensor, L: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Pure torch: lengths [B] -> (prefix mask [B, L] bool, additive key bias [B, L] in `dtype`:
    0 at real keys, -inf at padding, all 0 for a row without a real key)."""
    mask = torch.arange(L, device=n.device)[None] < n[:, None]
    keep = mask | (n <= 0)[:, None]
    zero = torch.zeros((), dtype=dtype, device=n.device)
    return mask, torch.where(keep, zero, float("-inf")).to(dtype)


def length_masks_ref(
    src_len: Tensor, tgt_len: Tensor, Lx: int, Ly: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pure-torch reference with the launcher's signature."""
    src_mask, src_bias = prefix_mask_and_bias(src_len, Lx, dtype)
    tgt_mask, tgt_bias = prefix_mask_and_bias(tgt_len, Ly, dtype)
    return src_mask, tgt_mask, src_bias, tgt_bias


def aot_specs() -> list:
    """One configuration per bias dtype (see `yan_kernels.aot`)."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(src_len_ptr="*i64", tgt_len_ptr="*i64", src_mask_ptr="*i1", tgt_mask_ptr="*i1",
                   src_bias_ptr=t, tgt_bias_ptr=t, Lx="i32", Ly="i32")  # fmt: skip
        specs.append(AotSpec("_length_masks_kernel", sig, dict(BLOCK=BLOCK), 4, 1,
                             label=f"{t[1:]} bias"))  # fmt: skip
    return with_pdl(specs)
