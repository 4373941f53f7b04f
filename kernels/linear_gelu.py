"""A linear layer with its bias and the exact GELU in the epilogue: one launch per FFN input layer.

Every feed-forward block of YAN (encoder, flow trunk, decoder) starts with `gelu(x @ W.T + b)`.
Eager torch runs that as a GEMM (bias in cuBLAS's epilogue) and a separate elementwise GELU that
reads and writes the [M, F] activation once more: at batch 1 one more launch per block, at
64 x 1024 tokens a pass over ~270 MB per block at the copy bandwidth. cuBLASLt's GELU epilogue
is the tanh approximation, not the erf form the model is trained with, so it cannot stand in.

This kernel is a tiled GEMM over `x` [M, K] and the weight in `nn.Linear`'s layout [N, K] (each
tile is read K-contiguous and transposed in registers), accumulating in fp32; the epilogue adds
the bias and applies `0.5 * a * (1 + erf(a / sqrt(2)))` on the fp32 accumulator, then rounds once
to the output dtype. (The unfused path rounds the GEMM's output to bf16 before the GELU; this one
does not, so it is closer to the fp32 result, and the two differ by that one rounding.)

Tiles run in a grouped order (GROUP_M row tiles per column sweep) so a weight tile is read from
DRAM once for the group and from L2 after it. `default_config` picks the tile by row count;
`bench kernels --sweep gelu` measures the alternatives.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit(do_not_specialize=["M"])
def _linear_gelu_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (nn.Linear's weight)
    b_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + r64[:, None] * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + c64[:, None] * stride_wn + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
    tl.store(
        out_ptr + r64[:, None] * stride_om + cols[None, :],
        act.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


class Config(NamedTuple):
    """One launch configuration: tile sizes, row tiles per group, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# GPU tiles by row count, not yet tuned on a GPU (`bench kernels --sweep gelu` compares them
# with cuBLAS + GELU): few rows want narrow column blocks, so that a 128-token batch still
# spreads over the SMs; many rows want the large tile that feeds the tensor cores.
GPU_SMALL = Config(64, 64, 64, 8, 4, 4)
GPU_LARGE = Config(128, 128, 64, 8, 8, 3)
GPU_LARGE_M = 2048
SWEEP = (
    GPU_SMALL,
    Config(64, 128, 64, 8, 4, 4),
    Config(128, 64, 64, 8, 4, 4),
    GPU_LARGE,
    Config(128, 256, 64, 8, 8, 3),
)
INTERPRETER = Config(32, 64, 64, 4, 4, 1)  # few, large tiles: each tile op is one numpy call


def default_config(device: torch.device, m: int) -> Config:
    """The launch configuration for `m` rows on `device`."""
    if device.type == "cuda":
        return GPU_LARGE if m >= GPU_LARGE_M else GPU_SMALL
    return INTERPRETER


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                config: Config | None = None) -> Tensor:  # fmt: skip
    """Triton launcher: x [..., K], weight [N, K], bias [N] or None -> gelu(x @ weight.T + bias)
    [..., N] in x's dtype (exact erf GELU on the fp32 accumulator). One launch, no host
    synchronization (graph-capturable). `config` overrides the tile choice."""
    *lead, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K), f"weight must be [N, {K}], got {tuple(weight.shape)}"
    assert bias is None or bias.shape == (N,), f"bias must be [{N}]"
    assert x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype), "one dtype"
    assert len({t.device for t in (x, weight, bias) if t is not None}) == 1, "one device"
    x2 = x.reshape(math.prod(lead), K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    cfg = config or default_config(x.device, M)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _linear_gelu_kernel[grid](
        x2, w, bias if bias is not None else w, out, M, N, K,
        x2.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.view(*lead, N)


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-torch reference (the unfused ops the model's FeedForward runs)."""
    return F.gelu(F.linear(x, weight, bias))


def aot_specs() -> list:
    """Every configuration the launcher can choose on a GPU, and the sweep's (see
    `yan_kernels.aot`), with and without a bias, in bf16, fp16 and fp32."""
    from .aot import TORCH_TO_TRITON, AotSpec

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = {a: t for a in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
        sig.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_wn", "stride_om")})
        for cfg in dict.fromkeys((GPU_SMALL, GPU_LARGE, *SWEEP)):
            if dtype == torch.float32 and cfg.block_n > 128:
                continue  # fp32 tiles twice the bytes: the 256-wide tile is a bf16 option
            for has_bias in (True, False) if cfg in (GPU_SMALL, GPU_LARGE) else (True,):
                consts = dict(HAS_BIAS=has_bias, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                              DOT_PRECISION=_precision(dtype))  # fmt: skip
                specs.append(AotSpec(
                    "_linear_gelu_kernel", sig, consts, cfg.num_warps, cfg.num_stages,
                    label=f"{t[1:]} bias={has_bias} {cfg}",
                    aligned=("stride_xm", "stride_wn", "stride_om", "N", "K"),
                ))  # fmt: skip
    return specs
