"""The MoE gate and the routing choice in one launch.

YAN freezes each token's expert at t = 0: the gate, a two-layer MLP over the trunk's output and
the pooled source, gives every token a distribution over the K experts, and routing takes its
mode ("argmax") or an inverse-CDF draw from the token's own uniform ("sample"). In torch ops
that is a GEMM, the per-row source term added, a GELU pass, a second GEMM, the temperature,
a softmax and the choice: seven to ten small launches per sample. Here one program owns
BLOCK_M tokens and computes, for its tokens,

    hid    = gelu(h @ W1.T + row[batch of the token])      (row: the pooled-source and time terms)
    logits = (hid @ W2.T + b2) / temperature               (K experts, padded to BLOCK_K)
    probs  = softmax(logits)                               (fp32)
    expert = argmax(probs)  or  #{k < K - 1 : u >= cdf_k}  (the first maximum; inverse CDF)

sweeping the hidden width in BLOCK_G slices, each slice's GELU output fed straight into the
second GEMM, so the [tokens, hidden] activation never leaves registers. `hid` is rounded to the
weights' dtype before the second GEMM, as the unfused layer's output is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .gdc import grid_dependency

_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit(do_not_specialize=["N"])
def _gate_route_kernel(
    h_ptr,  # [N, D]
    row_ptr,  # [B, G]: each batch row's term (source pooling, time, bias)
    w1_ptr,  # [G, D]
    w2_ptr,  # [K, G]
    b2_ptr,  # [K]
    u_ptr,  # [N] fp32 (SAMPLE)
    probs_ptr,  # [N, K] fp32
    expert_ptr,  # [N] int64
    N,
    L,  # tokens per batch row: token n is in row n // L
    D,
    G,
    K,
    inv_temp,
    stride_h,
    stride_row,
    stride_w1,
    stride_w2,
    SAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    batch = (rows // L).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    logits = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        g_ok = gs < G
        acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(h_ptr + r64[:, None] * stride_h + ds[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            w = tl.load(w1_ptr + gs[:, None].to(tl.int64) * stride_w1 + ds[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        acc += tl.load(row_ptr + batch[:, None] * stride_row + gs[None, :],
                       mask=row_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        hid = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
        w2t = tl.load(
            w2_ptr + ks[None, :] * stride_w2 + gs[:, None],
            mask=g_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_G, BLOCK_K]
        logits = tl.dot(hid.to(w2t.dtype), w2t, logits, input_precision=DOT_PRECISION)
    logits = logits + tl.load(b2_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(k_ok[None, :], logits * inv_temp, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(probs_ptr + r64[:, None] * K + ks[None, :], probs,
             mask=row_ok[:, None] & k_ok[None, :])  # fmt: skip
    if SAMPLE:
        u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
        cdf = tl.cumsum(probs, axis=1)
        below = (u[:, None] >= cdf) & (ks < K - 1)[None, :]
        expert = tl.sum(below.to(tl.int32), axis=1)
    else:
        expert = tl.argmax(probs, axis=1, tie_break_left=True)
    tl.store(expert_ptr + rows, expert.to(tl.int64), mask=row_ok)


BLOCK_M, BLOCK_G, BLOCK_D = 32, 64, 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gate_route(
    h: Tensor,
    row: Tensor,
    w1: Tensor,
    w2: Tensor,
    b2: Tensor,
    temperature: float,
    routing: str,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton launcher: h [B, L, D], row [B, G] (the hidden layer's per-batch-row term: bias,
    time and pooled source), w1 [G, D] (its token part), w2 [K, G], b2 [K]; `routing`
    "argmax", or "sample" with `uniforms` [B, L] -> (probs [B, L, K] fp32, expert [B, L] long).
    One launch, no host synchronization."""
    B, L, D = h.shape
    G, K = w1.shape[0], w2.shape[0]
    assert row.shape == (B, G) and w1.shape == (G, D) and w2.shape == (K, G) and b2.shape == (K,)
    assert routing in ("argmax", "sample"), f"routing must be argmax or sample, got {routing!r}"
    assert routing == "argmax" or (uniforms is not None and uniforms.shape == (B, L))
    assert len({t.dtype for t in (h, row, w1, w2, b2)}) == 1, "one dtype"
    h2 = h.reshape(B * L, D)
    h2 = h2 if h2.stride(1) == 1 else h2.contiguous()
    w1, w2, row = (t if t.stride(-1) == 1 else t.contiguous() for t in (w1, w2, row))
    N = B * L
    probs = torch.empty(B, L, K, dtype=torch.float32, device=h.device)
    expert = torch.empty(B, L, dtype=torch.long, device=h.device)
    if N == 0:
        return probs, expert
    u = uniforms.reshape(N).float().contiguous() if routing == "sample" else probs
    _gate_route_kernel[(triton.cdiv(N, BLOCK_M),)](
        h2, row, w1, w2, b2, u, probs, expert, N, L, D, G, K, 1.0 / temperature,
        h2.stride(0), row.stride(0), w1.stride(0), w2.stride(0),
        SAMPLE=routing == "sample", BLOCK_M=BLOCK_M, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
        BLOCK_K=max(16, triton.next_power_of_2(K)), DOT_PRECISION=_precision(h.dtype),
        num_warps=4, num_stages=2,
        **pdl.launch_options(h.device),
    )  # fmt: skip
    return probs, expert


def gate_route_ref(
    h: Tensor,
    row: Tensor,
    w1: Tensor,
    w2: Tensor,
    b2: Tensor,
    temperature: float,
    routing: str,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-torch reference with the launcher's signature (the unfused ops; the routing rule
    as `yan_serve.flow.solver.select_experts` states it)."""
    hid = F.linear(h, w1) + row[:, None]
    logits = F.linear(F.gelu(hid), w2, b2) / temperature
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if routing == "argmax":
        return probs, probs.argmax(-1)
    if routing != "sample" or uniforms is None:
        raise ValueError("routing must be 'argmax', or 'sample' with uniforms")
    cdf = probs.cumsum(-1)[..., :-1]
    return probs, (uniforms[..., None].float() >= cdf).sum(-1).clamp_max(probs.shape[-1] - 1)


def aot_specs() -> list:
    """Both routings in bf16 and fp32 (fp16: argmax), at up to 16 experts (see
    `yan_kernels.aot`)."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(h_ptr=t, row_ptr=t, w1_ptr=t, w2_ptr=t, b2_ptr=t, u_ptr="*fp32",
                   probs_ptr="*fp32", expert_ptr="*i64", N="i32", L="i32", D="i32", G="i32",
                   K="i32", inv_temp="fp32", stride_h="i32", stride_row="i32", stride_w1="i32",
                   stride_w2="i32")  # fmt: skip
        for sample in (False, True) if dtype != torch.float16 else (False,):
            specs.append(AotSpec(
                "_gate_route_kernel", sig,
                dict(SAMPLE=sample, BLOCK_M=BLOCK_M, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_K=16,
                     DOT_PRECISION=_precision(dtype)),
                4, 2, label=f"{t[1:]} sample={sample}",
                aligned=("stride_h", "stride_row", "stride_w1", "stride_w2", "D", "G"),
            ))  # fmt: skip
    return with_pdl(specs)
