"""The end of a greedy decode step in one launch: token choice, its probability and stopping.

After the output projection, an eager greedy decode step runs a dozen small operators per token:
log-softmax, argmax, gather and exp for the chosen token's probability, two cache-column
writes, and the stopping logic (EOS unless the row ignores it, or the row's budget spent). At
batch 1 each is a launch of a few microseconds. Here one launch does all of it:

    tok         = argmax(logits)            p = softmax(logits)[tok]
    out_tok[col] = tok,  out_p[col] = p     (col: the step's column, slot + 1)
    hit   = not done and stop_eos and tok == eos
    left -= not done and not hit
    done  = done or hit or left <= 0
    pos  += 1

A row's logits are split into BLOCK_V-wide chunks, one program each (grid [B, chunks]: a
128,258-token vocabulary is 32 programs per row, where one program streaming the whole row
would leave every other SM idle at batch 1 and pay 32 dependent DRAM round trips). Each program
reduces its chunk to a partial (max, sum of exp(x - max), first index of the max) in fp32 and
stores it, then counts itself in on the row's arrival counter (an atomic add with acquire-
release order); the program that arrives last combines the row's partials (the first index
among the chunks holding the overall maximum, as `torch.argmax` keeps the first maximum; the
sums rescaled to it), does the row's bookkeeping and sets the counter back to zero for the
next step. The counters are the caller's (`counts`, zero between launches, kept with the
decoding state so a captured graph needs no memset); the partials live in a buffer the launcher
allocates (a CUDA graph keeps it in its pool).

`slot` is read from the device (a captured graph replays the step at every slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .gdc import grid_dependency


@triton.jit(do_not_specialize=["V"])
def _greedy_select_kernel(
    logits_ptr,  # [B, V]
    out_tok_ptr,  # [>= B, cols] int64
    out_p_ptr,  # [>= B, cols] fp32
    slot_ptr,  # [1] int64: the step writes column slot + 1
    done_ptr,  # [>= B] bool
    left_ptr,  # [>= B] int64
    stop_eos_ptr,  # [>= B] bool
    eos_ptr,  # [1] int64
    tok_ptr,  # [>= B] int64
    pos_ptr,  # [>= B] int64
    part_m_ptr,  # [B, chunks] fp32: each chunk's max
    part_s_ptr,  # [B, chunks] fp32: each chunk's sum of exp(x - max)
    part_i_ptr,  # [B, chunks] int64: each chunk's first index of its max
    count_ptr,  # [>= B] int32: programs of the row arrived (zero between launches)
    V,
    stride_lb,
    stride_tb,
    stride_pb,
    BLOCK_C: tl.constexpr,  # a power of two >= the chunks, cdiv(V, BLOCK_V) (the grid's dim 1)
    BLOCK_V: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    chunks = tl.num_programs(1)
    vs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(logits_ptr + b * stride_lb + vs, mask=vs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    arg = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64) + c * BLOCK_V
    total = tl.sum(tl.exp(x - m), axis=0)
    part = b * chunks + c
    tl.store(part_m_ptr + part, m)
    tl.store(part_s_ptr + part, total)
    tl.store(part_i_ptr + part, arg)
    # release: the partials above are visible to whoever arrives last; acquire: the last one
    # sees every other chunk's
    arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")
    if arrived == chunks - 1:
        cs = tl.arange(0, BLOCK_C)
        c_ok = cs < chunks
        row = b * chunks + cs
        # .cg: from L2, never a line this SM cached at an earlier step
        ms = tl.load(part_m_ptr + row, mask=c_ok, other=float("-inf"), cache_modifier=".cg")
        ss = tl.load(part_s_ptr + row, mask=c_ok, other=0.0, cache_modifier=".cg")
        idx = tl.load(part_i_ptr + row, mask=c_ok, other=0, cache_modifier=".cg")
        top = tl.max(ms, axis=0)
        best = tl.min(tl.where(c_ok & (ms == top), idx, V), axis=0)  # the first maximum
        scaled = tl.where(c_ok & (ms > float("-inf")), ss * tl.exp(ms - top), 0.0)
        p = 1.0 / tl.sum(scaled, axis=0)  # exp(max - max) / sum exp(x - max)
        col = tl.load(slot_ptr) + 1
        tl.store(out_tok_ptr + b * stride_tb + col, best)
        tl.store(out_p_ptr + b * stride_pb + col, p)
        done = tl.load(done_ptr + b).to(tl.int32) != 0
        stops = tl.load(stop_eos_ptr + b).to(tl.int32) != 0
        hit = (done == 0) & stops & (best == tl.load(eos_ptr))
        left = tl.load(left_ptr + b) - tl.where(done | hit, 0, 1).to(tl.int64)
        tl.store(left_ptr + b, left)
        tl.store(done_ptr + b, (done | hit | (left <= 0)).to(tl.int1))
        tl.store(tok_ptr + b, best)
        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)
        tl.store(count_ptr + b, 0)


BLOCK_V = 4096
BLOCK_CS = (2, 4, 8, 16, 32, 64)  # the chunk blocks the launcher can pick
MAX_V = BLOCK_CS[-1] * BLOCK_V  # 262,144 tokens


def greedy_select(
    logits: Tensor,
    out_tok: Tensor,
    out_p: Tensor,
    slot: Tensor,
    done: Tensor,
    left: Tensor,
    stop_eos: Tensor,
    eos: Tensor,
    tok: Tensor,
    pos: Tensor,
    counts: Tensor | None = None,
) -> None:
    """Triton launcher: logits [B, V]; the decoding state, each with at least B rows (updated in
    place, see the module docstring): out_tok [., cols] long, out_p [., cols] fp32, done bool,
    left long, stop_eos bool, tok long, pos long; slot and eos [1] long; `counts` [>= B] int32
    zeros, the rows' arrival counters, left at zero (None: a fresh buffer, one memset more).
    One launch, no host synchronization."""
    B, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert out_tok.dtype == torch.long and out_p.dtype == torch.float32
    assert out_tok.stride(1) == 1 and out_p.stride(1) == 1
    for name, t, dt in (("done", done, torch.bool), ("left", left, torch.long),
                        ("stop_eos", stop_eos, torch.bool), ("tok", tok, torch.long),
                        ("pos", pos, torch.long)):  # fmt: skip
        assert t.dtype == dt and t.shape[0] >= B and t.is_contiguous(), f"{name}: {dt}, >= {B}"
    if counts is None:
        counts = torch.zeros(B, dtype=torch.int32, device=logits.device)
    assert counts.dtype == torch.int32 and counts.shape[0] >= B and counts.is_contiguous(), (
        f"counts: int32 zeros, >= {B}"
    )
    assert 0 < V <= MAX_V, f"a vocabulary of 1 to {MAX_V} tokens, got {V}"
    if B == 0:
        return
    chunks = triton.cdiv(V, BLOCK_V)
    part_m, part_s = torch.empty((2, B, chunks), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((B, chunks), dtype=torch.long, device=logits.device)
    _greedy_select_kernel[(B, chunks)](
        logits, out_tok, out_p, slot, done, left, stop_eos, eos, tok, pos, part_m, part_s,
        part_i, counts, V, logits.stride(0), out_tok.stride(0), out_p.stride(0),
        BLOCK_C=block_chunks(V), BLOCK_V=BLOCK_V, num_warps=8, num_stages=1,
        **pdl.launch_options(logits.device),
    )  # fmt: skip


def block_chunks(V: int) -> int:
    """The kernel's BLOCK_C for a vocabulary of V: a power of two, at least 2, >= its chunks."""
    return max(2, triton.next_power_of_2(triton.cdiv(V, BLOCK_V)))


def greedy_select_ref(
    logits: Tensor,
    out_tok: Tensor,
    out_p: Tensor,
    slot: Tensor,
    done: Tensor,
    left: Tensor,
    stop_eos: Tensor,
    eos: Tensor,
    tok: Tensor,
    pos: Tensor,
    counts: Tensor | None = None,
) -> None:
    """Pure-torch reference with the launcher's signature (the eager step's ops; `counts`, the
    kernel's scratch, is left as it is)."""
    n = logits.shape[0]
    logp = torch.log_softmax(logits.float(), -1)
    nxt = logp.argmax(-1)
    col = slot + 1
    out_tok[:n].index_copy_(1, col, nxt[:, None])
    out_p[:n].index_copy_(1, col, logp.gather(-1, nxt[:, None]).exp())
    d, rest = done[:n], left[:n]
    hit = ~d & stop_eos[:n] & (nxt == eos)
    rest.sub_((~d & ~hit).long())
    d.logical_or_(hit | (rest <= 0))
    tok[:n].copy_(nxt)
    pos[:n].add_(1)


def aot_specs() -> list:
    """The launcher's configurations: each logits dtype and chunk block (a vocabulary of up to
    `MAX_V`), without and (for sm_90 only) with programmatic dependent launch (see
    `yan_kernels.aot`)."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(logits_ptr=t, out_tok_ptr="*i64", out_p_ptr="*fp32", slot_ptr="*i64",
                   done_ptr="*i1", left_ptr="*i64", stop_eos_ptr="*i1", eos_ptr="*i64",
                   tok_ptr="*i64", pos_ptr="*i64", V="i32", stride_lb="i32", stride_tb="i32",
                   stride_pb="i32")  # fmt: skip
        sig.update(part_m_ptr="*fp32", part_s_ptr="*fp32", part_i_ptr="*i64", count_ptr="*i32")
        for block_c in BLOCK_CS:
            specs.append(AotSpec(
                "_greedy_select_kernel", sig, dict(BLOCK_C=block_c, BLOCK_V=BLOCK_V), 8, 1,
                label=f"{t[1:]} logits chunks<={block_c}",
            ))  # fmt: skip
    return with_pdl(specs)
