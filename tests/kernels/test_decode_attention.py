"""The decode-step attention kernel (cache writes + attention over the valid slots) against its
pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_decode_attention.py
(no CUDA: the Triton interpreter, fp32 and fp16; the GPU test runs GPT-2's shape in bf16).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.tolerances import TOL

pytest.importorskip("triton")

from yan_kernels import ops
from yan_kernels.decode_attention import (
    BLOCK_L,
    MAX_SPLITS,
    decode_attention,
    decode_attention_ref,
    splits_for,
)


def _problem(B, H, hd, L, cache_len, slot, device, dtype, seed=0):
    """A QKV row per batch row, caches longer than the window (strided views into a larger
    buffer), and valid masks of different lengths with holes (left padding), the slot valid."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 3 * H * hd, generator=g).to(device, dtype)
    big = torch.randn(2, B + 1, H, cache_len, hd, generator=g).to(device, dtype)
    kc, vc = big[0, 1:], big[1, 1:]  # row stride of the full buffer, a window of B rows
    valid = torch.rand(B, L, generator=g) > 0.3
    valid[:, slot] = True
    valid[0, :slot] = False  # row 0: only the new slot is valid
    return qkv, kc, vc, valid.to(device), torch.tensor([slot], device=device)


def _run(fn, qkv, kc, vc, valid, slot, H):
    kc2, vc2 = kc.clone(), vc.clone()
    return fn(qkv, kc2, vc2, valid, slot, H), kc2, vc2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,H,hd,L,cache_len,slot",
    [(1, 4, 16, 1, 8, 0), (3, 2, 24, 70, 90, 69), (2, 3, 64, 130, 130, 5), (5, 1, 8, 64, 64, 63)],
)
def test_matches_the_reference(device, dtype, B, H, hd, L, cache_len, slot) -> None:
    """A one-slot window, windows that cut the slot block mid-way and span three of them, a
    head size that is not a power of two, the slot at the start, middle and end; the caches
    are written at the slot and nowhere else."""
    qkv, kc, vc, valid, s = _problem(B, H, hd, L, cache_len, slot, device, dtype)
    got, kg, vg = _run(decode_attention, qkv, kc, vc, valid, s, H)
    want, kw, vw = _run(decode_attention_ref, qkv, kc, vc, valid, s, H)
    assert got.shape == (B, H * hd) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    assert torch.equal(kg, kw) and torch.equal(vg, vw)
    untouched = torch.ones(cache_len, dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(kg[:, :, untouched], kc[:, :, untouched])


@pytest.mark.parametrize("splits", [2, 3, MAX_SPLITS])
@pytest.mark.parametrize(
    "B,H,hd,L,slot", [(1, 2, 16, 3 * BLOCK_L + 5, 190), (3, 2, 24, 2 * BLOCK_L, 0), (2, 1, 8, 9, 4)]
)
def test_split_slots_merge_to_the_reference(device, splits, B, H, hd, L, slot) -> None:
    """The slots split over several programs per (row, head) (fewer when the window has fewer
    blocks, none empty), the last arrival merging the partials: the reference's output, the
    caches written once at the slot, and the arrival counters back at zero, twice in a row
    through the same counters. Row 0 attends to the new slot alone, so most of its splits see
    no valid slot at all."""
    counts = torch.zeros(B * H + 3, dtype=torch.int32, device=device)
    for seed in range(2):
        qkv, kc, vc, valid, s = _problem(B, H, hd, L, L + 4, slot, device, torch.float32, seed)
        got, kg, vg = _run(lambda *a: decode_attention(*a, counts=counts, splits=splits),
                           qkv, kc, vc, valid, s, H)  # fmt: skip
        want, kw, vw = _run(decode_attention_ref, qkv, kc, vc, valid, s, H)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        assert torch.equal(kg, kw) and torch.equal(vg, vw)
        assert counts.tolist() == [0] * (B * H + 3), seed


def test_default_splits_fill_the_gpu_not_more() -> None:
    assert splits_for(12, 16, 132) == 16  # GPT-2 at batch 1 over 1,024 slots: 192 programs
    assert splits_for(12, 4, 132) == 4  # a short window: one split per block
    assert splits_for(12 * 64, 16, 132) == 1  # batch 64 fills the GPU already
    assert splits_for(1, 1000, 132) == MAX_SPLITS


def test_masked_slots_do_not_count(device) -> None:
    """Changing the cache at slots a row does not attend to changes nothing for that row."""
    qkv, kc, vc, valid, s = _problem(2, 2, 16, 40, 40, 10, device, torch.float32, seed=1)
    a, _, _ = _run(decode_attention, qkv, kc, vc, valid, s, 2)
    kc2, vc2 = kc.clone(), vc.clone()
    hidden = ~valid[:, None, :, None].expand_as(kc2)
    kc2[hidden] = 1e4
    vc2[hidden] = -1e4
    b, _, _ = _run(decode_attention, qkv, kc2, vc2, valid, s, 2)
    torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_facade_and_bad_arguments(device) -> None:
    qkv, kc, vc, valid, s = _problem(2, 2, 16, 12, 12, 3, device, torch.float32)
    with ops.force("triton"):
        fused = ops.decode_attention(qkv, kc.clone(), vc.clone(), valid, s, 2)
    with ops.force("ref"):
        ref = ops.decode_attention(qkv, kc.clone(), vc.clone(), valid, s, 2)
    torch.testing.assert_close(fused, ref, **TOL[torch.float32])
    with pytest.raises(AssertionError, match="k_cache must be"):
        decode_attention(qkv, kc[:, :1], vc, valid, s, 2)
    with pytest.raises(AssertionError, match="qkv must be"):
        decode_attention(qkv[:, :-1], kc, vc, valid, s, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B,L", [(1, 1024), (64, 591)])
def test_gpt2_shape_on_gpu(B, L) -> None:
    """GPT-2's 12 heads of 64 in bf16, at batch 1 and 64 over long windows."""
    qkv, kc, vc, valid, s = _problem(B, 12, 64, L, L, L // 2, torch.device("cuda"), torch.bfloat16)
    got, kg, _ = _run(decode_attention, qkv, kc, vc, valid, s, 12)
    want, kw, _ = _run(decode_attention_ref, qkv, kc, vc, valid, s, 12)
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])
    assert torch.equal(kg, kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_step_replays_from_a_graph_on_gpu() -> None:
    """GPT-2's shape at batch 1 over 1,024 slots (the default split: 16 programs per head),
    captured once with the caller's counters and replayed at 50 slots: each replay equals the
    reference, the counters return to zero."""
    dev = torch.device("cuda")
    qkv, kc, vc, valid, s = _problem(1, 12, 64, 1024, 1024, 0, dev, torch.bfloat16)
    valid[:] = True
    counts = torch.zeros(12, dtype=torch.int32, device=dev)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    decode_attention(qkv, kc, vc, valid, s, 12, counts=counts)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(qkv, kc, vc, valid, s, 12, counts=counts)
    g = torch.Generator(device=dev).manual_seed(0)
    for i in range(50):
        qkv.copy_(torch.randn(qkv.shape, device=dev, generator=g))
        s.fill_(20 * i)
        graph.replay()
        want = decode_attention_ref(qkv, kc_ref, vc_ref, valid, s, 12)
        torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16])
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), i
    assert counts.tolist() == [0] * 12
