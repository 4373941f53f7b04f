"""Key-padded bidirectional attention with a key split against SDPA with the additive mask.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_attention.py
(no CUDA: the Triton interpreter, fp32 and fp16; the GPU test runs yan-paper's heads in bf16).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.tolerances import TOL

pytest.importorskip("triton")

from yan_kernels import ops
from yan_kernels.attention import attention, attention_ref, splits_for


def _packed(B, Lq, Lk, H, hd, device, dtype, seed=0):
    """q from a packed [tokens, 3, H, hd] projection (self-attention layout), k / v from a
    packed [tokens, 2, H, hd] one (the cross keys/values layout): strided views, as the engine
    passes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B * Lq, 3, H, hd, generator=g).to(device, dtype)
    kv = torch.randn(B * Lk, 2, H, hd, generator=g).to(device, dtype)
    return qkv[:, 0], kv[:, 0], kv[:, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize(
    "B,Lq,Lk,H,hd,klen",
    [(1, 1, 1, 1, 16, [1]), (2, 70, 130, 2, 32, [130, 5]), (3, 40, 40, 4, 24, [0, 40, 1])],
)
def test_matches_sdpa_with_the_key_mask(device, dtype, split, B, Lq, Lk, H, hd, klen) -> None:
    """One query and one key; cross-attention shapes (Lq != Lk) over three key blocks; a row
    with no real key (attends to all), a row with one; a head size that is not a power of two;
    unsplit, and split in 2 and 3 chunks (some past a short row's keys: empty partials)."""
    q, k, v = _packed(B, Lq, Lk, H, hd, device, dtype)
    n = torch.tensor(klen, dtype=torch.int32, device=device)
    got = attention(q, k, v, n, Lq, Lk, split=split)
    want = attention_ref(q.float(), k.float(), v.float(), n, Lq, Lk)
    assert got.shape == (B * Lq, H * hd) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


def test_padded_keys_do_not_count(device) -> None:
    q, k, v = _packed(2, 8, 50, 2, 16, device, torch.float32, seed=1)
    n = torch.tensor([20, 50], dtype=torch.int32, device=device)
    a = attention(q, k, v, n, 8, 50, split=2)
    k2, v2 = k.clone(), v.clone()
    k2[20:50] = 1e3  # row 0's padded keys
    v2[20:50] = -1e3
    b = attention(q, k2, v2, n, 8, 50, split=2)
    torch.testing.assert_close(a[:8], b[:8], **TOL[torch.float32])


def test_split_choice_and_facade(device) -> None:
    assert splits_for(programs=8, key_blocks=16, sms=132) == 8  # batch 1: split to the cap
    assert splits_for(programs=8, key_blocks=2, sms=132) == 2  # no more chunks than key blocks
    assert splits_for(programs=1024, key_blocks=16, sms=132) == 1  # enough programs already
    q, k, v = _packed(2, 9, 11, 2, 16, device, torch.float32)
    n = torch.tensor([11, 3], dtype=torch.int32, device=device)
    with ops.force("triton"):
        a = ops.attention(q, k, v, n, 9, 11)
    with ops.force("ref"):
        b = ops.attention(q, k, v, n, 9, 11)
    torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B,L", [(1, 128), (1, 1024), (64, 1024)])
def test_paper_heads_on_gpu(B, L) -> None:
    """yan-paper's 8 heads of 64 in bf16, with its default split (batch 1: split)."""
    q, k, v = _packed(B, L, L, 8, 64, torch.device("cuda"), torch.bfloat16)
    n = torch.full((B,), L, dtype=torch.int32, device="cuda")
    n[0] = L // 3
    got = attention(q, k, v, n, L, L)
    want = attention_ref(q, k, v, n, L, L)
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])
