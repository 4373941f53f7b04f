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
from yan_kernels.decode_attention import decode_attention, decode_attention_ref


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
