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


class DecodeResult(NamedTuple):
    token: Tensor  # [N] long, argmax (lowest index among ties)
    prob: Tensor  # [N] fp32, softmax probability of `token`
    sample: Tensor | None  # [N] long, temperature sample (argmax where temperature <= 0)
    label_logp: Tensor | None  # [N] or [N, M] fp32, log-probability of each label id


@triton.jit
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
    DOT_PRECISION: tl.constexpr,
):
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
    for it in range(0, tiles_per_split):
        cols = v_begin + it * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
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
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        logits = tl.where(col_ok[None, :], acc + bias[None, :], float("-inf"))
        # online max / argmax / log-sum-exp (every split's first tile has a valid column)
        t_max = tl.max(logits, axis=1)
        t_arg = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int32)
        new_m = tl.maximum(m_i, t_max)
        s_i = s_i * tl.exp(m_i - new_m) + tl.sum(tl.exp(logits - new_m[:, None]), axis=1)
        a_i = tl.where(t_max > m_i, t_arg + v_begin + it * BLOCK_V, a_i)
        m_i = new_m
        if SAMPLE:
            offs = tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_V))
            keys = tl.broadcast_to(seed[:, None], (BLOCK_M, BLOCK_V))
            u = tl.rand(keys, offs)
            pert = logits * inv_t[:, None] - tl.log(-tl.log(u))
            p_max = tl.max(pert, axis=1)
            p_arg = tl.argmax(pert, axis=1, tie_break_left=True).to(tl.int32)
            ga_i = tl.where(p_max > g_i, p_arg + v_begin + it * BLOCK_V, ga_i)
            g_i = tl.maximum(g_i, p_max)
        if M > 0:
            for j in tl.static_range(M):
                lab = tl.load(labels_ptr + rows64 * M + j, mask=row_ok, other=-1)
                hit = cols[None, :] == lab[:, None]
                val = tl.sum(tl.where(hit, logits, 0.0), axis=1)
                lab_acc = tl.where(lab_col[None, :] == j, lab_acc + val[:, None], lab_acc)
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


def _default_blocks(
    device: torch.device, n: int, dtype: torch.dtype
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages). On GPUs the row tile follows N (a
    dot needs >= 16 rows) and fp32 tiles get one stage less of shared memory; the interpreter
    wants few, large tiles."""
    if device.type == "cuda":
        bm = min(max(triton.next_power_of_2(n), 16), 128)
        return bm, 128, 64, 8 if bm >= 128 else 4, 2 if dtype == torch.float32 else 3
    return 64, 256, 128, 4, 1


def _default_splits(device: torch.device, row_blocks: int, n_tiles: int) -> int:
    """Vocabulary splits so that about two programs per SM are in flight (1 off-GPU)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_tiles, triton.cdiv(2 * sms, row_blocks)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _as_rows(v: Tensor | float, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(v, device=device, dtype=dtype)
    return t.expand(n).contiguous() if t.dim() == 0 else t


def _labels_2d(labels: Tensor, n: int) -> tuple[Tensor, bool]:
    squeeze = labels.dim() == 1
    lab = labels[:, None] if squeeze else labels
    assert lab.dim() == 2 and lab.shape[0] == n, f"labels {tuple(labels.shape)} for {n} rows"
    return lab, squeeze


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
) -> DecodeResult:
    """Triton launcher. x [N, d], weight [V, d] (nn.Linear layout), bias [V]; temperature
    (float or [N]) with seed ([N] int64) asks for a Gumbel-max sample per row (rows with
    temperature <= 0 get the argmax); labels [N] or [N, M] ids in [0, V) ask for their
    log-probabilities. Block sizes and the vocabulary split count default per device."""
    N, D = x.shape
    V, D1 = weight.shape
    assert D1 == D and bias.shape == (V,), f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    assert x.dtype == weight.dtype, f"x {x.dtype} vs weight {weight.dtype}"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), x.dtype
    assert x.stride(1) == 1 and weight.stride(1) == 1 and bias.stride(0) == 1, "not contiguous"
    assert x.device == weight.device == bias.device, "tensors on several devices"
    assert V < 2**31 and N < 2**31
    dev = x.device
    dm, dv, dk, warps, stages = _default_blocks(dev, N, x.dtype)
    bm, bv, bk = block_m or dm, block_v or dv, block_k or dk
    sample = temperature is not None
    if sample:
        assert seed is not None, "temperature sampling needs a per-row seed"
        temp = _as_rows(temperature, N, dev, torch.float32)
        seeds = _as_rows(seed, N, dev, torch.int64)
        assert temp.shape == (N,) and seeds.shape == (N,), "temperature / seed must be [N]"
        inv_t = 1.0 / torch.where(temp > 0, temp, torch.ones_like(temp))
    else:
        inv_t = seeds = torch.empty(0, device=dev)
    if labels is not None:
        lab, squeeze = _labels_2d(labels, N)
        lab = lab.to(device=dev, dtype=torch.int64).contiguous()
        M = lab.shape[1]
    else:
        lab, squeeze, M = torch.empty(0, device=dev, dtype=torch.int64), False, 0
    n_tiles = triton.cdiv(V, bv)
    row_blocks = triton.cdiv(N, bm)
    S = splits or _default_splits(dev, row_blocks, n_tiles)
    per = triton.cdiv(n_tiles, S)
    S = triton.cdiv(n_tiles, per)  # every split starts inside the vocabulary
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    mx, sm = torch.empty(S, N, **f32), torch.empty(S, N, **f32)
    arg = torch.empty(S, N, **i32)
    gmx = torch.empty(S, N, **f32) if sample else mx
    garg = torch.empty(S, N, **i32) if sample else arg
    lab_out = torch.empty(S, N, M, **f32) if M else mx
    if N > 0:
        _decoder_argmax_kernel[(row_blocks, S)](
            x, weight, bias, inv_t, seeds, lab,
            mx, arg, sm, gmx, garg, lab_out,
            N, V, D, per, x.stride(0), weight.stride(0),
            M=M, M_P2=triton.next_power_of_2(max(M, 1)), SAMPLE=sample,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    # fold the splits: the first split holding the global max wins ties (lowest index)
    gm, first = _fold_max(mx)
    token = arg.gather(0, first[None]).squeeze(0).long()
    total = (sm * torch.exp(mx - gm)).sum(0)
    lse = gm + torch.log(total)
    prob = torch.exp(gm - lse)
    samp = None
    if sample:
        _, gfirst = _fold_max(gmx)
        samp = garg.gather(0, gfirst[None]).squeeze(0).long()
        samp = torch.where(temp > 0, samp, token)
    label_logp = None
    if M:
        label_logp = lab_out.sum(0) - lse[:, None]
        label_logp = label_logp.squeeze(1) if squeeze else label_logp
    return DecodeResult(token, prob, samp, label_logp)


def _fold_max(parts: Tensor) -> tuple[Tensor, Tensor]:
    """parts [S, N] -> (max over S [N], the first s attaining it [N])."""
    first = parts.argmax(0)  # torch.argmax returns the first of equal maxima
    return parts.gather(0, first[None]).squeeze(0), first


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
