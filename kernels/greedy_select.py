"""The end of a greedy decode step in one launch: token choice, its probability and stopping.

After the output projection, an eager greedy decode step runs a dozen small operators per token:
log-softmax, argmax, gather and exp for the chosen token's probability, two cache-column
writes, and the stopping logic (EOS unless the row ignores it, or the row's budget spent). At
batch 1 each is a launch of a few microseconds. Here one program per row streams its logits
once (an online max / sum-of-exponentials in fp32, keeping the first index of the maximum, as
`torch.argmax` does) and then does the row's bookkeeping:

    tok         = argmax(logits)            p = softmax(logits)[tok]
    out_tok[col] = tok,  out_p[col] = p     (col: the step's column, slot + 1)
    hit   = not done and stop_eos and tok == eos
    left -= not done and not hit
    done  = done or hit or left <= 0
    pos  += 1

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
    V,
    stride_lb,
    stride_tb,
    stride_pb,
    BLOCK_V: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    b = tl.program_id(0).to(tl.int64)
    row = logits_ptr + b * stride_lb
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), dtype=tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    arg = tl.zeros((), dtype=tl.int64)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + cols
        x = tl.load(row + vs, mask=vs < V, other=float("-inf")).to(tl.float32)
        bm = tl.max(x, axis=0)
        bi = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64) + v0
        new_m = tl.maximum(m, bm)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        arg = tl.where(bm > m, bi, arg)  # strictly larger: the first maximum wins
        m = new_m
    p = 1.0 / s  # exp(max - max) / sum exp(x - max)
    col = tl.load(slot_ptr) + 1
    tl.store(out_tok_ptr + b * stride_tb + col, arg)
    tl.store(out_p_ptr + b * stride_pb + col, p)
    done = tl.load(done_ptr + b).to(tl.int32) != 0
    stops = tl.load(stop_eos_ptr + b).to(tl.int32) != 0
    hit = (done == 0) & stops & (arg == tl.load(eos_ptr))
    left = tl.load(left_ptr + b) - tl.where(done | hit, 0, 1).to(tl.int64)
    tl.store(left_ptr + b, left)
    tl.store(done_ptr + b, (done | hit | (left <= 0)).to(tl.int1))
    tl.store(tok_ptr + b, arg)
    tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)


BLOCK_V = 4096


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
) -> None:
    """Triton launcher: logits [B, V]; the decoding state, each with at least B rows (updated in
    place, see the module docstring): out_tok [., cols] long, out_p [., cols] fp32, done bool,
    left long, stop_eos bool, tok long, pos long; slot and eos [1] long. One launch, no host
    synchronization."""
    B, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert out_tok.dtype == torch.long and out_p.dtype == torch.float32
    assert out_tok.stride(1) == 1 and out_p.stride(1) == 1
    for name, t, dt in (("done", done, torch.bool), ("left", left, torch.long),
                        ("stop_eos", stop_eos, torch.bool), ("tok", tok, torch.long),
                        ("pos", pos, torch.long)):  # fmt: skip
        assert t.dtype == dt and t.shape[0] >= B and t.is_contiguous(), f"{name}: {dt}, >= {B}"
    if B == 0:
        return
    _greedy_select_kernel[(B,)](
        logits, out_tok, out_p, slot, done, left, stop_eos, eos, tok, pos, V,
        logits.stride(0), out_tok.stride(0), out_p.stride(0), BLOCK_V=BLOCK_V, num_warps=8,
        **pdl.launch_options(logits.device),
    )  # fmt: skip


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
) -> None:
    """Pure-torch reference with the launcher's signature (the eager step's ops)."""
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
    """The launcher's one configuration per logits dtype, without and (for sm_90 only) with
    programmatic dependent launch (see `yan_kernels.aot`)."""
    from .aot import TORCH_TO_TRITON, AotSpec

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        sig = dict(logits_ptr=t, out_tok_ptr="*i64", out_p_ptr="*fp32", slot_ptr="*i64",
                   done_ptr="*i1", left_ptr="*i64", stop_eos_ptr="*i1", eos_ptr="*i64",
                   tok_ptr="*i64", pos_ptr="*i64", V="i32", stride_lb="i32", stride_tb="i32",
                   stride_pb="i32")  # fmt: skip
        for on in (False, True):  # PDL: sm_90 only, as the launcher enables it
            specs.append(AotSpec("_greedy_select_kernel", sig, dict(BLOCK_V=BLOCK_V, PDL=on), 8,
                                 1, label=f"{t[1:]} logits" + (" pdl" if on else ""),
                                 archs=pdl.ARCHS if on else None))  # fmt: skip
    return specs
