"""Static-KV-cache GPT-2 decoding (the CUDA-graph path of the AR baseline) against Hugging Face.

On CPU the windows run through `EagerReplay`: the same static buffers, slot and position updates
and batch padding as the captured graphs. The `gpu` tests capture real CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from yan_serve.ar.generate import ARRequest, ar_generate
from yan_serve.ar.static import HFRunner, StaticGPT2, StaticRunner
from yan_serve.engine.graphs import length_buckets

EOS, PAD = 2, 0


def _model(seed: int = 0, device: str = "cpu", **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=96, n_embd=48, n_layer=3, n_head=4,
                     bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, **kw)  # fmt: skip
    m = GPT2LMHeadModel(cfg).eval().to(device)
    with torch.no_grad():  # sharper logits than the init's, so greedy choices are not near-ties
        m.lm_head.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return _model()


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    Lp = max(map(len, prompts))
    ids = torch.full((len(prompts), Lp), PAD)
    att = torch.zeros(len(prompts), Lp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Lp - len(p) :] = torch.tensor(p)
        att[i, Lp - len(p) :] = 1
    return ids, att, (att.cumsum(-1) - 1).clamp_min(0)


def test_cache_windows_are_the_sampler_length_buckets_from_64() -> None:
    assert length_buckets(1026, smallest=64) == (64, 128, 256, 512, 1024, 1026)
    assert length_buckets(64, smallest=64) == (64,)
    assert length_buckets(40, smallest=64) == (40,)
    runner = StaticRunner(_model(), batch_sizes=(1,))  # n_positions 96
    assert runner.lengths == (64, 96)


@torch.no_grad()
def test_static_steps_equal_hf_log_probs(model) -> None:
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    ids, att, pos = _left_padded(prompts)
    runner = StaticRunner(model, batch_sizes=(4,), lengths=(32,))
    runner.capture()
    hf = HFRunner(model)
    a, b = runner.start(ids, att, pos, 10), hf.start(ids, att, pos, 10)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for t in range(9):
        tok = torch.tensor([20 + t, 30 + t, 40 + t])
        a, b = runner.step(tok), hf.step(tok)
        assert a.shape == b.shape == (3, 97)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert int(runner.static.slot) == ids.shape[1] + 9


def test_generate_with_static_runner_equals_reference(model) -> None:
    reqs = [ARRequest([5 + i, 6, 7, 8, 9][: 1 + i % 5], 4 + 3 * i, seed=i) for i in range(5)]
    reqs.append(ARRequest([3, 4], 12, ignore_eos=True))
    runner = StaticRunner(model, batch_sizes=(2, 8), lengths=(16, 48))
    runner.capture()
    assert runner.fits(6, 5, 12) and runner.window(6, 17) == (8, 48)
    ref = ar_generate(model, reqs, EOS, PAD)
    got = ar_generate(model, reqs, EOS, PAD, static=runner)
    assert runner.current is not None and runner.current.batch == 8  # it took the static path
    for r, g in zip(ref, got, strict=True):
        assert g.tokens == r.tokens and g.hit_eos == r.hit_eos
        assert g.confidence == pytest.approx(r.confidence, abs=1e-4)
    assert len(got[-1].tokens) == 12  # ignore_eos decodes every token
    # a smaller batch after a larger one reuses the cache: no state leaks between batches
    alone = ar_generate(model, reqs[1:2], EOS, PAD, static=runner)
    assert runner.current.batch == 2 and alone[0].tokens == ref[1].tokens


def test_seeded_sampling_matches_reference(model) -> None:
    reqs = [ARRequest([5, 6, 7], 10, seed=s, temperature=4.0, top_k=20) for s in range(3)]
    runner = StaticRunner(model, batch_sizes=(4,), lengths=(32,))
    runner.capture()
    ref = ar_generate(model, reqs, EOS, PAD)
    got = ar_generate(model, reqs, EOS, PAD, static=runner)
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    assert len({tuple(g.tokens) for g in got}) > 1  # different seeds, different samples


def test_batches_no_window_holds_fall_back_to_hf(model) -> None:
    runner = StaticRunner(model, batch_sizes=(1, 2), lengths=(16,))
    runner.capture()
    assert not runner.fits(3, 4, 4) and not runner.fits(1, 10, 7)
    reqs = [ARRequest([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 8, ignore_eos=True)]
    got = ar_generate(model, reqs, EOS, PAD, static=runner)
    assert runner.current is None  # never started: the HF runner served it
    assert got[0].tokens == ar_generate(model, reqs, EOS, PAD)[0].tokens
    with pytest.raises(ValueError, match="no captured window"):
        runner.start(*_left_padded([[1] * 10]), 7)


def test_padding_rows_and_stale_cache_do_not_produce_nans(model) -> None:
    runner = StaticRunner(model, batch_sizes=(8,), lengths=(24,))
    runner.capture()
    with torch.no_grad():
        runner.static.k.fill_(1e4)  # stale garbage from "earlier requests" must stay masked
        runner.static.v.fill_(-1e4)
    logp = runner.start(*_left_padded([[1, 2, 3], [4]]), 5)
    for t in range(4):
        logp = runner.step(torch.tensor([7 + t, 8 + t]))
        assert torch.isfinite(logp).all()
    fresh = HFRunner(model)
    ref = fresh.start(*_left_padded([[1, 2, 3], [4]]), 5)
    for t in range(4):
        ref = fresh.step(torch.tensor([7 + t, 8 + t]))
    torch.testing.assert_close(logp, ref, atol=1e-4, rtol=1e-4)


def test_unsupported_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        StaticGPT2(_model(reorder_and_upcast_attn=True), 2, 16)
    with pytest.raises(ValueError, match="n_positions"):
        StaticGPT2(_model(), 2, 200)
    with pytest.raises(ValueError, match=">= 1"):
        StaticRunner(_model(), batch_sizes=(0,), lengths=(16,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_equals_eager_token_for_token() -> None:
    model = _model(device="cuda")
    runner = StaticRunner(model, batch_sizes=(1, 8, 16), lengths=(32, 96))
    graphs, _ = runner.capture()
    assert graphs == 6
    assert isinstance(runner.windows[(8, 96)].graph, torch.cuda.CUDAGraph)
    gen = torch.Generator().manual_seed(0)
    reqs = [ARRequest(torch.randint(3, 97, (int(n),), generator=gen).tolist(), 40, seed=i)
            for i, n in enumerate(torch.randint(1, 50, (13,), generator=gen))]  # fmt: skip
    ref = ar_generate(model, reqs, EOS, PAD)
    got = ar_generate(model, reqs, EOS, PAD, static=runner)
    assert runner.current is not None and runner.current.batch == 16
    assert [g.tokens for g in got] == [r.tokens for r in ref]


def test_ar_worker_decodes_the_same_through_the_static_runner(ar_checkpoint) -> None:
    from yan_serve.ar.worker import ARWorker
    from yan_serve.engine.requests import EngineRequest, TaskOptions

    worker = ARWorker(ar_checkpoint, "cpu")
    gen = torch.Generator().manual_seed(1)
    jobs = [EngineRequest(torch.randint(5, 8000, (int(n),), generator=gen).tolist(), 24, i, 1,
                          options=TaskOptions(ignore_eos=i % 2 == 0))
            for i, n in enumerate(torch.randint(3, 60, (5,), generator=gen))]  # fmt: skip
    eager = worker.run(jobs)
    worker.static = StaticRunner(worker.model, batch_sizes=(2, 8), lengths=(64, 128))
    worker.static.capture()
    static = worker.run(jobs)
    assert worker.static.current is not None and worker.static.current.batch == 8
    assert [s.tokens for s in static] == [e.tokens for e in eager]
    assert [s.finish_reason for s in static] == [e.finish_reason for e in eager]
