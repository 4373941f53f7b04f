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

from . import pdl, tma
from .device import capability
from .gdc import grid_dependency

# A module-level constant read inside @triton.jit must be a tl.constexpr: the GPU compiler
# rejects plain globals (the CPU interpreter does not, which is why kernels/aot.py exists).
_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit(do_not_specialize=["T"])
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
    TMA: tl.constexpr,  # w1_ptr is a TMA descriptor of w1 as [K * D, H]
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    # 1-D grid, column blocks fastest: the programs sharing a row tile run side by side, so
    # its gathered rows come from DRAM once and from L2 for the other column blocks
    n_cols = tl.cdiv(H, BLOCK_N)
    t = tl.program_id(0) // n_cols
    pid_n = tl.program_id(0) % n_cols
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
        if TMA:  # rows past this expert's D meet zero columns of `a`; past the end, zeros
            b = w1_ptr.load([(e * D + k0).to(tl.int32), pid_n * BLOCK_N])
        else:
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


@triton.jit(do_not_specialize=["T"])
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
    TMA: tl.constexpr,  # act_ptr [N, H] and w2_ptr (w2 as [K * H, D]) are TMA descriptors
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    n_cols = tl.cdiv(D, BLOCK_N)  # 1-D grid, column blocks fastest (as the up kernel)
    t = tl.program_id(0) // n_cols
    pid_n = tl.program_id(0) % n_cols
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
        if TMA:  # act rows of the next expert are computed but never stored; zeros past H
            a = act_ptr.load([r0, k0])
            b = w2_ptr.load([(e * H + k0).to(tl.int32), pid_n * BLOCK_N])
        else:
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
    """One launch configuration of a kernel (the up- and the down-projection may differ, with
    the same block_m: they share the tile map). `tma`: weight tiles (and, down, the activation
    tiles) come in through TMA tensor descriptors; the launcher falls back to pointer loads
    where a descriptor cannot describe the tensors."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False


# GPU configurations by token count: a 64-row tile keeps more programs in flight when few tokens
# share an expert; from a few thousand tokens a 128 x 256 tile with 8 warps feeds the tensor
# cores better (the grid then has hundreds of programs per expert).
GPU_SMALL = Blocks(64, 128, 64, 4, 3)
# At N = 65536 on an H100 the TMA forms were 2-3% faster in the sweep, within noise, and
# unchecked against the reference on a GPU so far: the pointer forms stay the default.
GPU_LARGE = Blocks(128, 256, 64, 8, 3)  # best of 6 on an H200, and on an H100 (2026-11-26)
GPU_LARGE_DOWN = Blocks(128, 256, 64, 8, 3)
GPU_LARGE_N = 4096
INTERPRETER = Blocks(64, 256, 128, 4, 1)  # few, large tiles: each tile op is one numpy call


# Three stages of the large fp32 tiles need 192 KiB of shared memory: Hopper gives a block 227 KiB,
# an A100 163 KiB, so before Hopper the large fp32 tiles run two stages (the compile guard checks
# every configuration against its target's limit).
PRE_HOPPER_FP32_STAGES = 2


def default_blocks(
    device: torch.device, n: int, down: bool = False, dtype: torch.dtype = torch.bfloat16
) -> Blocks:
    """The launch configuration for `n` tokens of `dtype` on `device` (of the down-projection if
    `down`)."""
    if device.type == "cuda":
        if n < GPU_LARGE_N:
            return GPU_SMALL
        cfg = GPU_LARGE_DOWN if down else GPU_LARGE
        if dtype == torch.float32 and capability(device) < (9, 0):
            cfg = cfg._replace(num_stages=PRE_HOPPER_FP32_STAGES)
        return cfg
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


@triton.jit(do_not_specialize=["N", "K", "T"])
def _tile_map_kernel(
    expert_ptr,  # [N] int expert ids in [0, K)
    order_ptr,  # [N] int64 out: sorted position -> token (stable)
    tiles_ptr,  # [3, T] int32 out: expert, first sorted row, end sorted row
    N,
    K,
    T,
    BLOCK_M: tl.constexpr,
    K_P2: tl.constexpr,  # next power of two >= K + 1 (the last bin takes masked lanes)
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    """`tile_map` in one program (one launch instead of a sort and a dozen small ops): count
    tokens per expert, then place each token at its expert's start plus its rank among the
    expert's earlier tokens (a per-chunk one-hot prefix sum, so the order is stable), then
    write the tile table."""
    grid_dependency(PDL)
    bins = tl.arange(0, K_P2)
    counts = tl.zeros((K_P2,), tl.int32)
    for c0 in range(0, N, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        e = tl.load(expert_ptr + offs, mask=offs < N, other=K_P2 - 1).to(tl.int32)
        counts += tl.histogram(e, K_P2)
    counts = tl.where(bins < K, counts, 0)
    starts = tl.cumsum(counts, 0) - counts  # first sorted row of each expert
    seen = tl.zeros((K_P2,), tl.int32)  # tokens of each expert placed so far
    for c0 in range(0, N, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ok = offs < N
        e = tl.load(expert_ptr + offs, mask=ok, other=K_P2 - 1).to(tl.int32)
        hot = (e[:, None] == bins[None, :]).to(tl.int32)  # [CHUNK, K_P2] one-hot
        rank = tl.cumsum(hot, 0) - hot  # earlier tokens of the same expert in this chunk
        pos = tl.sum(hot * (starts + seen)[None, :] + hot * rank, 1)
        tl.store(order_ptr + pos, offs.to(tl.int64), mask=ok)
        seen += tl.sum(hot, 0)
    n_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(n_tiles, 0)
    live_tiles = tl.sum(n_tiles, 0)
    for t0 in range(0, T, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        # expert of tile t: how many experts' tiles end at or before t (clamped for surplus)
        e = tl.sum((tile_end[None, :] <= t[:, None]) & (bins[None, :] < K), 1)
        e = tl.minimum(e, K - 1)
        sel = (bins[None, :] == e[:, None]).to(tl.int32)
        first = tl.sum(sel * (tile_end - n_tiles)[None, :], 1)  # the expert's first tile
        e_start = tl.sum(sel * starts[None, :], 1)
        e_count = tl.sum(sel * counts[None, :], 1)
        r0 = e_start + (t - first) * BLOCK_M
        r1 = tl.minimum(e_start + e_count, r0 + BLOCK_M)
        r1 = tl.where(t < live_tiles, r1, r0)
        ok = t < T
        tl.store(tiles_ptr + t, e, mask=ok)
        tl.store(tiles_ptr + T + t, r0, mask=ok)
        tl.store(tiles_ptr + 2 * T + t, r1, mask=ok)


TILE_MAP_CHUNK = 1024
TILE_MAP_KERNEL_MAX_N = 16384  # one program: beyond this the sort-based map is quicker


def build_tile_map(expert: Tensor, n_experts: int, block_m: int) -> TileMap:
    """The grouping the launcher uses: one Triton launch on a GPU up to
    TILE_MAP_KERNEL_MAX_N tokens (a batch-1 sample is launch-bound), `tile_map` otherwise."""
    if expert.is_cuda and expert.shape[0] <= TILE_MAP_KERNEL_MAX_N:
        return tile_map_fused(expert, n_experts, block_m)
    return tile_map(expert, n_experts, block_m)


def tile_map_fused(expert: Tensor, n_experts: int, block_m: int) -> TileMap:
    """`tile_map` as one Triton launch (same result: tests hold them equal)."""
    n = expert.shape[0]
    total = triton.cdiv(n, block_m) + n_experts
    order = torch.empty(n, device=expert.device, dtype=torch.long)
    tiles = torch.empty(3, total, device=expert.device, dtype=torch.int32)
    k_p2 = triton.next_power_of_2(n_experts + 1)
    _tile_map_kernel[(1,)](
        expert, order, tiles, n, n_experts, total,
        BLOCK_M=block_m, K_P2=k_p2, CHUNK=TILE_MAP_CHUNK,
        **pdl.launch_options(expert.device),
    )  # fmt: skip
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
    down_blocks: Blocks | None = None,
) -> Tensor:
    """Triton launcher. h [N, d], expert [N] long in [0, K), w1 [K, d, F], b1 [K, F],
    w2 [K, F, d], b2 [K, d], z [N, d] or None, dt a Python float -> [N, d] (z's dtype, else
    h's): `z + dt * FFN_expert(h)`, or `FFN_expert(h)` when z is None.

    `tiles` is `tile_map(expert, K, blocks.block_m)` when the caller reuses one grouping across
    calls (built here otherwise); `blocks` (the up-projection's, and the down-projection's
    unless `down_blocks` is given) defaults per device and N (`default_blocks`).
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
        default_blocks(h.device, N, dtype=h.dtype)
        if tiles is None
        else default_blocks(h.device, N, dtype=h.dtype)._replace(block_m=tiles.block_m)
    )
    if tiles is not None:
        assert tiles.block_m == cfg.block_m, f"tile map of {tiles.block_m} rows, blocks {cfg}"
        assert tiles.order.shape == (N,), "tile map built for another token count"
    out = torch.empty((N, D), device=h.device, dtype=(z if z is not None else h).dtype)
    if N == 0:
        return out
    if down_blocks is None:
        down_blocks = (
            cfg if blocks is not None else default_blocks(h.device, N, down=True, dtype=h.dtype)
        )
    dcfg = down_blocks._replace(block_m=cfg.block_m)
    order, tile_tab, total, bm = tiles or build_tile_map(expert, K, cfg.block_m)
    act = torch.empty((N, Fh), device=h.device, dtype=h.dtype)
    precision = _precision(h.dtype)
    # TMA forms read the weights as 2-D [K * rows, cols] views (contiguous weights only)
    up_tma = cfg.tma and w1.is_contiguous() and tma.ready(w1.view(K * D, Fh))
    w1a = tma.descriptor(w1.view(K * D, Fh), [cfg.block_k, cfg.block_n]) if up_tma else w1
    _expert_up_kernel[(total * triton.cdiv(Fh, cfg.block_n),)](
        h, order, tile_tab, w1a, b1, act,
        D, Fh, total,
        h.stride(0), w1.stride(0), w1.stride(1), b1.stride(0), act.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=precision,
        TMA=up_tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl.launch_options(h.device),
    )  # fmt: skip
    zz = z if z is not None else out  # a valid pointer; not read unless HAS_Z
    acta, w2a = act, w2
    down_tma = dcfg.tma and w2.is_contiguous() and tma.ready(act, w2.view(K * Fh, D))
    if down_tma:
        acta = tma.descriptor(act, [bm, dcfg.block_k])
        w2a = tma.descriptor(w2.view(K * Fh, D), [dcfg.block_k, dcfg.block_n])
    _expert_down_kernel[(total * triton.cdiv(D, dcfg.block_n),)](
        acta, order, tile_tab, w2a, b2, zz, out, float(dt),
        D, Fh, total,
        act.stride(0), w2.stride(0), w2.stride(1), b2.stride(0), zz.stride(0), out.stride(0),
        HAS_Z=z is not None, BLOCK_M=bm, BLOCK_N=dcfg.block_n, BLOCK_K=dcfg.block_k,
        DOT_PRECISION=precision, TMA=down_tma,
        num_warps=dcfg.num_warps, num_stages=dcfg.num_stages,
        **pdl.launch_options(h.device),
    )  # fmt: skip
    return out


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _large_forms(cfg: Blocks, dtype: torch.dtype) -> list[tuple[Blocks, tuple[int, ...] | None]]:
    """A large tile's forms for `dtype`, each with the targets it is chosen on (None: all): the
    pointer form and the TMA one (an option); fp32 has no TMA form, and before Hopper it runs
    fewer stages (`default_blocks`)."""
    cfg = cfg._replace(tma=False)
    if dtype == torch.float32:
        return [(cfg, (90,)), (cfg._replace(num_stages=PRE_HOPPER_FP32_STAGES), (80,))]
    return [(cfg, None), (cfg._replace(tma=True), None)]


def aot_specs() -> list:
    """Every configuration the launcher can choose on a GPU (see `yan_kernels.aot`): the small
    and the large tiles, the large ones with TMA descriptors (16-bit) and in pointer form (the
    fallback, and fp32)."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        t = "*" + name
        ups = [(GPU_SMALL, None), *_large_forms(GPU_LARGE, dtype)]
        downs = [(GPU_SMALL, None), *_large_forms(GPU_LARGE_DOWN, dtype)]
        for cfg, archs in ups:
            sig = dict(h_ptr=t, order_ptr="*i64", tiles_ptr="*i32", w1_ptr=t, b1_ptr=t, act_ptr=t,
                       D="i32", H="i32", T="i32", stride_hn="i32", stride_w1k="i32",
                       stride_w1d="i32", stride_b1k="i32", stride_an="i32")  # fmt: skip
            if cfg.tma:
                sig["w1_ptr"] = f"tensordesc<{name}[{cfg.block_k}, {cfg.block_n}]>"
            specs.append(AotSpec(
                "_expert_up_kernel", sig, _consts(cfg, dtype), cfg.num_warps, cfg.num_stages,
                label=f"{name} {cfg}", archs=archs,
            ))  # fmt: skip
        for cfg, archs in downs:
            sig = dict(act_ptr=t, order_ptr="*i64", tiles_ptr="*i32", w2_ptr=t, b2_ptr=t,
                       z_ptr=t, out_ptr=t, dt="fp32", D="i32", H="i32", T="i32",
                       stride_an="i32", stride_w2k="i32", stride_w2f="i32", stride_b2k="i32",
                       stride_zn="i32", stride_on="i32")  # fmt: skip
            if cfg.tma:
                sig["act_ptr"] = f"tensordesc<{name}[{cfg.block_m}, {cfg.block_k}]>"
                sig["w2_ptr"] = f"tensordesc<{name}[{cfg.block_k}, {cfg.block_n}]>"
            for has_z in (True, False):
                specs.append(AotSpec(
                    "_expert_down_kernel", sig, {**_consts(cfg, dtype), "HAS_Z": has_z},
                    cfg.num_warps, cfg.num_stages, label=f"{name} z={has_z} {cfg}", archs=archs,
                ))  # fmt: skip
    for bm in sorted({GPU_SMALL.block_m, GPU_LARGE.block_m}):
        for k_p2 in (8, 16):  # K = 6 experts (the presets) and up to 15
            specs.append(AotSpec(
                "_tile_map_kernel",
                dict(expert_ptr="*i64", order_ptr="*i64", tiles_ptr="*i32", N="i32", K="i32",
                     T="i32"),
                dict(BLOCK_M=bm, K_P2=k_p2, CHUNK=TILE_MAP_CHUNK), 4, 1,
                label=f"block_m={bm} K_P2={k_p2}",
            ))  # fmt: skip
    return with_pdl(specs)


def _consts(cfg: Blocks, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                DOT_PRECISION=_precision(dtype), TMA=cfg.tma)  # fmt: skip


def routed_expert_euler_dense(
    h: Tensor,
    expert: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    z: Tensor | None = None,
    dt: float = 1.0,
) -> Tensor:
    """`routed_expert_euler_ref` without data-dependent shapes (differentiable, no host sync):
    every expert's FFN at every token, then each token's routed output. K times the FLOPs of
    the grouped form, in a fixed number of launches; the gradient reaches an expert only from
    the tokens routed to it, as in the reference."""
    a = F.gelu(torch.einsum("nd,kdf->nkf", h, w1) + b1)
    every = torch.einsum("nkf,kfd->nkd", a, w2) + b2  # [N, K, d]
    out = every.gather(1, expert[:, None, None].expand(-1, 1, every.shape[-1])).squeeze(1)
    if z is None:
        return out
    return z + dt * out


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
