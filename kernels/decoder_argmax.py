"""Decoder lm_head fused with an online softmax: argmax token, its probability, an optional
Gumbel-max temperature sample and optional label log-probabilities, without ever writing the
[N, V] logits to memory.

Layout: a program owns BLOCK_M rows and one contiguous slice ("split") of the vocabulary, and
walks that slice in tiles of BLOCK_V: logits = x @ W[tile]^T + b (fp32 accumulation over d in
BLOCK_K chunks), then running max / argmax (strictly greater, so the lowest index wins ties),
running sum of exp(logit - max) (online log-sum-exp), the Gumbel-perturbed running max, and the
logits at the label ids. Each split writes its per-row partials to a [S, N] buffer and the
launcher folds the S partials with a few torch ops; splitting the vocabulary keeps the GPU busy
when N is small (one request is a few dozen rows against V = 128258). The last tile is masked
to -inf past V.

Sampling: row r samples argmax_v(logit_v / T_r + g_{r,v}), g = -log(-log(u)), u from Philox
keyed by the row's 64-bit seed with counter v (`tl.rand(seed_r, v)`), i.e. a draw from
softmax(logits / T_r) that depends only on the row's seed, not on its batch neighbours.
`philox_uniform` reproduces `tl.rand` bit for bit in torch for the reference. Top-k sampling is
not fused: the serving sampler keeps top-k (and its inverse-CDF draws) in the torch path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import pdl, tma
from .device import sm_count
from .gdc import grid_dependency

_LOG2E = tl.constexpr(1.4426950408889634)


class DecodeResult(NamedTuple):
    token: Tensor  # [N] long, argmax (lowest index among ties)
    prob: Tensor  # [N] fp32, softmax probability of `token`
    sample: Tensor | None  # [N] long, temperature sample (argmax where temperature <= 0)
    label_logp: Tensor | None  # [N] or [N, M] fp32, log-probability of each label id


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def _decoder_argmax_kernel(
    x_ptr,  # [N, D]
    w_ptr,  # [V, D]
    b_ptr,  # [V]
    inv_t_ptr,  # [N] fp32, 1 / temperature (SAMPLE)
    seed_ptr,  # [N] int64 (SAMPLE)
    labels_ptr,  # [N, M] int (M > 0)
    max_ptr,  # [S, N] fp32 out: running max
    arg_ptr,  # [S, N] int32 out: its index
    sum_ptr,  # [S, N] fp32 out: sum of exp(logit - max)
    gmax_ptr,  # [S, N] fp32 out: max of the perturbed logits (SAMPLE)
    garg_ptr,  # [S, N] int32 out: its index (SAMPLE)
    lab_ptr,  # [S, N, M] fp32 out: logits at the labels (M > 0)
    N,
    V,
    D,
    tiles_per_split,
    stride_xn,
    stride_wv,
    M: tl.constexpr,
    M_P2: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr,  # cdiv(D, BLOCK_K)
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # x_ptr / w_ptr are TMA tensor descriptors (Hopper)
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    a_i = tl.zeros((BLOCK_M,), tl.int32)
    g_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    ga_i = tl.zeros((BLOCK_M,), tl.int32)
    lab_acc = tl.zeros((BLOCK_M, M_P2), tl.float32)
    lab_col = tl.arange(0, M_P2)
    if SAMPLE:
        inv_t = tl.load(inv_t_ptr + rows, mask=row_ok, other=1.0)
        seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    # One flat loop over (vocabulary tile, d chunk) pairs rather than two nested loops: the
    # software pipeliner then keeps loads in flight across tile boundaries (the pattern of
    # Triton's persistent matmul), and the softmax epilogue runs on the tile's last chunk.
    for i in range(0, tiles_per_split * K_TILES):
        it = i // K_TILES
        kk = i - it * K_TILES
        cols = v_begin + it * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        if TMA:  # x_ptr / w_ptr are tensor descriptors; the copy engine zero-fills past N, V, D
            xt = x_ptr.load([pid_m * BLOCK_M, kk * BLOCK_K])
            wt = w_ptr.load([v_begin + it * BLOCK_V, kk * BLOCK_K])
        else:
            ks = kk * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            xt = tl.load(
                x_ptr + rows64[:, None] * stride_xn + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + cols[:, None].to(tl.int64) * stride_wv + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
        if kk == K_TILES - 1:
            # columns past V get a -inf bias (their weights loaded as 0), so no extra select
            bias = tl.load(b_ptr + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
            logits = acc + bias[None, :]
            # online max / argmax / log-sum-exp (every split's first tile has a valid column)
            # one reduction gives the tile's max and its (lowest) index
            t_max, t_arg = tl.max(logits, axis=1, return_indices=True,
                                  return_indices_tie_break_left=True)  # fmt: skip
            new_m = tl.maximum(m_i, t_max)
            # exp(l - m) as exp2(l * log2e - m * log2e): one FMA and one MUFU op per logit
            m2 = new_m * _LOG2E
            p = tl.exp2(logits * _LOG2E - m2[:, None])
            s_i = s_i * tl.exp2(m_i * _LOG2E - m2) + tl.sum(p, axis=1)
            a_i = tl.where(t_max > m_i, t_arg.to(tl.int32) + v_begin + it * BLOCK_V, a_i)
            m_i = new_m
            if SAMPLE:
                offs = tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_V))
                keys = tl.broadcast_to(seed[:, None], (BLOCK_M, BLOCK_V))
                u = tl.rand(keys, offs)
                pert = logits * inv_t[:, None] - tl.log(-tl.log(u))
                p_max, p_arg = tl.max(pert, axis=1, return_indices=True,
                                      return_indices_tie_break_left=True)  # fmt: skip
                ga_i = tl.where(p_max > g_i, p_arg.to(tl.int32) + v_begin + it * BLOCK_V, ga_i)
                g_i = tl.maximum(g_i, p_max)
            if M > 0:
                for j in tl.static_range(M):
                    lab = tl.load(labels_ptr + rows64 * M + j, mask=row_ok, other=-1)
                    hit = cols[None, :] == lab[:, None]
                    val = tl.sum(tl.where(hit, logits, 0.0), axis=1)
                    lab_acc = tl.where(lab_col[None, :] == j, lab_acc + val[:, None], lab_acc)
            acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    out = pid_s * N + rows64
    tl.store(max_ptr + out, m_i, mask=row_ok)
    tl.store(arg_ptr + out, a_i, mask=row_ok)
    tl.store(sum_ptr + out, s_i, mask=row_ok)
    if SAMPLE:
        tl.store(gmax_ptr + out, g_i, mask=row_ok)
        tl.store(garg_ptr + out, ga_i, mask=row_ok)
    if M > 0:
        tl.store(
            lab_ptr + out[:, None] * M + lab_col[None, :],
            lab_acc,
            mask=row_ok[:, None] & (lab_col[None, :] < M),
        )


@triton.jit(do_not_specialize=["N", "S"])
def _fold_kernel(
    max_ptr,  # [S, N] fp32 partials from _decoder_argmax_kernel
    arg_ptr,  # [S, N] int32
    sum_ptr,  # [S, N] fp32
    gmax_ptr,  # [S, N] fp32 (SAMPLE)
    garg_ptr,  # [S, N] int32 (SAMPLE)
    lab_ptr,  # [S, N, M] fp32 (M > 0)
    temp_ptr,  # [N] fp32 temperatures (SAMPLE)
    token_ptr,  # [N] int64 out
    prob_ptr,  # [N] fp32 out
    sample_ptr,  # [N] int64 out (SAMPLE)
    logp_ptr,  # [N, M] fp32 out (M > 0)
    N,
    S,
    M: tl.constexpr,
    M_P2: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    """Fold the S vocabulary splits of each row in one launch: the first split holding the
    global max wins ties (so the lowest index wins overall), sums are rescaled to that max."""
    grid_dependency(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    gm = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    tok = tl.zeros((BLOCK_N,), tl.int32)
    for s in range(0, S):  # rows past N read 0 (not -inf) so that no inf - inf is formed
        m = tl.load(max_ptr + s * N + rows, mask=ok, other=0.0)
        a = tl.load(arg_ptr + s * N + rows, mask=ok, other=0)
        tok = tl.where(m > gm, a, tok)
        gm = tl.maximum(gm, m)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for s in range(0, S):
        m = tl.load(max_ptr + s * N + rows, mask=ok, other=0.0)
        sm = tl.load(sum_ptr + s * N + rows, mask=ok, other=1.0)
        total += sm * tl.exp(m - gm)
    lse = gm + tl.log(total)
    tl.store(token_ptr + rows, tok.to(tl.int64), mask=ok)
    tl.store(prob_ptr + rows, tl.exp(gm - lse), mask=ok)
    if SAMPLE:
        gg = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        samp = tl.zeros((BLOCK_N,), tl.int32)
        for s in range(0, S):
            g = tl.load(gmax_ptr + s * N + rows, mask=ok, other=0.0)
            a = tl.load(garg_ptr + s * N + rows, mask=ok, other=0)
            samp = tl.where(g > gg, a, samp)
            gg = tl.maximum(gg, g)
        temp = tl.load(temp_ptr + rows, mask=ok, other=0.0)
        samp = tl.where(temp > 0, samp, tok)
        tl.store(sample_ptr + rows, samp.to(tl.int64), mask=ok)
    if M > 0:
        cols = tl.arange(0, M_P2)
        lmask = ok[:, None] & (cols[None, :] < M)
        acc = tl.zeros((BLOCK_N, M_P2), tl.float32)
        for s in range(0, S):
            acc += tl.load(
                lab_ptr + (s * N + rows)[:, None].to(tl.int64) * M + cols[None, :],
                mask=lmask,
                other=0.0,
            )
        tl.store(logp_ptr + rows[:, None].to(tl.int64) * M + cols[None, :],
                 acc - lse[:, None], mask=lmask)  # fmt: skip


class Blocks(NamedTuple):
    """One launch configuration of the decoder kernel. `tma`: x and W tiles come in through
    TMA tensor descriptors (Hopper's copy engine: no address arithmetic or masks in the loop);
    the launcher falls back to pointer loads where a descriptor cannot describe the tensors."""

    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False


# GPU configurations by row count. Few rows (a batch-1 request is a few dozen positions): the
# op streams the [V, d] weight once, so the row tile just covers N and the vocabulary is split
# over ~2 programs per SM. Many rows: 128 x 256 tiles with 8 warps, one split per row block
# when there are enough row blocks to fill the GPU.
GPU_ROW_TILES = (16, 32, 64)
GPU_SMALL = Blocks(64, 128, 64, 4, 4)  # block_m follows N (16, 32 or 64)
GPU_LARGE = Blocks(128, 256, 64, 8, 3, tma=True)  # pointer form: best of 7 on an H200
SMEM_PER_SM = 227 * 1024  # Hopper's shared memory per SM (A100: 164 KiB; only sizes waves)
GPU_FP32_STAGES = 2  # fp32 tiles take twice the shared memory per stage
INTERPRETER = Blocks(64, 256, 128, 4, 1)  # few, large tiles: each tile op is one numpy call
FOLD_BLOCK = 128


def default_blocks(device: torch.device, n: int, dtype: torch.dtype) -> Blocks:
    """The launch configuration for `n` rows of `dtype` on `device`."""
    if device.type != "cuda":
        return INTERPRETER
    if n > GPU_ROW_TILES[-1]:
        cfg = GPU_LARGE
    else:
        cfg = GPU_SMALL._replace(block_m=next(t for t in GPU_ROW_TILES if t >= n))
    if dtype == torch.float32:
        cfg = cfg._replace(num_stages=min(cfg.num_stages, GPU_FP32_STAGES), tma=False)
    return cfg


def programs_per_sm(cfg: Blocks, elt: int) -> int:
    """Programs of `cfg` one SM holds at once, as bounded by the pipeline's shared memory."""
    smem = cfg.num_stages * (cfg.block_m + cfg.block_v) * cfg.block_k * elt
    return max(1, min(4, SMEM_PER_SM // max(smem, 1)))


SPLIT_OVERHEAD_TILES = 2  # a program's fixed cost (pipeline fill, partials), in tile steps


@functools.cache
def default_splits(row_blocks: int, n_tiles: int, slots: int) -> int:
    """Vocabulary splits S for `row_blocks` row tiles over `n_tiles` vocabulary tiles when
    `slots` programs run at once: the S with the least time in tile steps,
    waves(S) * (ceil(n_tiles / S) + SPLIT_OVERHEAD_TILES) with
    waves(S) = ceil(row_blocks * S / slots), the smallest S among equals. This avoids a last
    wave that leaves most SMs idle: 64 row tiles on 132 slots take S = 2 (one wave of 128
    programs), not S = 5 (three waves, the last a third full)."""
    best, best_cost = 1, None
    for s in range(1, n_tiles + 1):
        waves = -(-row_blocks * s // slots)
        cost = waves * (-(-n_tiles // s) + SPLIT_OVERHEAD_TILES)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def _default_splits(device: torch.device, cfg: Blocks, elt: int, row_blocks: int,
                    n_tiles: int) -> int:  # fmt: skip
    if device.type != "cuda":
        return 1
    return default_splits(row_blocks, n_tiles, sm_count(device) * programs_per_sm(cfg, elt))


def _as_rows(v: Tensor | float, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if not isinstance(v, Tensor):  # filled on the device: no host-to-device copy (capturable)
        return torch.full((n,), v, device=device, dtype=dtype)
    t = v.to(device=device, dtype=dtype)
    return t.expand(n).contiguous() if t.dim() == 0 else t


def _labels_2d(labels: Tensor, n: int) -> tuple[Tensor, bool]:
    squeeze = labels.dim() == 1
    lab = labels[:, None] if squeeze else labels
    assert lab.dim() == 2 and lab.shape[0] == n, f"labels {tuple(labels.shape)} for {n} rows"
    return lab, squeeze


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def decoder_argmax(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    temperature: Tensor | float | None = None,
    seed: Tensor | None = None,
    labels: Tensor | None = None,
    block_m: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
    blocks: Blocks | None = None,
) -> DecodeResult:
    """Triton launcher. x [N, d], weight [V, d] (nn.Linear layout), bias [V]; temperature
    (float or [N]) with seed ([N] int64) asks for a Gumbel-max sample per row (rows with
    temperature <= 0 get the argmax); labels [N] or [N, M] ids in [0, V) ask for their
    log-probabilities. The launch configuration defaults per device and N (`default_blocks`,
    `blocks` replaces it, `block_*` override single fields), the vocabulary split count per
    device. Two launches (the split kernel and the fold), no host synchronization."""
    N, D = x.shape
    V, D1 = weight.shape
    assert D1 == D and bias.shape == (V,), f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    assert x.dtype == weight.dtype, f"x {x.dtype} vs weight {weight.dtype}"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), x.dtype
    assert x.stride(1) == 1 and weight.stride(1) == 1 and bias.stride(0) == 1, "not contiguous"
    assert x.device == weight.device == bias.device, "tensors on several devices"
    assert V < 2**31 and N < 2**31
    dev = x.device
    cfg = blocks or default_blocks(dev, N, x.dtype)
    bm, bv, bk = block_m or cfg.block_m, block_v or cfg.block_v, block_k or cfg.block_k
    sample = temperature is not None
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    if sample:
        assert seed is not None, "temperature sampling needs a per-row seed"
        temp = _as_rows(temperature, N, dev, torch.float32)
        seeds = _as_rows(seed, N, dev, torch.int64)
        assert temp.shape == (N,) and seeds.shape == (N,), "temperature / seed must be [N]"
        inv_t = 1.0 / torch.where(temp > 0, temp, torch.ones_like(temp))
    else:
        temp = inv_t = seeds = torch.empty(0, **f32)
    if labels is not None:
        lab, squeeze = _labels_2d(labels, N)
        lab = lab.to(device=dev, dtype=torch.int64).contiguous()
        M = lab.shape[1]
    else:
        lab, squeeze, M = torch.empty(0, device=dev, dtype=torch.int64), False, 0
    n_tiles = triton.cdiv(V, bv)
    row_blocks = triton.cdiv(N, bm)
    cfg = cfg._replace(block_m=bm, block_v=bv, block_k=bk)
    S = splits or _default_splits(dev, cfg, x.element_size(), row_blocks, n_tiles)
    use_tma = cfg.tma and tma.ready(x, weight)
    per = triton.cdiv(n_tiles, S)
    S = triton.cdiv(n_tiles, per)  # every split starts inside the vocabulary
    mx, sm = torch.empty(S, N, **f32), torch.empty(S, N, **f32)
    arg = torch.empty(S, N, **i32)
    gmx = torch.empty(S, N, **f32) if sample else mx
    garg = torch.empty(S, N, **i32) if sample else arg
    lab_out = torch.empty(S, N, M, **f32) if M else mx
    token = torch.empty(N, device=dev, dtype=torch.long)
    prob = torch.empty(N, **f32)
    samp = torch.empty(N, device=dev, dtype=torch.long) if sample else token
    logp = torch.empty(N, M, **f32) if M else prob
    m_p2 = triton.next_power_of_2(max(M, 1))
    if N > 0:
        xa, wa = x, weight
        if use_tma:
            xa, wa = tma.descriptor(x, [bm, bk]), tma.descriptor(weight, [bv, bk])
        _decoder_argmax_kernel[(row_blocks, S)](
            xa, wa, bias, inv_t, seeds, lab,
            mx, arg, sm, gmx, garg, lab_out,
            N, V, D, per, x.stride(0), weight.stride(0),
            M=M, M_P2=m_p2, SAMPLE=sample,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, K_TILES=triton.cdiv(D, bk),
            DOT_PRECISION=_precision(x.dtype), TMA=use_tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **pdl.launch_options(x.device),
        )  # fmt: skip
        _fold_kernel[(triton.cdiv(N, FOLD_BLOCK),)](
            mx, arg, sm, gmx, garg, lab_out, temp if sample else prob,
            token, prob, samp, logp, N, S,
            M=M, M_P2=m_p2, SAMPLE=sample, BLOCK_N=FOLD_BLOCK,
            **pdl.launch_options(x.device),
        )  # fmt: skip
    label_logp = None
    if M:
        label_logp = logp.squeeze(1) if squeeze else logp
    return DecodeResult(token, prob, samp if sample else None, label_logp)


def aot_specs() -> list:
    """Every configuration the launcher can choose on a GPU (see `yan_kernels.aot`). The label
    count M is data-dependent: 0 (generation), 1 and 3 are compiled as representatives, with
    greedy, sampling, scoring and sampling + scoring; fp16 (never served) only greedy."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    combos = ((False, 0), (True, 0), (False, 3), (True, 1))  # (SAMPLE, M)
    configs = [GPU_SMALL._replace(block_m=t) for t in GPU_ROW_TILES]
    configs += [GPU_LARGE._replace(tma=True), GPU_LARGE._replace(tma=False)]  # + the fallback
    specs = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        name = TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        t = "*" + name
        sig = dict(
            x_ptr=t,
            w_ptr=t,
            b_ptr=t,
            inv_t_ptr="*fp32",
            seed_ptr="*i64",
            labels_ptr="*i64",
            max_ptr="*fp32",
            arg_ptr="*i32",
            sum_ptr="*fp32",
            gmax_ptr="*fp32",
            garg_ptr="*i32",
            lab_ptr="*fp32",
            N="i32",
            V="i32",
            D="i32",
            tiles_per_split="i32",
            stride_xn="i32",
            stride_wv="i32",
        )
        for cfg in configs:
            if dtype == torch.float32:
                if cfg.tma:
                    continue  # 16-bit only
                cfg = cfg._replace(num_stages=min(cfg.num_stages, GPU_FP32_STAGES))
            tsig = dict(sig)
            if cfg.tma:
                tsig["x_ptr"] = f"tensordesc<{name}[{cfg.block_m}, {cfg.block_k}]>"
                tsig["w_ptr"] = f"tensordesc<{name}[{cfg.block_v}, {cfg.block_k}]>"
            for sample, M in combos[: 1 if dtype == torch.float16 else None]:
                const = dict(
                    M=M,
                    M_P2=triton.next_power_of_2(max(M, 1)),
                    SAMPLE=sample,
                    BLOCK_M=cfg.block_m,
                    BLOCK_V=cfg.block_v,
                    BLOCK_K=cfg.block_k,
                    K_TILES=512 // cfg.block_k,
                    DOT_PRECISION=_precision(dtype),
                    TMA=cfg.tma,
                )
                label = f"{name} sample={sample} M={M} {cfg}"
                specs.append(
                    AotSpec(
                        "_decoder_argmax_kernel", tsig, const, cfg.num_warps, cfg.num_stages, label
                    )
                )
    fold_sig = dict(
        max_ptr="*fp32",
        arg_ptr="*i32",
        sum_ptr="*fp32",
        gmax_ptr="*fp32",
        garg_ptr="*i32",
        lab_ptr="*fp32",
        temp_ptr="*fp32",
        token_ptr="*i64",
        prob_ptr="*fp32",
        sample_ptr="*i64",
        logp_ptr="*fp32",
        N="i32",
        S="i32",
    )
    for sample, M in combos:
        const = dict(M=M, M_P2=triton.next_power_of_2(max(M, 1)), SAMPLE=sample, BLOCK_N=FOLD_BLOCK)
        specs.append(AotSpec("_fold_kernel", fold_sig, const, 4, 1, f"sample={sample} M={M}"))
    return with_pdl(specs)


def philox_uniform(seed: Tensor, n: int) -> Tensor:
    """`tl.rand(seed_r, v)` for v in [0, n), in torch: seed [R] int64 -> [R, n] fp32 in [0, 1).

    Philox-4x32 with 10 rounds keyed by the seed's two 32-bit halves, counter (v, 0, 0, 0);
    the first output word becomes a float as Triton does (|int32| * 4.6566127342e-10)."""
    mask = 0xFFFFFFFF

    def mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
        # a * b for a 32-bit constant and 32-bit b without overflowing int64
        ah, al = a >> 16, a & 0xFFFF
        hi_part, lo_part = ah * b, al * b
        hi = (hi_part + (lo_part >> 16)) >> 16
        lo = (((hi_part & 0xFFFF) << 16) + lo_part) & mask
        return hi, lo

    dev = seed.device
    c0 = torch.arange(n, device=dev, dtype=torch.int64)[None, :].expand(seed.shape[0], n)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seed.to(torch.int64) & mask)[:, None]
    k1 = ((seed.to(torch.int64) >> 32) & mask)[:, None]
    for _ in range(10):
        hi_b, lo_b = mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & mask
        k1 = (k1 + 0xBB67AE85) & mask
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=dev)


def decoder_argmax_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    temperature: Tensor | float | None = None,
    seed: Tensor | None = None,
    labels: Tensor | None = None,
) -> DecodeResult:
    """Pure-torch reference with the launcher's signature; materializes the [N, V] logits
    (computed in the input dtype, then upcast, as `Sampler.decode` does)."""
    N = x.shape[0]
    logits = F.linear(x, weight, bias).float()  # [N, V]
    logp = torch.log_softmax(logits, dim=-1)
    token = logits.argmax(-1)
    prob = logp.gather(-1, token[:, None]).squeeze(-1).exp()
    samp = None
    if temperature is not None:
        assert seed is not None, "temperature sampling needs a per-row seed"
        temp = _as_rows(temperature, N, x.device, torch.float32)
        seeds = _as_rows(seed, N, x.device, torch.int64)
        inv_t = 1.0 / torch.where(temp > 0, temp, torch.ones_like(temp))
        u = philox_uniform(seeds, logits.shape[-1])
        pert = logits * inv_t[:, None] - torch.log(-torch.log(u))
        samp = torch.where(temp > 0, pert.argmax(-1), token)
    label_logp = None
    if labels is not None:
        lab, squeeze = _labels_2d(labels.to(x.device, torch.int64), N)
        label_logp = logp.gather(-1, lab)
        label_logp = label_logp.squeeze(1) if squeeze else label_logp
    return DecodeResult(token, prob, samp, label_logp)
