"""Bidirectional attention over key-padded rows, split over the keys when the batch is small.

YAN's encoder, trunk and cross-attention are non-causal attention where each batch row has its
own count of real keys (a prefix). At batch 1 a sequence of 1,024 tokens with 8 heads gives a
FlashAttention-style kernel only 8 x 8 programs of 128 queries: half an H100 idles while each
program walks all 1,024 keys. Here, as in flash-decoding, the keys are also split into S
chunks when the (query block x batch x head) programs are fewer than twice the SMs:

    pass 1, grid (query blocks, B * H, S): each program runs an online softmax over its chunk
            of the row's real keys and writes its partial output, running max and sum (fp32);
    pass 2, grid (query blocks, B * H): the S partials are merged with their max-shifted
            weights into the output.

With S = 1 pass 1 normalizes and writes the output itself (one launch). Queries, keys and values
are read in place from the packed projections ([tokens, H, hd] views with any row and head
strides); the output is [tokens, H * hd] for the output projection. A row with no real key
attends to every key, as `key_padding_mask` does. Scores accumulate in fp32 (`tl.dot`), the
probabilities are rounded to the values' dtype for the second product, as FlashAttention does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .device import sm_count
from .gdc import grid_dependency


@triton.jit
def _query_tile(Lq, H: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    """This program's batch row, head, query rows and head dims (with their bounds masks), from
    grid axes 0 (query block) and 1 (batch row x head)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    return bh, bh // H, bh % H, rows, rows < Lq, dims, dims < HD


@triton.jit
def _store_out(o_ptr, out, stride_ot, b, h, rows, row_ok, dims, d_ok, Lq, HD: tl.constexpr):
    """Rows of one head's output into [B * Lq, H * HD], in the output's dtype."""
    tok = (b * Lq + rows).to(tl.int64)
    tl.store(o_ptr + tok[:, None] * stride_ot + h * HD + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["Lq", "Lk", "chunk"])
def _attention_kernel(
    q_ptr,  # [B * Lq, H, HD] (row, head strides; unit inner)
    k_ptr,  # [B * Lk, H, HD]
    v_ptr,  # [B * Lk, H, HD]
    klen_ptr,  # [B] int32: real keys per row (0: all of them)
    o_ptr,  # [B * Lq, H * HD] (SPLIT == 1)
    po_ptr,  # [S, B * H, Lq, HD] fp32 partial outputs (SPLIT > 1)
    pm_ptr,  # [S, B * H, Lq] fp32 running maxima
    pl_ptr,  # [S, B * H, Lq] fp32 running sums
    Lq,
    Lk,
    chunk,  # keys per split (a multiple of BLOCK_N)
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    H: tl.constexpr,
    HD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    bh, b, h, rows, row_ok, dims, d_ok = _query_tile(Lq, H, HD, BLOCK_M, BLOCK_D)
    s = tl.program_id(2)
    n_real = tl.load(klen_ptr + b)
    n_real = tl.where(n_real > 0, n_real, Lk)
    q_tok = (b * Lq + rows).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_qt + h * stride_qh + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = s * chunk
    stop = tl.minimum(start + chunk, n_real)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < stop
        k_tok = (b * Lk + cols).to(tl.int64)
        tile = c_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_tok[:, None] * stride_kt + h * stride_kh + dims[None, :],
                    mask=tile, other=0.0)  # fmt: skip
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(c_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + k_tok[:, None] * stride_vt + h * stride_vh + dims[None, :],
                    mask=tile, other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    if SPLIT == 1:
        _store_out(o_ptr, acc / l_i[:, None], stride_ot, b, h, rows, row_ok, dims, d_ok, Lq, HD)
    else:
        part = ((s * (tl.num_programs(1)) + bh).to(tl.int64) * Lq + rows).to(tl.int64)
        tl.store(po_ptr + part[:, None] * HD + dims[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
        tl.store(pm_ptr + part, m_i, mask=row_ok)
        tl.store(pl_ptr + part, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["Lq"])
def _attention_merge_kernel(
    po_ptr,  # [S, B * H, Lq, HD] fp32
    pm_ptr,  # [S, B * H, Lq] fp32
    pl_ptr,  # [S, B * H, Lq] fp32
    o_ptr,  # [B * Lq, H * HD]
    Lq,
    BH,
    stride_ot,
    H: tl.constexpr,
    HD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    bh, b, h, rows, row_ok, dims, d_ok = _query_tile(Lq, H, HD, BLOCK_M, BLOCK_D)
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    for s in range(SPLIT):
        part = (s * BH + bh).to(tl.int64) * Lq + rows
        m = tl.maximum(m, tl.load(pm_ptr + part, mask=row_ok, other=-1.0e30))
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(SPLIT):
        part = (s * BH + bh).to(tl.int64) * Lq + rows
        w = tl.exp(tl.load(pm_ptr + part, mask=row_ok, other=-1.0e30) - m)
        total += w * tl.load(pl_ptr + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(po_ptr + part[:, None] * HD + dims[None, :],
                                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    out = acc / tl.where(row_ok, total, 1.0)[:, None]  # rows past Lq: no 0 / 0
    _store_out(o_ptr, out, stride_ot, b, h, rows, row_ok, dims, d_ok, Lq, HD)


BLOCK_M, BLOCK_N = 64, 64
MAX_SPLIT = 8


def splits_for(programs: int, key_blocks: int, sms: int, most: int = MAX_SPLIT) -> int:
    """Key chunks per (query block, row, head): enough for ~2 programs per SM, at most one
    chunk per key block and `most` (this kernel's `MAX_SPLIT`; `decode_attention` has its
    own)."""
    want = -(-2 * sms // max(programs, 1))
    return max(1, min(want, key_blocks, most))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return sm_count(device)
    return 4  # the interpreter: a few splits, so the tests cover the merge


def attention(
    q: Tensor, k: Tensor, v: Tensor, klen: Tensor, Lq: int, Lk: int, split: int | None = None
) -> Tensor:
    """Triton launcher: q [B * Lq, H, hd], k / v [B * Lk, H, hd] (views with a unit inner
    stride), klen [B] int32 (real keys per row, a prefix; 0: every key) -> [B * Lq, H * hd] in
    q's dtype. One launch, or two with a key split (`split`, default by the SM count). No host
    synchronization."""
    H, hd = q.shape[1], q.shape[2]
    B = q.shape[0] // Lq
    assert q.shape[0] == B * Lq and k.shape == (B * Lk, H, hd) and v.shape == k.shape, "shapes"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "unit inner strides"
    assert q.dtype == k.dtype == v.dtype and klen.shape == (B,) and klen.dtype == torch.int32
    out = torch.empty(B * Lq, H * hd, dtype=q.dtype, device=q.device)
    if B * Lq == 0:
        return out
    qblocks = triton.cdiv(Lq, BLOCK_M)
    kblocks = triton.cdiv(Lk, BLOCK_N)
    S = split or splits_for(qblocks * B * H, kblocks, _sm_count(q.device))
    chunk = triton.cdiv(kblocks, S) * BLOCK_N
    block_d = max(16, triton.next_power_of_2(hd))
    if S > 1:
        po = torch.empty(S, B * H, Lq, hd, dtype=torch.float32, device=q.device)
        pm = torch.empty(S, B * H, Lq, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = out
    _attention_kernel[(qblocks, B * H, S)](
        q, k, v, klen, out, po, pm, pl, Lq, Lk, chunk, float(hd) ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), H=H, HD=hd, SPLIT=S, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        DOT_PRECISION=_precision(q.dtype), num_warps=4, num_stages=2,
        **pdl.launch_options(q.device),
    )  # fmt: skip
    if S > 1:
        _attention_merge_kernel[(qblocks, B * H)](
            po, pm, pl, out, Lq, B * H, out.stride(0), H=H, HD=hd, SPLIT=S, BLOCK_M=BLOCK_M,
            BLOCK_D=block_d, num_warps=4,
            **pdl.launch_options(q.device),
        )  # fmt: skip
    return out


def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, klen: Tensor, Lq: int, Lk: int, split: int | None = None
) -> Tensor:
    """Pure-torch reference with the launcher's signature: SDPA with the additive key mask."""
    from .length_masks import prefix_mask_and_bias

    H, hd = q.shape[1], q.shape[2]
    B = q.shape[0] // Lq
    bias = prefix_mask_and_bias(klen, Lk, q.dtype)[1][:, None, None, :]
    qt, kt, vt = (t.reshape(B, -1, H, hd).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias)
    return o.transpose(1, 2).reshape(B * Lq, H * hd)


def aot_specs() -> list:
    """bf16, fp16 and fp32 at head size 64 (yan-paper) and 32, unsplit and split 2 / 8 (the
    merge at each) (see `yan_kernels.aot`)."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, klen_ptr="*i32", o_ptr=t, po_ptr="*fp32",
                   pm_ptr="*fp32", pl_ptr="*fp32", Lq="i32", Lk="i32", chunk="i32",
                   scale="fp32", stride_qt="i32", stride_qh="i32", stride_kt="i32",
                   stride_kh="i32", stride_vt="i32", stride_vh="i32", stride_ot="i32")  # fmt: skip
        msig = dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", o_ptr=t, Lq="i32", BH="i32",
                    stride_ot="i32")  # fmt: skip
        for hd, H in ((64, 8), (32, 4)):
            for split in (1, 2, 8):
                specs.append(AotSpec(
                    "_attention_kernel", sig,
                    dict(H=H, HD=hd, SPLIT=split, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=hd,
                         DOT_PRECISION=_precision(dtype)),
                    4, 2, label=f"{t[1:]} heads={H}x{hd} split={split}",
                    aligned=("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                             "stride_vh", "stride_ot"),
                ))  # fmt: skip
                if split > 1:
                    specs.append(AotSpec(
                        "_attention_merge_kernel", msig,
                        dict(H=H, HD=hd, SPLIT=split, BLOCK_M=BLOCK_M, BLOCK_D=hd), 4, 1,
                        label=f"{t[1:]} heads={H}x{hd} split={split}", aligned=("stride_ot",),
                    ))  # fmt: skip
    return with_pdl(specs)
