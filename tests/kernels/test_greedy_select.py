"""The greedy decode step's end (argmax, its probability, the stopping state) against its
pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_greedy_select.py
(no CUDA: the Triton interpreter; the GPU test runs GPT-2's 128,258-token vocabulary in bf16).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from yan_kernels import ops
from yan_kernels.greedy_select import (
    BLOCK_CS,
    BLOCK_V,
    MAX_V,
    block_chunks,
    greedy_select,
    greedy_select_ref,
)


def _state(B: int, cols: int, slot: int, device, seed: int = 0):
    """Rows: running, already done, one token of budget left, ignoring EOS; spare rows past B
    that must stay untouched."""
    g = torch.Generator().manual_seed(seed)
    rows = B + 2
    return dict(
        out_tok=torch.randint(0, 9, (rows, cols), generator=g).to(device),
        out_p=torch.rand(rows, cols, generator=g).to(device),
        slot=torch.tensor([slot], device=device),
        done=(torch.arange(rows) % 4 == 1).to(device),
        left=torch.tensor([5, 3, 1, 7] * rows)[:rows].to(device),
        stop_eos=(torch.arange(rows) % 4 != 3).to(device),
        eos=torch.tensor([7], device=device),
        tok=torch.zeros(rows, dtype=torch.long, device=device),
        pos=torch.arange(rows, device=device) + 10,
    )


def _run(fn, logits, state, counts=None):
    s = {k: v.clone() for k, v in state.items()}
    fn(logits, s["out_tok"], s["out_p"], s["slot"], s["done"], s["left"], s["stop_eos"],
       s["eos"], s["tok"], s["pos"], counts=counts)  # fmt: skip
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("V", [1, 7, BLOCK_V + 3, 2 * BLOCK_V])
def test_matches_the_reference(device, dtype, V) -> None:
    """One-token and awkward vocabularies (across the block boundary); rows that pick EOS, rows
    already done, a row whose budget runs out, a row that ignores EOS."""
    B = 8
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=g) * 4).to(device, dtype)
    if V > 7:
        logits[0, 7] = logits[4, 7] = logits[7, 7] = 50.0  # EOS wins in rows 0, 4 and 7 (7 ignores)
    state = _state(B, 12, 5, device)
    got, want = _run(greedy_select, logits, state), _run(greedy_select_ref, logits, state)
    for k in ("out_tok", "done", "left", "tok", "pos"):
        assert torch.equal(got[k], want[k]), k
    torch.testing.assert_close(got["out_p"], want["out_p"], atol=1e-6, rtol=1e-5)
    assert torch.equal(got["out_tok"][:, :6], state["out_tok"][:, :6])  # only column slot + 1
    assert torch.equal(got["pos"][B:], state["pos"][B:])  # rows past B untouched
    if V > 7:
        assert bool(got["done"][0]) and bool(got["done"][4]) and not bool(got["done"][7])


def test_ties_take_the_first_maximum(device) -> None:
    """As `torch.argmax`: the first of equal maxima, within a block and across blocks."""
    V = 2 * BLOCK_V + 5
    logits = torch.zeros(3, V, device=device)
    logits[0, [3, 9]] = 2.0
    logits[1, [BLOCK_V - 1, BLOCK_V, 2 * BLOCK_V + 1]] = 2.0
    logits[2, [2 * BLOCK_V + 4, 2 * BLOCK_V + 2]] = 2.0
    got = _run(greedy_select, logits, _state(3, 4, 0, device))
    assert got["tok"][:3].tolist() == [3, BLOCK_V - 1, 2 * BLOCK_V + 2]


def test_chunks_meet_in_the_last_arrival_and_leave_the_counters_at_zero(device) -> None:
    """A row split over six chunks (the maximum in the last, a tie in an early one that must
    lose to nothing: the first maximum wins), three steps in a row through the same counters:
    each matches the reference and leaves the counters at zero for the next."""
    V = 5 * BLOCK_V + 17
    counts = torch.zeros(5, dtype=torch.int32, device=device)  # more rows than the batch
    state = _state(3, 8, 0, device)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        logits = torch.randn(3, V, generator=g).to(device)
        logits[0, V - 1] = 30.0  # the last chunk's last token
        logits[1, [BLOCK_V + 1, 4 * BLOCK_V]] = 30.0  # a tie across chunks: the first wins
        logits[2, :] = -1.0
        logits[2, 2 * BLOCK_V] = 0.0  # every other logit equal: p = 1 / (1 + (V-1) e^-1)
        state["slot"].fill_(step)
        got = _run(greedy_select, logits, state, counts=counts)
        want = _run(greedy_select_ref, logits, state)
        for k in ("out_tok", "done", "left", "tok", "pos"):
            assert torch.equal(got[k], want[k]), (step, k)
        torch.testing.assert_close(got["out_p"], want["out_p"], atol=1e-6, rtol=1e-5)
        assert got["tok"][:3].tolist() == [V - 1, BLOCK_V + 1, 2 * BLOCK_V]
        assert counts.tolist() == [0] * 5, step
        state = got


def test_chunk_blocks_cover_every_vocabulary() -> None:
    """The launcher's BLOCK_C is a compiled configuration (the AOT specs list BLOCK_CS) for
    every vocabulary it accepts, and a larger one is refused with its limit named."""
    for V in (1, BLOCK_V, BLOCK_V + 1, 8192, 50257, 128258, MAX_V):
        c = block_chunks(V)
        assert c in BLOCK_CS and c >= -(-V // BLOCK_V), V
    state = _state(1, 4, 0, "cpu")
    with pytest.raises(AssertionError, match=f"1 to {MAX_V} tokens"):
        _run(greedy_select, torch.zeros(1, MAX_V + 1), state)


def test_facade(device) -> None:
    logits = torch.randn(4, 300, device=device)
    state = _state(4, 6, 2, device)
    with ops.force("triton"):
        a = _run(ops.greedy_select, logits, state)
    with ops.force("ref"):
        b = _run(ops.greedy_select, logits, state)
    assert all(torch.allclose(a[k].float(), b[k].float()) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B", [1, 64])
def test_gpt2_vocabulary_on_gpu(B) -> None:
    dev = torch.device("cuda")
    logits = (torch.randn(B, 128258, device=dev) * 3).bfloat16()
    state = _state(B, 40, 17, dev)
    got, want = _run(greedy_select, logits, state), _run(greedy_select_ref, logits, state)
    assert torch.equal(got["tok"], want["tok"]) and torch.equal(got["done"], want["done"])
    torch.testing.assert_close(got["out_p"], want["out_p"], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B", [1, 8])
def test_graph_replays_reuse_the_counters_on_gpu(B) -> None:
    """Captured once with the caller's counters, replayed over fresh logits at 32 chunks a row:
    each replay matches the reference (the last arrival sees every chunk's partial, the
    counters return to zero), a hundred replays in a row."""
    dev = torch.device("cuda")
    logits = torch.zeros(B, 128258, device=dev, dtype=torch.bfloat16)
    counts = torch.zeros(B, dtype=torch.int32, device=dev)
    state = _state(B, 120, 0, dev)
    s = {k: v.clone() for k, v in state.items()}
    args = (logits, s["out_tok"], s["out_p"], s["slot"], s["done"], s["left"], s["stop_eos"],
            s["eos"], s["tok"], s["pos"])  # fmt: skip
    greedy_select(*args, counts=counts)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        greedy_select(*args, counts=counts)
    g = torch.Generator(device=dev).manual_seed(0)
    for i in range(100):
        logits.copy_(torch.randn(B, 128258, device=dev, generator=g) * 3)
        s["slot"].fill_(i % 100)
        before = {k: v.clone() for k, v in s.items()}
        graph.replay()
        want = _run(greedy_select_ref, logits, before)
        assert torch.equal(s["tok"], want["tok"]), i
        torch.testing.assert_close(s["out_p"], want["out_p"], atol=1e-5, rtol=1e-4)
    assert counts.tolist() == [0] * B
