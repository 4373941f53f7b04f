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

from . import pdl
from .gdc import grid_dependency


@triton.jit(do_not_specialize=["L"])
def _decode_attention_kernel(
    qkv_ptr,  # [B, 3 * H * HD]: q, then k, then v, each head-major
    kc_ptr,  # [B, H, >= L, HD] the key cache (written at `slot`)
    vc_ptr,  # [B, H, >= L, HD] the value cache
    valid_ptr,  # [B, >= L] bool: which slots row b attends to
    slot_ptr,  # [1] int64: the slot of this step's key and value
    out_ptr,  # [B, H * HD]
    L,
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
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HD
    row = qkv_ptr + b * stride_qb + h * HD + dims
    q = tl.load(row, mask=d_ok, other=0.0).to(tl.float32)
    k_new = tl.load(row + H * HD, mask=d_ok, other=0.0)
    v_new = tl.load(row + 2 * H * HD, mask=d_ok, other=0.0)
    slot = tl.load(slot_ptr)
    k_base = kc_ptr + b * stride_kb + h * stride_kh
    v_base = vc_ptr + b * stride_vb + h * stride_vh
    tl.store(k_base + slot * stride_kl + dims, k_new, mask=d_ok)
    tl.store(v_base + slot * stride_vl + dims, v_new, mask=d_ok)
    m_i = tl.full((), -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives no NaN
    l_i = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
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
    out = acc / l_i
    tl.store(out_ptr + b * stride_ob + h * HD + dims, out.to(out_ptr.dtype.element_ty), mask=d_ok)


BLOCK_L = 64


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 64 else 8


def decode_attention(
    qkv: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor, slot: Tensor, n_head: int
) -> Tensor:
    """Triton launcher: qkv [B, 3 * d] (q, k, v, each [H, hd] head-major), caches [B, H, >= L,
    hd] (any strides with unit inner stride; this step's k and v are written at `slot`),
    valid [B, L] bool (L: the slots attended; `slot` must be among the valid ones), slot [1]
    long on the device -> [B, d] in qkv's dtype. One launch, no host synchronization."""
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
    if B == 0:
        return out
    block_d = triton.next_power_of_2(hd)
    _decode_attention_kernel[(B, n_head)](
        qkv, k_cache, v_cache, valid, slot, out, L, float(hd) ** -0.5,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), valid.stride(0), out.stride(0),
        H=n_head, HD=hd, BLOCK_L=BLOCK_L, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        **pdl.launch_options(qkv.device),
    )  # fmt: skip
    return out


def decode_attention_ref(
    qkv: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor, slot: Tensor, n_head: int
) -> Tensor:
    """Pure-torch reference with the launcher's signature: the cache writes (`index_copy_`)
    and SDPA with an additive mask over the first L slots."""
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
    64 (GPT-2) and 128 (BLOCK_D is the next power of two of the head size); each without and
    (for sm_90 only) with programmatic dependent launch."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(qkv_ptr=t, kc_ptr=t, vc_ptr=t, valid_ptr="*i1", slot_ptr="*i64", out_ptr=t,
                   L="i32", scale="fp32")  # fmt: skip
        sig.update({a: "i32" for a in ("stride_qb", "stride_kb", "stride_kh", "stride_kl",
                                       "stride_vb", "stride_vh", "stride_vl", "stride_mb",
                                       "stride_ob")})  # fmt: skip
        for hd, H in ((64, 12), (128, 8)):
            specs.append(AotSpec(
                "_decode_attention_kernel", sig,
                dict(H=H, HD=hd, BLOCK_L=BLOCK_L, BLOCK_D=hd), _num_warps(hd), 1,
                label=f"{t[1:]} heads={H} head size={hd}",
            ))  # fmt: skip
    return with_pdl(specs)
