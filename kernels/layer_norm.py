"""Residual add fused with the LayerNorm that follows it: one pass over the row.

Every Transformer sub-layer of YAN ends in `x = x + sublayer(...)` and the next one starts with
a LayerNorm of that x (in the flow trunk an adaptive one, `scale(t) * norm(x) + shift(t)`; at a
fixed time point scale and shift are plain [d] vectors, i.e. an ordinary LayerNorm affine). In
eager torch that is an add, a norm, a multiply and an add: four launches and four round trips
through memory. Here it is one launch:

    res  = x + y (+ bias)            (skipped when y is None: res is x)
    out  = (res - mean) / sqrt(var + eps) * weight + shift

Statistics are computed in fp32 over the whole row (biased variance, as `F.layer_norm`); `res`
is rounded to the input dtype before the norm reads it back, as the unfused code does. A program
owns BLOCK_N rows and the whole (padded) row width BLOCK_D = next_power_of_2(d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .gdc import grid_dependency


@triton.jit(do_not_specialize=["N"])
def _add_layer_norm_kernel(
    x_ptr,  # [N, D]
    y_ptr,  # [N, D] (HAS_Y)
    bias_ptr,  # [D] added with y (HAS_BIAS)
    w_ptr,  # [D] (HAS_W)
    s_ptr,  # [D] (HAS_S)
    res_ptr,  # [N, D] out: x + y + bias (HAS_Y)
    out_ptr,  # [N, D] out
    N,
    D,
    eps,
    stride_x,
    stride_y,
    stride_r,
    stride_o,
    HAS_Y: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_Y:
        y = tl.load(y_ptr + r64 * stride_y + cols[None, :], mask=mask, other=0.0)
        r = x.to(tl.float32) + y.to(tl.float32)
        if HAS_BIAS:
            r += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x = r.to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + r64 * stride_r + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / D
    diff = tl.where(mask, xf - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    out = diff * tl.rsqrt(var + eps)[:, None]
    if HAS_W:
        out = out * tl.load(w_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_S:
        out = out + tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + r64 * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _block_n(block_d: int) -> int:
    """Rows per program: about 4K elements per program (16 rows of 256, 4 of 1024)."""
    return max(1, min(16, 4096 // block_d))


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def add_layer_norm(
    x: Tensor,
    y: Tensor | None,
    weight: Tensor | None,
    shift: Tensor | None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Triton launcher. x, y [N, d] (y None: no add), bias [d] (added with y), weight / shift
    [d] or None -> (res [N, d], out [N, d]) in x's dtype: res = x + y + bias (x itself when y
    is None), out = LayerNorm(res) * weight + shift. One launch, no host synchronization."""
    N, D = x.shape
    assert x.stride(1) == 1, "rows must be contiguous"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), x.dtype
    for name, v in (("weight", weight), ("shift", shift), ("bias", bias)):
        assert v is None or (v.shape == (D,) and v.stride(0) == 1), f"{name} must be [{D}]"
    if y is not None:
        assert y.shape == (N, D) and y.stride(1) == 1 and y.dtype == x.dtype, "y like x"
    else:
        assert bias is None, "bias is added with y"
    assert len({t.device for t in (x, y, weight, shift, bias) if t is not None}) == 1
    out = torch.empty_like(x)
    res = torch.empty_like(x) if y is not None else x
    if N == 0:
        return res, out
    block_d = triton.next_power_of_2(D)
    bn = _block_n(block_d)
    yy = y if y is not None else x
    _add_layer_norm_kernel[(triton.cdiv(N, bn),)](
        x, yy, bias if bias is not None else x, weight if weight is not None else x,
        shift if shift is not None else x, res, out,
        N, D, float(eps), x.stride(0), yy.stride(0), res.stride(0), out.stride(0),
        HAS_Y=y is not None, HAS_BIAS=bias is not None, HAS_W=weight is not None,
        HAS_S=shift is not None, BLOCK_N=bn, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        **pdl.launch_options(x.device),
    )  # fmt: skip
    return res, out


def add_layer_norm_ref(
    x: Tensor,
    y: Tensor | None,
    weight: Tensor | None,
    shift: Tensor | None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Pure-torch reference with the launcher's signature (the unfused ops)."""
    res = x
    if y is not None:
        res = x + y if bias is None else x + (y + bias)
    out = F.layer_norm(res, (res.shape[-1],), eps=eps)
    if weight is not None:
        out = out * weight
    if shift is not None:
        out = out + shift
    return res, out


def aot_specs() -> list:
    """The configurations the launcher chooses on a GPU (see `yan_kernels.aot`): each flag
    combination the model uses, in fp32 and bf16 (fp16 plain and residual norms), at two row
    widths standing for the rest (BLOCK_D is the next power of two of d: one code path, the
    rows per program and warps scale with it)."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    # (HAS_Y, HAS_BIAS, HAS_W, HAS_S): plain norm, residual + norm, + bias, norm without affine
    flags = ((False, False, True, True), (True, False, True, True), (True, True, True, True),
             (True, False, False, False))  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        for block_d in (128, 1024):  # 1 and 4 warps' worth of rows per program; fp16: greedy only
            for has_y, has_b, has_w, has_s in flags[: 2 if dtype == torch.float16 else None]:
                specs.append(
                    AotSpec(
                        "_add_layer_norm_kernel",
                        dict(
                            x_ptr=t,
                            y_ptr=t,
                            bias_ptr=t,
                            w_ptr=t,
                            s_ptr=t,
                            res_ptr=t,
                            out_ptr=t,
                            N="i32",
                            D="i32",
                            eps="fp32",
                            stride_x="i32",
                            stride_y="i32",
                            stride_r="i32",
                            stride_o="i32",
                        ),
                        dict(
                            HAS_Y=has_y,
                            HAS_BIAS=has_b,
                            HAS_W=has_w,
                            HAS_S=has_s,
                            BLOCK_N=_block_n(block_d),
                            BLOCK_D=block_d,
                        ),
                        _num_warps(block_d),
                        1,
                        label=f"{t[1:]} d<={block_d} y={has_y} bias={has_b} affine={has_w}",
                    )
                )
    return with_pdl(specs)
