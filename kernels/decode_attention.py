"""One decode step's attention over a static KV cache, with the new key and value written in.

An autoregressive decode step at batch 1 attends one query per head over the cache. Eager
torch spends three launches a layer on it beyond the attention itself: the new key and the new
value each copied into the cache slot (`index_copy_`), and an additive mask built from the
valid slots (once per step). This kernel does the whole of it in one launch per layer:

    k[b, h, slot] = k_new;  v[b, h, slot] = v_new
    out[b, h]     = softmax(q k^T * scale, over the valid slots of row b) v

reading q, k_new and v_new straight out of the fused QKV projection's row ([B, 3 * H * hd], the
layout GPT-2's `c_attn` produces) and writing the output as [B, H * hd], the layout the output
projection reads. One program per (row, head) streams the cache in BLOCK_L slots at a time with
an online softmax in fp32 (running max and sum, the accumulator rescaled per block). The slot
being written is taken from registers, not read back from the cache, so the result does not
depend on when the store lands. `slot` is a device tensor (one element): a CUDA graph captures
the step once and replays it at every slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import attention, pdl
from .device import sm_count
from .gdc import grid_dependency


@triton.jit(do_not_specialize=["L", "CHUNK"])
def _decode_attention_kernel(
    qkv_ptr,  # [B, 3 * H * HD]: q, then k, then v, each head-major
    kc_ptr,  # [B, H, >= L, HD] the key cache (written at `slot`)
    vc_ptr,  # [B, H, >= L, HD] the value cache
    valid_ptr,  # [B, >= L] bool: which slots row b attends to
    slot_ptr,  # [1] int64: the slot of this step's key and value
    out_ptr,  # [B, H * HD]
    part_m_ptr,  # [B * H, splits] fp32 (SPLIT): each split's running max
    part_l_ptr,  # [B * H, splits] fp32 (SPLIT): each split's sum of exp(s - max)
    part_acc_ptr,  # [B * H, splits, BLOCK_D] fp32 (SPLIT): each split's unnormalized output
    count_ptr,  # [>= B * H] int32 (SPLIT): splits of (row, head) arrived, zero between launches
    L,
    CHUNK,  # slots per split, a multiple of BLOCK_L
    scale,
    stride_qb,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_mb,
    stride_ob,
    H: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,  # the slots are split over the grid's third dimension
    BLOCK_S: tl.constexpr,  # a power of two >= the splits (SPLIT)
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HD
    row = qkv_ptr + b * stride_qb + h * HD + dims
    q = tl.load(row, mask=d_ok, other=0.0).to(tl.float32)
    k_new = tl.load(row + H * HD, mask=d_ok, other=0.0)
    v_new = tl.load(row + 2 * H * HD, mask=d_ok, other=0.0)
    slot = tl.load(slot_ptr)
    k_base = kc_ptr + b * stride_kb + h * stride_kh
    v_base = vc_ptr + b * stride_vb + h * stride_vh
    if sp == 0:  # one split writes the slot; every split reads it from registers
        tl.store(k_base + slot * stride_kl + dims, k_new, mask=d_ok)
        tl.store(v_base + slot * stride_vl + dims, v_new, mask=d_ok)
    m_i = tl.full((), -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives no NaN
    l_i = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for l0 in range(lo, hi, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < hi
        keep = tl.load(valid_ptr + b * stride_mb + ls, mask=l_ok, other=0) != 0
        tile = l_ok[:, None] & d_ok[None, :]
        here = (ls == slot)[:, None]
        k = tl.load(k_base + ls[:, None] * stride_kl + dims[None, :], mask=tile, other=0.0)
        k = tl.where(here, k_new[None, :], k).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + ls[:, None] * stride_vl + dims[None, :], mask=tile, other=0.0)
        v = tl.where(here, v_new[None, :], v).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out_row = out_ptr + b * stride_ob + h * HD + dims
    if SPLIT:
        splits = tl.num_programs(2)
        bh = b * H + h
        part = bh * splits + sp
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
        tl.store(part_acc_ptr + part * BLOCK_D + dims, acc)
        # release: this split's partials are visible to the last arrival; acquire: the last
        # arrival sees every split's (as `greedy_select`)
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            ss = tl.arange(0, BLOCK_S)
            s_ok = ss < splits
            parts = bh * splits + ss
            ms = tl.load(part_m_ptr + parts, mask=s_ok, other=-1.0e30, cache_modifier=".cg")
            lsum = tl.load(part_l_ptr + parts, mask=s_ok, other=0.0, cache_modifier=".cg")
            accs = tl.load(part_acc_ptr + parts[:, None] * BLOCK_D + dims[None, :],
                           mask=s_ok[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
            top = tl.max(ms, axis=0)
            w = tl.where(s_ok, tl.exp(ms - top), 0.0)
            out = tl.sum(w[:, None] * accs, axis=0) / tl.sum(w * lsum, axis=0)
            tl.store(out_row, out.to(out_ptr.dtype.element_ty), mask=d_ok)
            tl.store(count_ptr + bh, 0)
    else:
        out = acc / l_i
        tl.store(out_row, out.to(out_ptr.dtype.element_ty), mask=d_ok)


BLOCK_L = 64
MAX_SPLITS = 32
STAGES = 3  # the GPU default, named so that the AOT specs compile what the launcher runs


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 64 else 8


def decode_attention(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    slot: Tensor,
    n_head: int,
    counts: Tensor | None = None,
    splits: int | None = None,
) -> Tensor:
    """Triton launcher: qkv [B, 3 * d] (q, k, v, each [H, hd] head-major), caches [B, H, >= L,
    hd] (any strides with unit inner stride; this step's k and v are written at `slot`),
    valid [B, L] bool (L: the slots attended; `slot` must be among the valid ones), slot [1]
    long on the device -> [B, d] in qkv's dtype. `splits`: slot ranges per (row, head), each
    its own program (default `default_splits`); with more than one, `counts` [>= B * H] int32
    zeros are the arrival counters, left at zero (None: a fresh buffer, one memset more). One
    launch, no host synchronization."""
    B, three_d = qkv.shape
    d = three_d // 3
    hd = d // n_head
    L = valid.shape[1]
    assert three_d == 3 * n_head * hd, f"qkv must be [B, 3 * {n_head} * head size]"
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert c.shape[:2] == (B, n_head) and c.shape[2] >= L and c.shape[3] == hd, (
            f"{name} must be [{B}, {n_head}, >= {L}, {hd}], got {list(c.shape)}"
        )
        assert c.stride(3) == 1 and c.dtype == qkv.dtype, f"{name}: unit inner stride, qkv's dtype"
    assert valid.dtype == torch.bool and valid.shape[0] == B and valid.stride(1) == 1
    assert slot.numel() == 1 and slot.dtype == torch.long
    assert qkv.stride(1) == 1, "qkv rows must be contiguous"
    out = torch.empty((B, d), dtype=qkv.dtype, device=qkv.device)
    if B == 0 or L == 0:
        return out
    block_d = triton.next_power_of_2(hd)
    blocks = triton.cdiv(L, BLOCK_L)
    want = splits if splits is not None else default_splits(B * n_head, blocks, qkv.device)
    chunk = triton.cdiv(blocks, max(1, min(want, blocks, MAX_SPLITS))) * BLOCK_L
    n_split = triton.cdiv(L, chunk)  # no split without slots
    f32 = dict(dtype=torch.float32, device=qkv.device)
    if n_split > 1:
        part_m, part_l = torch.empty((2, B * n_head, n_split), **f32)
        part_acc = torch.empty((B * n_head, n_split, block_d), **f32)
        if counts is None:
            counts = torch.zeros(B * n_head, dtype=torch.int32, device=qkv.device)
        assert counts.dtype == torch.int32 and counts.is_contiguous(), "counts: int32 zeros"
        assert counts.shape[0] >= B * n_head, f"counts: at least {B * n_head} (rows x heads)"
    else:
        part_m = part_l = part_acc = out
        counts = slot  # not read without a split
    _decode_attention_kernel[(B, n_head, n_split)](
        qkv, k_cache, v_cache, valid, slot, out, part_m, part_l, part_acc, counts, L, chunk,
        float(hd) ** -0.5,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), valid.stride(0), out.stride(0),
        H=n_head, HD=hd, BLOCK_L=BLOCK_L, BLOCK_D=block_d, SPLIT=n_split > 1,
        BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=_num_warps(block_d),
        num_stages=STAGES, **pdl.launch_options(qkv.device),
    )  # fmt: skip
    return out


def default_splits(programs: int, blocks: int, device: torch.device) -> int:
    """Slot ranges per (row, head): enough for ~2 programs per SM on CUDA (GPT-2's 12 heads at
    batch 1 would otherwise use 12 of 132 SMs, each walking the whole cache), never more than
    the cache's BLOCK_L blocks or `MAX_SPLITS`; one off CUDA."""
    if device.type != "cuda":
        return 1
    return splits_for(programs, blocks, sm_count(device))


def splits_for(programs: int, blocks: int, sms: int) -> int:
    """~2 programs per SM: `programs` (rows x heads) each split into at most `blocks` ranges
    and `MAX_SPLITS` (the split-key attention's rule, with this kernel's cap)."""
    return attention.splits_for(programs, blocks, sms, most=MAX_SPLITS)


def decode_attention_ref(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    slot: Tensor,
    n_head: int,
    counts: Tensor | None = None,
    splits: int | None = None,
) -> Tensor:
    """Pure-torch reference with the launcher's signature: the cache writes (`index_copy_`)
    and SDPA with an additive mask over the first L slots (`counts` and `splits`, the kernel's
    work division, do not apply)."""
    B = qkv.shape[0]
    d = qkv.shape[1] // 3
    L = valid.shape[1]
    q, k, v = qkv.view(B, 3, n_head, 1, d // n_head).unbind(1)
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    mask = torch.zeros(valid.shape, dtype=qkv.dtype, device=qkv.device).masked_fill_(
        ~valid, float("-inf")
    )[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k_cache[:, :, :L], v_cache[:, :, :L], mask)
    return o.reshape(B, d)


def aot_specs() -> list:
    """The launcher's configurations (see `yan_kernels.aot`): bf16, fp16 and fp32, head sizes
    64 (GPT-2) and 128, and in bf16 and fp32 also 32 (ar-tiny) and 12 (BLOCK_D is the next
    power of two of the head size), one program per
    (row, head) and the slots split over 2 to `MAX_SPLITS` programs; each without and (for
    sm_90 only) with programmatic dependent launch."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(qkv_ptr=t, kc_ptr=t, vc_ptr=t, valid_ptr="*i1", slot_ptr="*i64", out_ptr=t,
                   L="i32", CHUNK="i32", scale="fp32")  # fmt: skip
        sig.update({a: "i32" for a in ("stride_qb", "stride_kb", "stride_kh", "stride_kl",
                                       "stride_vb", "stride_vh", "stride_vl", "stride_mb",
                                       "stride_ob")})  # fmt: skip
        # unsplit: the partial buffers are `out` and the counter `slot` (never read)
        whole = dict(part_m_ptr=t, part_l_ptr=t, part_acc_ptr=t, count_ptr="*i64")
        split = dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32",
                     count_ptr="*i32")  # fmt: skip
        # GPT-2 (64 x 12), a 128-wide head; ar-tiny's 32 x 6 and the GPU tests' 12 x 4 (a head
        # size that is not a power of two: BLOCK_D 16 masks it) in bf16 and fp32
        shapes = [(64, 12), (128, 8)]
        if dtype != torch.float16:
            shapes += [(32, 6), (12, 4)]
        for hd, H in shapes:
            layouts = [(whole, False, 2)] + [(split, True, 2**i) for i in range(1, 6)]
            block_d = triton.next_power_of_2(hd)
            for parts, is_split, block_s in layouts:
                specs.append(AotSpec(
                    "_decode_attention_kernel", {**sig, **parts},
                    dict(H=H, HD=hd, BLOCK_L=BLOCK_L, BLOCK_D=block_d, SPLIT=is_split,
                         BLOCK_S=block_s), _num_warps(block_d), STAGES,
                    label=f"{t[1:]} heads={H} head size={hd}"
                          + (f" splits<={block_s}" if is_split else ""),
                ))  # fmt: skip
    return with_pdl(specs)
