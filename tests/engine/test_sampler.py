"""The YAN sampler: t=0 reuse, T=1, per-request seeds, batch independence, EOS handling.

Run: python -m pytest tests/engine -q
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from yan_serve.engine.sampler import GenerationRequest, Sampler, request_noise
from yan_serve.model import YAN


def _requests(n: int, seed: int = 0) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lx = int(torch.randint(1, 30, (1,), generator=g))
        ly = int(torch.randint(1, 35, (1,), generator=g))
        src = torch.randint(4, 61, (lx,), generator=g).tolist()
        out.append(GenerationRequest(src=src, tgt_len=ly, seed=1000 + i))
    return out


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize("routing", ["sample", "argmax"])
def test_t0_reuse_equals_naive_schedule_on_yan(micro_model: YAN, steps: int, routing: str) -> None:
    s = Sampler(micro_model)
    batch = s.prepare(_requests(5))
    fast = s.solve(batch, steps, routing)
    naive = s.solve(batch, steps, routing, naive=True)
    assert torch.equal(fast.expert, naive.expert)
    torch.testing.assert_close(fast.z, naive.z, rtol=1e-5, atol=1e-5)


def test_one_time_point_decodes_z0(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    reqs = _requests(3)
    batch = s.prepare(reqs)
    noise = s.draw(batch)
    res = s.solve(batch, steps=1, noise=noise)
    torch.testing.assert_close(res.z, noise.z0)
    tok, _ = s.decode(noise.z0)
    gens = s.generate(reqs, steps=1)
    for i, g in enumerate(gens):
        assert g.tokens == tok[i, : len(g.tokens)].tolist()


def test_request_noise_is_the_requests_own() -> None:
    a = request_noise(7, 5, 8, 1.0)
    b = request_noise(7, 5, 8, 1.0)
    c = request_noise(8, 5, 8, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.testing.assert_close(request_noise(7, 5, 8, 0.5)[0], 0.5 * a[0])


def test_batched_results_equal_solo_results(micro_model: YAN) -> None:
    """Mixed lengths and seeds: each request's tokens do not depend on its batch-mates.

    Padding changes matmul shapes, so latents may differ in the last float bits; a token can
    only flip on a near-tie of the decoder. We measure the flip rate and require it to be 0 on
    this model (0 of 16 requests / 281 tokens when written).
    """
    s = Sampler(micro_model)
    reqs = _requests(16, seed=3)
    batched = s.generate(reqs, steps=3)
    flips = total = 0
    for r, b in zip(reqs, batched, strict=True):
        solo = s.generate([r], steps=3)[0]
        assert solo.expert == b.expert
        total += r.tgt_len
        full_b, full_s = b.tokens, solo.tokens
        flips += sum(x != y for x, y in zip(full_b, full_s, strict=False))
        flips += abs(len(full_b) - len(full_s))
        assert solo.confidence == pytest.approx(b.confidence, abs=1e-4)
    assert flips == 0, f"{flips}/{total} tokens changed with batching"


def test_latents_independent_of_batch_and_padding(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    reqs = _requests(6, seed=4)
    both = s.solve(s.prepare(reqs), 4)
    for i, r in enumerate(reqs):
        alone = s.solve(s.prepare([r]), 4)
        torch.testing.assert_close(both.z[i, : r.tgt_len], alone.z[0], rtol=1e-5, atol=1e-5)
        assert both.z[i, r.tgt_len :].abs().max() == 0 if r.tgt_len < both.z.shape[1] else True


def test_seed_changes_output_and_repeats_exactly(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    r = _requests(1, seed=5)[0]
    a = s.generate([r])[0]
    assert s.generate([r])[0] == a
    other = s.generate([GenerationRequest(r.src, r.tgt_len, seed=r.seed + 1)])[0]
    assert other.expert != a.expert or other.tokens != a.tokens


def test_previews_hold_every_time_point(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    reqs = _requests(2, seed=6)
    gens = s.generate(reqs, steps=4, return_previews=True)
    final = s.generate(reqs, steps=4)
    for r, g, f in zip(reqs, gens, final, strict=True):
        assert g.previews is not None and len(g.previews) == 4
        assert all(len(p) == r.tgt_len for p in g.previews)
        assert g.previews[-1][: len(f.tokens)] == f.tokens
        assert g.tokens == f.tokens


def test_eos_cut_and_finish_reason(micro_model: YAN, monkeypatch) -> None:
    eos = micro_model.config.eos_token_id
    s = Sampler(micro_model)
    fake = torch.tensor([[5, 6, eos, 7, eos], [5, 6, 7, 8, 9]])
    monkeypatch.setattr(
        s, "decode", lambda z, batch=None, noise=None: (fake, torch.full(fake.shape, 0.5))
    )
    g = s.generate([GenerationRequest([4], 5), GenerationRequest([4], 5)])
    assert (g[0].tokens, g[0].finish_reason) == ([5, 6], "eos")
    assert (g[1].tokens, g[1].finish_reason) == ([5, 6, 7, 8, 9], "length")
    assert g[0].confidence == [0.5, 0.5]


def test_bad_requests_raise_clear_errors(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    with pytest.raises(ValueError, match="empty source"):
        s.generate([GenerationRequest([], 3)])
    with pytest.raises(ValueError, match="tgt_len"):
        s.generate([GenerationRequest([4], 0)])
    with pytest.raises(ValueError, match="max_length"):
        s.generate([GenerationRequest([4], 41)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.generate([GenerationRequest([4, 61], 3)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.generate([GenerationRequest([-1], 3)])
    with pytest.raises(ValueError, match="no requests"):
        s.generate([])


@pytest.mark.gpu
def test_cuda_sampler_matches_cpu(micro_model: YAN) -> None:
    """Noise comes from each request's seed through the same Philox stream on both devices (a
    kernel on CUDA, torch on the CPU), so CUDA (the fused engine) and CPU (the modules) start
    from the same z_0 and expert draws; in fp32 the latents agree to rounding at every real
    position and the tokens agree (near-ties aside)."""
    reqs = _requests(12, seed=7)
    cpu_sampler = Sampler(micro_model)
    batch = cpu_sampler.prepare(reqs)
    cpu = cpu_sampler.solve(batch, 3)
    gpu_model = YAN(micro_model.config).cuda().eval()
    gpu_model.load_state_dict(micro_model.state_dict())
    s = Sampler(gpu_model)
    res = s.solve(s.prepare(reqs), 3)
    real = batch.tgt_mask
    assert torch.equal(res.expert.cpu()[real], cpu.expert[real])
    torch.testing.assert_close(res.z.cpu()[real], cpu.z[real], rtol=1e-3, atol=1e-3)
    tok_gpu = [g.tokens for g in s.generate(reqs)]
    tok_cpu = [g.tokens for g in Sampler(micro_model).generate(reqs)]
    same = sum(a == b for a, b in zip(tok_gpu, tok_cpu, strict=True))
    assert same >= len(reqs) - 1, f"{len(reqs) - same} of {len(reqs)} requests differ"


def test_temperature_sampling_is_seeded_and_batch_independent(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    reqs = [GenerationRequest(r.src, r.tgt_len, r.seed, temperature=1.5, top_k=k)
            for r, k in zip(_requests(6, seed=8), (0, 5, 0, 1, 3, 0), strict=False)]  # fmt: skip
    together = s.generate(reqs, steps=3)
    for r, t in zip(reqs, together, strict=False):
        assert s.generate([r], steps=3)[0].full == t.full
    greedy = s.generate([GenerationRequest(r.src, r.tgt_len, r.seed) for r in reqs], steps=3)
    assert any(g.full != t.full for g, t in zip(greedy, together, strict=False))
    # top_k = 1 is greedy whatever the temperature
    assert together[3].full == greedy[3].full


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_a_vanishing_temperature_decodes_greedily(micro_model: YAN, temperature: float) -> None:
    # logits / 1e-40 overflow float32 to -inf everywhere (NaN probabilities: garbage tokens);
    # a temperature below MIN_TEMPERATURE runs at it, greedy in effect
    s = Sampler(micro_model)
    reqs = _requests(4, seed=10)
    greedy = s.generate(reqs, steps=3)
    cold = s.generate([GenerationRequest(r.src, r.tgt_len, r.seed, temperature=temperature)
                       for r in reqs], steps=3)  # fmt: skip
    assert [g.full for g in cold] == [g.full for g in greedy]
    assert all(0 < p <= 1 for g in cold for p in g.full_confidence)


def test_sample_tokens_follows_the_tempered_distribution() -> None:
    from yan_serve.engine.sampler import sample_tokens

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]])).expand(20000, 3)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(sample_tokens(logits, 1.0, 0, u), minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.01, rtol=0)
    top2 = torch.bincount(sample_tokens(logits, 1.0, 2, u), minlength=3).float() / 20000
    assert top2[0] == 0 and abs(top2[2] - 0.7 / 0.9) < 0.01


def test_score_matches_the_decoder_log_probs_of_the_generated_tokens(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    reqs = _requests(4, seed=9)
    gens = s.generate(reqs, steps=3, routing="argmax")
    logp = s.score(reqs, [g.full for g in gens], steps=3, routing="argmax")
    for g, lp in zip(gens, logp, strict=False):
        assert lp == pytest.approx([math.log(p) for p in g.full_confidence], abs=1e-4)
    with pytest.raises(ValueError, match="tgt_len"):
        s.score(reqs[:1], [[*gens[0].full, 1]], steps=3)


def test_candidates_of_one_request_share_one_solve(micro_model: YAN, monkeypatch) -> None:
    """K label candidates of the same request are scored against one latent: one solve row per
    distinct request, and the same log-probs as scoring each candidate alone."""
    s = Sampler(micro_model)
    a, b = _requests(2, seed=11)
    V = micro_model.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    cands = [torch.randint(4, V, (a.tgt_len,), generator=gen).tolist() for _ in range(3)]
    other = torch.randint(4, V, (b.tgt_len,), generator=gen).tolist()
    alone = [s.score([a], [c], steps=3, routing="argmax")[0] for c in cands]
    alone_b = s.score([b], [other], steps=3, routing="argmax")[0]
    rows = []
    solve = s.solve
    monkeypatch.setattr(s, "solve", lambda batch, *k, **kw: rows.append(batch.src.shape[0])
                        or solve(batch, *k, **kw))  # fmt: skip
    got = s.score([a, b, a, a], [cands[0], other, cands[1], cands[2]], steps=3, routing="argmax")
    assert rows == [2]  # a and b, not four
    for lp, ref in zip([got[0], got[2], got[3]], alone, strict=True):
        assert lp == pytest.approx(ref, abs=1e-5)
    assert got[1] == pytest.approx(alone_b, abs=1e-5)
    # a different seed is a different latent: solved separately
    rows.clear()
    s.score([a, dataclasses.replace(a, seed=a.seed + 1)], cands[:2], steps=3, routing="argmax")
    assert rows == [2]


def test_on_step_sees_every_time_point_as_it_is_reached(micro_model: YAN) -> None:
    s = Sampler(micro_model)
    reqs = _requests(3, seed=10)
    seen = []
    out = s.generate(reqs, steps=4, on_step=lambda i, toks: seen.append((i, toks.shape[0])))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert out[0].previews is None


def test_content_positions_never_decode_a_special_token(micro_model: YAN) -> None:
    """A model that wants padding everywhere (pad's lm_head bias raised): `content` positions get
    the most likely non-special token instead, with its probability under the full softmax
    (small: the model preferred padding); other positions keep the pad; results depend on the
    request only (alone == batched)."""
    cfg = micro_model.config
    special = {cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.mask_token_id}
    model = YAN(cfg).eval()
    model.load_state_dict(micro_model.state_dict())
    with torch.no_grad():
        model.decoder.lm_head.bias[cfg.pad_token_id] += 50.0
    s = Sampler(model)
    reqs = [dataclasses.replace(r, tgt_len=6, content=(0, 3)) for r in _requests(3)]
    reqs[1] = dataclasses.replace(reqs[1], content=())
    out = s.generate(reqs, steps=2)
    for r, g in zip(reqs, out, strict=True):
        for p in range(r.tgt_len):
            if p in r.content:
                assert g.full[p] not in special and g.full_confidence[p] < 1e-6
            else:
                assert g.full[p] == cfg.pad_token_id
    solo = [s.generate([r], steps=2)[0] for r in reqs]
    assert [g.full for g in solo] == [g.full for g in out]
    # the replacement is the argmax over the content tokens at that position
    batch = s.prepare(reqs[:1])
    z = s.solve(batch, 2, "sample", noise=s.draw(batch)).z
    logp = torch.log_softmax(model.decode_logits(z[0, :1]).float(), -1)[0]
    logp[list(special)] = float("-inf")
    assert out[0].full[0] == int(logp.argmax())
    assert math.isclose(out[0].full_confidence[0], float(logp.max().exp()), rel_tol=1e-4)


def test_assemble_cuts_each_row_at_its_first_eos_within_its_length() -> None:
    """EOS first, EOS mid-row, EOS only past the row's length (not a cut), no EOS; each row
    keeps exactly its `tgt_len` positions in `full`, and the previews too."""
    from yan_serve.engine.sampler import assemble

    eos = 2
    tokens = torch.tensor([[2, 5, 6, 7], [5, 2, 2, 7], [5, 6, 2, 7], [5, 6, 7, 8]])
    conf = torch.arange(16, dtype=torch.float32).view(4, 4) / 16
    expert = torch.tensor([[0, 1, 2, 0]] * 4)
    reqs = [GenerationRequest([5], n, seed=i) for i, n in enumerate((4, 3, 2, 4))]
    out = assemble(reqs, tokens, conf, expert, eos, previews=[tokens + 10])
    assert [g.tokens for g in out] == [[], [5], [5, 6], [5, 6, 7, 8]]
    assert [g.finish_reason for g in out] == ["eos", "eos", "length", "length"]
    assert [g.full for g in out] == [[2, 5, 6, 7], [5, 2, 2], [5, 6], [5, 6, 7, 8]]
    assert out[1].confidence == [0.25] and out[1].full_confidence == [0.25, 0.3125, 0.375]
    assert out[2].expert == [0, 1] and out[2].previews == [[15, 16]]
    assert all(isinstance(t, int) for g in out for t in g.full)
