"""Routed expert FFN + Euler step: `z + dt * FFN_e(h)`, computing only each token's own expert.

Layout: tokens are grouped by expert (a stable argsort in the launcher) and the expert's rows are
cut into tiles of BLOCK_M; a tile never spans two experts, so each tile is a plain GEMM against
one expert's weights (MoE-style grouped GEMM). Two kernels:

1. `_expert_up_kernel`: act[sorted rows] = GELU(h[token] @ W1[e] + b1[e]) into a [N, 4d] buffer
   in expert-sorted order (rows of h are gathered through `order`, so h is never permuted).
2. `_expert_down_kernel`: out[token] = z[token] + dt * (act @ W2[e] + b2[e]), scattered back
   to the original token order (or just the field when z is None).

The tile -> (expert, row range) map is built with torch ops on the device, sized by the upper
bound cdiv(N, BLOCK_M) + K, so the launcher never synchronizes with the host; surplus tiles
return at once. Accumulation is fp32; GELU is the exact erf form (matching `F.gelu`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# A module-level constant read inside @triton.jit must be a tl.constexpr: the GPU compiler
# rejects plain globals (the CPU interpreter does not, which is why kernels/aot.py exists).
_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _expert_up_kernel(
    h_ptr,  # [N, D] activations, original token order
    order_ptr,  # [N] int: sorted position -> token
    tiles_ptr,  # [3, T] int32: expert, first sorted row, end sorted row
    w1_ptr,  # [K, D, H]
    b1_ptr,  # [K, H]
    act_ptr,  # [N, H] out, expert-sorted order
    D,
    H,
    T,
    stride_hn,
    stride_w1k,
    stride_w1d,
    stride_b1k,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tiles_ptr + t).to(tl.int64)
    r0 = tl.load(tiles_ptr + T + t)
    r1 = tl.load(tiles_ptr + 2 * T + t)
    if r0 >= r1:  # a surplus tile of the upper-bound grid
        return
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < r1
    tok = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(
            h_ptr + tok[:, None] * stride_hn + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w1_ptr + e * stride_w1k + ks[:, None] * stride_w1d + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    acc += tl.load(b1_ptr + e * stride_b1k + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
    tl.store(
        act_ptr + rows[:, None].to(tl.int64) * stride_an + cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _expert_down_kernel(
    act_ptr,  # [N, H] expert-sorted order
    order_ptr,  # [N] int
    tiles_ptr,  # [3, T] int32
    w2_ptr,  # [K, H, D]
    b2_ptr,  # [K, D]
    z_ptr,  # [N, D] state (unused unless HAS_Z)
    out_ptr,  # [N, D] original token order
    dt,
    D,
    H,
    T,
    stride_an,
    stride_w2k,
    stride_w2f,
    stride_b2k,
    stride_zn,
    stride_on,
    HAS_Z: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tiles_ptr + t).to(tl.int64)
    r0 = tl.load(tiles_ptr + T + t)
    r1 = tl.load(tiles_ptr + 2 * T + t)
    if r0 >= r1:
        return
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < r1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(
            act_ptr + rows[:, None].to(tl.int64) * stride_an + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w2_ptr + e * stride_w2k + ks[:, None] * stride_w2f + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    acc += tl.load(b2_ptr + e * stride_b2k + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tok = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_Z:
        z = tl.load(z_ptr + tok[:, None] * stride_zn + cols[None, :], mask=mask, other=0.0)
        acc = z.to(tl.float32) + dt * acc
    tl.store(
        out_ptr + tok[:, None] * stride_on + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


class Blocks(NamedTuple):
    """One launch configuration of both kernels."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# GPU configurations by token count: a 64-row tile keeps more programs in flight when few tokens
# share an expert; from a few thousand tokens a 128 x 256 tile with 8 warps feeds the tensor
# cores better (the grid then has hundreds of programs per expert).
GPU_SMALL = Blocks(64, 128, 64, 4, 3)
GPU_LARGE = Blocks(128, 256, 64, 8, 3)  # best of 6 measured on an H200 at N = 65536
GPU_LARGE_N = 4096
INTERPRETER = Blocks(64, 256, 128, 4, 1)  # few, large tiles: each tile op is one numpy call


def default_blocks(device: torch.device, n: int) -> Blocks:
    """The launch configuration for `n` tokens on `device`."""
    if device.type == "cuda":
        return GPU_LARGE if n >= GPU_LARGE_N else GPU_SMALL
    return INTERPRETER


class TileMap(NamedTuple):
    """Tokens grouped by expert: `order` [N] (sorted position -> token), `tiles` [3, T] int32
    (expert, first sorted row, end sorted row; surplus tiles empty), T, and the tile height."""

    order: Tensor
    tiles: Tensor
    total: int
    block_m: int


def tile_map(expert: Tensor, n_experts: int, block_m: int) -> TileMap:
    """Group tokens by expert without a host sync (graph-capturable). With frozen routing the
    experts are fixed for a whole solve, so a caller builds this once and passes it to every
    `routed_expert_euler` call of the solve."""
    n = expert.shape[0]
    expert = expert.long()
    order = torch.argsort(expert, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.long, device=expert.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))  # [K]; bincount would sync on CUDA
    starts = counts.cumsum(0) - counts  # first sorted row of each expert
    n_tiles = (counts + block_m - 1) // block_m
    tile_end = n_tiles.cumsum(0)  # [K]
    total = triton.cdiv(n, block_m) + n_experts  # >= sum_k cdiv(count_k, block_m)
    t = torch.arange(total, device=expert.device)
    e = torch.searchsorted(tile_end, t, right=True).clamp_max(n_experts - 1)
    local = t - (tile_end - n_tiles)[e]
    r0 = starts[e] + local * block_m
    r1 = torch.minimum(starts[e] + counts[e], r0 + block_m)
    live = t < tile_end[-1]
    r1 = torch.where(live, r1, r0)
    tiles = torch.stack([e, r0, r1]).to(torch.int32).contiguous()
    return TileMap(order, tiles, total, block_m)


def routed_expert_euler(
    h: Tensor,
    expert: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    z: Tensor | None = None,
    dt: float = 1.0,
    tiles: TileMap | None = None,
    blocks: Blocks | None = None,
) -> Tensor:
    """Triton launcher. h [N, d], expert [N] long in [0, K), w1 [K, d, F], b1 [K, F],
    w2 [K, F, d], b2 [K, d], z [N, d] or None, dt a Python float -> [N, d] (z's dtype, else
    h's): `z + dt * FFN_expert(h)`, or `FFN_expert(h)` when z is None.

    `tiles` is `tile_map(expert, K, blocks.block_m)` when the caller reuses one grouping across
    calls (built here otherwise); `blocks` defaults per device and N (`default_blocks`).
    Expert ids must lie in [0, K); they are not range-checked (that would synchronize with the
    host; an id out of range trips scatter_add's device-side index check). No host
    synchronization: the launch is graph-capturable."""
    N, D = h.shape
    K, D1, Fh = w1.shape
    assert D1 == D and w2.shape == (K, Fh, D), f"weights {tuple(w1.shape)} / {tuple(w2.shape)}"
    assert b1.shape == (K, Fh) and b2.shape == (K, D), f"biases {tuple(b1.shape)}/{b2.shape}"
    assert expert.shape == (N,) and not expert.is_floating_point(), "expert must be [N] ints"
    assert h.dtype == w1.dtype == w2.dtype, f"dtypes {h.dtype} {w1.dtype} {w2.dtype}"
    assert h.dtype in (torch.float32, torch.bfloat16, torch.float16), h.dtype
    assert h.stride(1) == 1 and w1.stride(2) == 1 and w2.stride(2) == 1, "inner dim not contiguous"
    assert b1.stride(1) == 1 and b2.stride(1) == 1, "bias rows not contiguous"
    devices = {t.device for t in (h, expert, w1, b1, w2, b2)}
    if z is not None:
        assert z.shape == (N, D) and z.stride(1) == 1, f"z {tuple(z.shape)} vs h {(N, D)}"
        devices.add(z.device)
    assert len(devices) == 1, f"tensors on several devices: {devices}"
    cfg = blocks or (
        default_blocks(h.device, N)
        if tiles is None
        else default_blocks(h.device, N)._replace(block_m=tiles.block_m)
    )
    if tiles is not None:
        assert tiles.block_m == cfg.block_m, f"tile map of {tiles.block_m} rows, blocks {cfg}"
        assert tiles.order.shape == (N,), "tile map built for another token count"
    out = torch.empty((N, D), device=h.device, dtype=(z if z is not None else h).dtype)
    if N == 0:
        return out
    order, tile_tab, total, bm = tiles or tile_map(expert, K, cfg.block_m)
    act = torch.empty((N, Fh), device=h.device, dtype=h.dtype)
    precision = _precision(h.dtype)
    _expert_up_kernel[(total, triton.cdiv(Fh, cfg.block_n))](
        h, order, tile_tab, w1, b1, act,
        D, Fh, total,
        h.stride(0), w1.stride(0), w1.stride(1), b1.stride(0), act.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    zz = z if z is not None else out  # a valid pointer; not read unless HAS_Z
    _expert_down_kernel[(total, triton.cdiv(D, cfg.block_n))](
        act, order, tile_tab, w2, b2, zz, out, float(dt),
        D, Fh, total,
        act.stride(0), w2.stride(0), w2.stride(1), b2.stride(0), zz.stride(0), out.stride(0),
        HAS_Z=z is not None, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def aot_specs() -> list:
    """Every configuration the launcher can choose on a GPU (see `yan_kernels.aot`)."""
    from yan_kernels.aot import TORCH_TO_TRITON, AotSpec

    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        for cfg in (GPU_SMALL, GPU_LARGE):
            blocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          DOT_PRECISION=_precision(dtype))  # fmt: skip
            opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            specs.append(AotSpec(
                "_expert_up_kernel",
                dict(h_ptr=t, order_ptr="*i64", tiles_ptr="*i32", w1_ptr=t, b1_ptr=t, act_ptr=t,
                     D="i32", H="i32", T="i32", stride_hn="i32", stride_w1k="i32",
                     stride_w1d="i32", stride_b1k="i32", stride_an="i32"),
                blocks, **opts, label=f"{t[1:]} {cfg}",
            ))  # fmt: skip
            for has_z in (True, False):
                specs.append(AotSpec(
                    "_expert_down_kernel",
                    dict(act_ptr=t, order_ptr="*i64", tiles_ptr="*i32", w2_ptr=t, b2_ptr=t,
                         z_ptr=t, out_ptr=t, dt="fp32", D="i32", H="i32", T="i32",
                         stride_an="i32", stride_w2k="i32", stride_w2f="i32", stride_b2k="i32",
                         stride_zn="i32", stride_on="i32"),
                    {**blocks, "HAS_Z": has_z}, **opts, label=f"{t[1:]} z={has_z} {cfg}",
                ))  # fmt: skip
    return specs


def routed_expert_euler_ref(
    h: Tensor,
    expert: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    z: Tensor | None = None,
    dt: float = 1.0,
) -> Tensor:
    """Pure-torch reference with the launcher's signature (differentiable): tokens grouped by
    expert, one FFN per token, then the Euler step when z is given."""
    out = torch.empty_like(h)
    for k in range(w1.shape[0]):
        idx = (expert == k).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        a = F.gelu(h[idx] @ w1[k] + b1[k])
        out[idx] = a @ w2[k] + b2[k]
    if z is None:
        return out
    return z + dt * out
