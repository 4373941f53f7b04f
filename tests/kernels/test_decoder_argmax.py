"""Fused lm_head + online softmax kernel against its pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_decoder_argmax.py
(no CUDA: the kernels run in Triton's CPU interpreter; GPU tests are marked `gpu`).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.tolerances import ARGMAX_AGREEMENT_BF16, TOL

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from yan_kernels.decoder_argmax import (  # noqa: E402
    SPLIT_OVERHEAD_TILES,
    Blocks,
    decoder_argmax,
    decoder_argmax_ref,
    default_splits,
    philox_uniform,
)

F32 = TOL[torch.float32]


def _problem(N: int, d: int, V: int, device, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    w = (torch.rand(V, d, generator=g) * 2 - 1) * 3 / d**0.5
    b = torch.rand(V, generator=g) * 2 - 1
    return x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)


def _assert_same_choice(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor) -> None:
    """Equal picks, except where the reference's best two scores are within float noise (a
    kernel summing in another order may then legitimately pick the other one)."""
    top2 = scores.topk(2, dim=-1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < 1e-5 * top2[:, 0].abs().clamp_min(1)
    bad = (got != want) & ~near_tie
    assert not bad.any(), f"{int(bad.sum())} rows differ: {got[bad].tolist()} vs {want[bad]}"


# Default tiles: BLOCK_V = 256 in the interpreter, 128 on CUDA; V = 1000 spans several tiles.
CASES = [  # (N, d, V, splits)
    (37, 48, 1000, 1),
    (37, 48, 1000, 3),  # vocabulary split over programs, folded by the launcher
    (1, 48, 1000, 1),
    (5, 32, 300, 2),  # the last tile is mostly past V
]


@pytest.mark.parametrize(("N", "d", "V", "splits"), CASES)
def test_argmax_prob_and_labels_match_reference(device, N, d, V, splits) -> None:
    x, w, b = _problem(N, d, V, device)
    labels = torch.randint(0, V, (N, 3), generator=torch.Generator().manual_seed(1)).to(device)
    got = decoder_argmax(x, w, b, labels=labels, splits=splits)
    want = decoder_argmax_ref(x, w, b, labels=labels)
    logits = torch.nn.functional.linear(x, w, b)
    _assert_same_choice(got.token, want.token, logits)
    torch.testing.assert_close(got.prob, want.prob, **F32)
    torch.testing.assert_close(got.label_logp, want.label_logp, **F32)
    assert got.sample is None and got.token.dtype == torch.long
    one = decoder_argmax(x, w, b, labels=labels[:, 1], splits=splits)
    torch.testing.assert_close(one.label_logp, want.label_logp[:, 1], **F32)
    assert torch.equal(one.token, got.token)


@pytest.mark.parametrize(
    ("N", "d", "V", "splits"), [(37, 48, 1000, 1), (37, 48, 1000, 3), (5, 40, 300, 2)]
)
def test_tma_descriptor_loads_match_reference(device, N, d, V, splits) -> None:
    """The TMA form (tiles through tensor descriptors, zero-filled past N, V and d) against the
    reference: argmax, probability, labels and a temperature sample, on awkward shapes (d not
    a multiple of the K tile, the last vocabulary tile mostly past V, rows past N)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # TMA takes 16-bit on a GPU
    x, w, b = _problem(N, d, V, device, dtype)
    labels = torch.randint(0, V, (N, 2), generator=torch.Generator().manual_seed(2)).to(device)
    temp = torch.full((N,), 0.7, device=device)
    seed = torch.arange(N, device=device, dtype=torch.int64) * 7919 - 3
    tma = Blocks(32, 64, 32, 4, 1, tma=True)
    got = decoder_argmax(x, w, b, temp, seed, labels=labels, splits=splits, blocks=tma)
    if device.type == "cpu":
        want = decoder_argmax_ref(x, w, b, temp, seed, labels=labels)
        tol = F32
    else:  # the same kernel with pointer loads: the same sums in the same order
        want = decoder_argmax(x, w, b, temp, seed, labels=labels, splits=splits,
                              blocks=tma._replace(tma=False))  # fmt: skip
        tol = TOL[dtype]
        # and the fp32 oracle of the same 16-bit inputs, so that a TMA path that only agrees
        # with its pointer-load twin (on a card without TMA they are one path) still answers
        oracle = decoder_argmax_ref(x.float(), w.float(), b.float(), temp, seed, labels=labels)
        logits32 = torch.nn.functional.linear(x.float(), w.float(), b.float())
        _assert_same_choice(got.token, oracle.token, logits32)
        torch.testing.assert_close(got.prob, oracle.prob, **tol)
        torch.testing.assert_close(got.label_logp, oracle.label_logp, **tol)
    logits = torch.nn.functional.linear(x, w, b).float()
    _assert_same_choice(got.token, want.token, logits)
    torch.testing.assert_close(got.prob, want.prob, **tol)
    torch.testing.assert_close(got.label_logp, want.label_logp, **tol)
    assert (got.sample == want.sample).float().mean().item() >= 0.99


@pytest.mark.parametrize(
    ("rows", "tiles", "slots"),
    [(64, 502, 132), (512, 502, 132), (8, 502, 132), (1, 1003, 264), (3, 7, 16), (200, 4, 132)],
)
def test_default_splits_minimize_tile_steps(rows, tiles, slots) -> None:
    """The chosen split count has the fewest tile steps (waves x (tiles per split + a
    program's overhead)) of every count, the smallest among equals; 64 row tiles on 132 SMs
    take one wave of 2 splits."""

    def cost(s: int) -> int:
        return -(-rows * s // slots) * (-(-tiles // s) + SPLIT_OVERHEAD_TILES)

    s = default_splits(rows, tiles, slots)
    assert 1 <= s <= tiles
    best = min(cost(k) for k in range(1, tiles + 1))
    assert cost(s) == best
    assert all(cost(k) > best for k in range(1, s))
    if (rows, tiles, slots) == (64, 502, 132):
        assert s == 2


def test_probabilities_are_a_softmax(device) -> None:
    """Label log-probs over the whole vocabulary normalize, and the argmax's is the largest."""
    N, d, V = 3, 16, 50
    x, w, b = _problem(N, d, V, device)
    every = torch.arange(V, device=device).expand(N, V).contiguous()
    res = decoder_argmax(x, w, b, labels=every, block_v=64)
    torch.testing.assert_close(res.label_logp.exp().sum(-1), torch.ones(N, device=device))
    torch.testing.assert_close(res.label_logp.max(-1).values.exp(), res.prob, **F32)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("pair", [(10, 11), (300, 900), (999, 600), (5, 999)])
def test_ties_pick_the_lowest_index(device, splits, pair) -> None:
    """Equal maxima inside one tile, across tiles and across splits: both paths return the
    lowest index. The tied logits are exactly 50 (zero weight rows), far above the rest."""
    N, d, V = 4, 16, 1000
    x, w, b = _problem(N, d, V, device)
    for i in pair:
        w[i] = 0.0
        b[i] = 50.0
    res = decoder_argmax(x, w, b, splits=splits)
    ref = decoder_argmax_ref(x, w, b)
    assert res.token.tolist() == ref.token.tolist() == [min(pair)] * N


def test_paper_vocabulary_masks_the_last_tile(device) -> None:
    """V = 128258 = 31 * 4096 + 1282: the best id sits in the ragged last tile for row 0."""
    N, d, V = 4, 16, 128258
    x, w, b = _problem(N, d, V, device)
    b[V - 1] = 40.0
    big = {"block_v": 4096, "block_k": 16} if device.type == "cpu" else {}  # few interpreter tiles
    lab = torch.tensor([V - 1, 0, 7, V - 2], device=device)[:, None]
    res = decoder_argmax(x, w, b, labels=lab, **big)
    ref = decoder_argmax_ref(x, w, b, labels=torch.tensor([V - 1, 0, 7, V - 2])[:, None])
    assert res.token[0] == V - 1
    assert torch.equal(res.token.cpu(), ref.token.cpu())
    torch.testing.assert_close(res.prob.cpu(), ref.prob.cpu(), **F32)
    torch.testing.assert_close(res.label_logp.cpu(), ref.label_logp.cpu(), **F32)


@triton.jit
def _rand_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr + row)
    tl.store(out_ptr + row * n + cols, tl.rand(seed, cols), mask=cols < n)


def test_philox_reference_is_tl_rand_bit_for_bit(device) -> None:
    seeds = torch.tensor([0, 1, 12345, -7, 2**62 + 3, -(2**40)], dtype=torch.int64, device=device)
    n = 200
    out = torch.empty(len(seeds), n, device=device)
    _rand_kernel[(len(seeds),)](seeds, out, n, BLOCK=256)
    assert torch.equal(out, philox_uniform(seeds, n))
    assert float(out.min()) >= 0.0 and float(out.max()) < 1.0


@pytest.mark.parametrize("splits", [1, 3])
def test_sample_matches_reference(device, splits) -> None:
    N, d, V = 37, 48, 1000
    x, w, b = _problem(N, d, V, device)
    temp = torch.rand(N, generator=torch.Generator().manual_seed(2)) * 2
    temp[:4] = 0.0  # greedy rows inside a sampling batch
    seed = torch.randint(-(2**62), 2**62, (N,), generator=torch.Generator().manual_seed(3))
    temp, seed = temp.to(device), seed.to(device)
    got = decoder_argmax(x, w, b, temp, seed, splits=splits)
    want = decoder_argmax_ref(x, w, b, temp, seed)
    assert torch.equal(got.sample[:4], got.token[:4])
    logits = torch.nn.functional.linear(x, w, b)
    pert = logits / temp.clamp_min(1e-6)[:, None] - torch.log(-torch.log(philox_uniform(seed, V)))
    _assert_same_choice(got.sample[4:], want.sample[4:], pert[4:])
    assert (got.sample[4:] != got.token[4:]).any(), "temperature sampling never left the argmax"
    again = decoder_argmax(x, w, b, temp, seed, splits=splits)
    assert torch.equal(again.sample, got.sample)  # a function of the seed alone


def test_sampling_follows_the_tempered_softmax(device) -> None:
    """4000 rows with the same logits and different seeds: the sample frequencies approach
    softmax(logits / T) (a wrong temperature or noise law moves them by far more than 4 sigma)."""
    N, d, V, T = 4000, 16, 8, 0.7
    x, w, b = _problem(1, d, V, device)
    x = x.expand(N, d).contiguous()
    seed = torch.arange(N, dtype=torch.int64, device=device) * 7919 + 11
    res = decoder_argmax(x, w, b, T, seed, block_v=16, block_m=256)
    freq = torch.bincount(res.sample.cpu(), minlength=V).double() / N
    p = torch.softmax(torch.nn.functional.linear(x[:1], w, b).double().cpu()[0] / T, -1)
    sigma = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-3).all(), (freq, p)


def test_launcher_checks_inputs(device) -> None:
    x, w, b = _problem(3, 16, 40, device)
    with pytest.raises(AssertionError):
        decoder_argmax(x, w[:, :8].contiguous(), b)
    with pytest.raises(AssertionError):
        decoder_argmax(x, w, b, temperature=1.0)  # no seed
    with pytest.raises(AssertionError):
        decoder_argmax(x, w, b, labels=torch.zeros(2, dtype=torch.long, device=device))


# ------------------------------------------------------------------------------------- GPU
def _oracle(x, w, b, labels=None, chunk: int = 4096):
    """fp32 reference from the same (rounded) inputs, a chunk of rows at a time (the full
    [64K, 128258] fp32 logits would be 33 GB)."""
    parts = [
        decoder_argmax_ref(
            x[i : i + chunk].float(),
            w.float(),
            b.float(),
            labels=None if labels is None else labels[i : i + chunk],
        )
        for i in range(0, x.shape[0], chunk)
    ]
    tok = torch.cat([p.token for p in parts])
    prob = torch.cat([p.prob for p in parts])
    lab = None if labels is None else torch.cat([p.label_logp for p in parts])
    return tok, prob, lab


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [1, 300, 64 * 1024])
def test_paper_shapes_on_gpu(N, dtype) -> None:
    d, V = 512, 128258
    dev = torch.device("cuda")
    x, w, b = _problem(N, d, V, dev, dtype)
    labels = torch.randint(0, V, (N, 2), device=dev)
    res = decoder_argmax(x, w, b, labels=labels)
    tok, prob, lab = _oracle(x, w, b, labels)
    agree = (res.token == tok).float().mean().item()
    assert agree >= (ARGMAX_AGREEMENT_BF16 if dtype == torch.bfloat16 else 1.0 - 1e-4), agree
    torch.testing.assert_close(res.prob, prob, **TOL[dtype])
    torch.testing.assert_close(res.label_logp, lab, **TOL[dtype])


@pytest.mark.gpu
def test_sample_on_gpu_matches_reference() -> None:
    N, d, V = 256, 512, 128258
    dev = torch.device("cuda")
    x, w, b = _problem(N, d, V, dev)
    temp = torch.full((N,), 0.8, device=dev)
    seed = torch.arange(N, device=dev, dtype=torch.int64) * 1_000_003
    got = decoder_argmax(x, w, b, temp, seed)
    want = decoder_argmax_ref(x, w, b, temp, seed)
    assert (got.sample == want.sample).float().mean().item() >= 0.99  # GPU log vs torch log


@pytest.mark.gpu
def test_sampler_decode_uses_the_kernel_on_gpu(monkeypatch) -> None:
    from yan_kernels import decoder_argmax as mod
    from yan_kernels import force

    from tests.conftest import micro_config
    from yan_serve.engine.sampler import GenerationRequest, Sampler
    from yan_serve.model import YAN

    calls = []
    kernel = mod.decoder_argmax
    monkeypatch.setattr(mod, "decoder_argmax", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    s = Sampler(YAN(micro_config()).eval().cuda())
    reqs = [GenerationRequest(src=[5, 6, 7], tgt_len=9, seed=i) for i in range(3)]
    reqs.append(GenerationRequest(src=[8, 9], tgt_len=4, seed=9, temperature=0.8, top_k=5))
    with force("ref"):
        want = s.generate(reqs, steps=3)
    assert not calls
    with force("triton"):
        got = s.generate(reqs, steps=3)
    assert calls
    for g, r in zip(got, want, strict=True):
        assert g.full == r.full
        torch.testing.assert_close(torch.tensor(g.full_confidence), torch.tensor(r.full_confidence))
