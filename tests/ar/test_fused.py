"""The fused AR decoder (yan_serve/ar/fused.py) against Hugging Face's reference runner.

On CPU the windows run through `EagerReplay` (and, by default, attend over the slots written so
far); `trim=False` and `check_every` > 1 exercise the fixed-window, graph-shaped path the GPU
captures. The `gpu` test captures real CUDA graphs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from yan_serve.ar.fused import FusedGPT2, FusedRunner, choose
from yan_serve.ar.generate import ARRequest, ar_generate
from yan_serve.ar.static import HFRunner
from yan_serve.engine.sampler import sample_tokens

V, PAD = 97, 0


def _model(seed: int = 0, device: str = "cpu", **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=96, n_embd=48, n_layer=3, n_head=4,
                     bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                     initializer_range=0.3, **kw)  # fmt: skip
    # a wide init: the blocks move the residual stream, so greedy tokens vary along a row
    return GPT2LMHeadModel(cfg).eval().to(device)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return _model()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 14, (n,), generator=g)]  # fmt: skip


def _mid_row_eos(model, reqs: list[ARRequest]) -> int:
    """A token that some row decodes greedily after a few others and some row never decodes:
    used as EOS, it stops rows mid-batch at different steps."""
    rows = [o.tokens for o in ar_generate(model, reqs, -1, PAD)]
    for t in rows[0][2:]:
        if t not in rows[0][:2] and any(t not in r for r in rows):
            return t
    raise AssertionError("no token to stop on: pick other prompts")


def _same(got, ref) -> None:
    for g, r in zip(got, ref, strict=True):
        assert g.tokens == r.tokens and g.hit_eos == r.hit_eos
        assert g.confidence == pytest.approx(r.confidence, abs=1e-4)


@pytest.mark.parametrize("trim,check_every", [(True, 1), (False, 3)])
def test_greedy_awkward_batch_equals_reference(model, trim: bool, check_every: int) -> None:
    prompts = _prompts(7)
    reqs = [ARRequest(p, 3 + 4 * i, seed=i) for i, p in enumerate(prompts)]
    eos = _mid_row_eos(model, reqs)
    reqs[3].ignore_eos = True  # decodes through EOS
    reqs.append(ARRequest([5], 1))  # one token
    runner = FusedRunner(model, batch_sizes=(4, 16), lengths=(48,), check_every=check_every)
    runner.fused.trim = trim
    runner.capture()
    ref = ar_generate(model, reqs, eos, PAD)
    assert any(r.hit_eos for r in ref) and not all(r.hit_eos for r in ref)
    assert any(len(r.tokens) > 2 for r in ref if r.hit_eos)  # EOS mid-row, not at once
    got = ar_generate(model, reqs, eos, PAD, static=runner)
    assert runner.current is not None and runner.current.batch == 16  # padding rows 8 .. 15
    _same(got, ref)
    assert eos in got[3].tokens or len(got[3].tokens) == reqs[3].max_new


def test_rows_do_not_depend_on_batch_mates(model) -> None:
    reqs = [ARRequest(p, 9, seed=i) for i, p in enumerate(_prompts(5, seed=1))]
    runner = FusedRunner(model, batch_sizes=(1, 8), lengths=(32,))
    runner.capture()
    together = ar_generate(model, reqs, 2, PAD, static=runner)
    for r, t in zip(reqs, together, strict=True):
        assert ar_generate(model, [r], 2, PAD, static=runner)[0].tokens == t.tokens
    assert runner.current.batch == 1  # the last call took the one-row window


@pytest.mark.parametrize("trim", [True, False])
def test_seeded_sampling_equals_reference(model, trim: bool) -> None:
    prompts = _prompts(6, seed=2)
    settings = [(0.0, 0), (1.5, 0), (1.5, 5), (0.7, 20), (2.0, V + 10), (1.0, 1)]
    reqs = [ARRequest(p, 12, seed=10 + i, temperature=t, top_k=k)
            for i, (p, (t, k)) in enumerate(zip(prompts, settings, strict=True))]  # fmt: skip
    reqs.append(ARRequest(prompts[1], 12, seed=10 + 1, temperature=1.5))  # same seed, same draw
    runner = FusedRunner(model, batch_sizes=(8,), lengths=(32,), check_every=4)
    runner.fused.trim = trim
    runner.capture(sample=True)
    eos = _mid_row_eos(model, [ARRequest(r.prompt, r.max_new) for r in reqs])
    ref = ar_generate(model, reqs, eos, PAD)
    got = ar_generate(model, reqs, eos, PAD, static=runner)
    _same(got, ref)
    assert got[-1].tokens == got[1].tokens
    assert len({tuple(g.tokens) for g in got[1:5]}) > 1  # they sample, not argmax


def test_choose_matches_sample_tokens_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(3 * torch.randn(64, V, generator=g), -1)
    temp = torch.rand(64, generator=g) * 2
    temp[::5] = 0.0  # greedy rows
    top_k = torch.randint(0, V + 5, (64,), generator=g)
    top_k[::3] = 0
    u = torch.rand(64, generator=g)
    nxt, p = choose(logp, u, temp, top_k, sample=True)
    for i in range(64):
        t, k = float(temp[i]), int(top_k[i])
        want = int(logp[i].argmax()) if t == 0 else \
            int(sample_tokens(logp[i : i + 1], t, k, u[i : i + 1])[0])  # fmt: skip
        assert int(nxt[i]) == want, (i, t, k)
    torch.testing.assert_close(p, logp.gather(-1, nxt[:, None]).squeeze(-1).exp())
    greedy, _ = choose(logp, u, temp, top_k, sample=False)
    assert torch.equal(greedy, logp.argmax(-1))


@torch.no_grad()
def test_fused_steps_equal_hf_log_probs(model) -> None:
    """Step by step through `decode_logp` (full window, padded rows, stale cache): the same
    log-probabilities as Hugging Face's forward with its growing cache."""
    from yan_serve.ar.generate import left_pad

    reqs = [ARRequest(p, 8) for p in ([5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15])]
    ids, att, pos = left_pad(reqs, PAD, torch.device("cpu"))
    s = FusedGPT2(model, 4, 24)
    s.k.fill_(1e4)  # stale garbage from "earlier requests" must stay masked
    s.v.fill_(-1e4)
    hf = HFRunner(model)
    a, b = s.prefill(ids, att, pos, 4), hf.start(ids, att, pos, 8)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    step = s.fused_step_fn(4, 24, sample=False)
    captured = {}
    body = s.body
    s.body = lambda *args: captured.setdefault("logp", []).append(body(*args)) or \
        captured["logp"][-1]  # fmt: skip
    for t in range(6):
        tok = torch.tensor([20 + t, 30 + t, 40 + t])
        s.tok[:3] = tok
        step()
        ref = hf.step(tok)
        torch.testing.assert_close(captured["logp"][-1][:3], ref, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(captured["logp"][-1]).all()  # the padding row too
    assert int(s.slot) == ids.shape[1] + 6


@torch.no_grad()
def test_cpu_output_projection_reads_a_fresh_transposed_table() -> None:
    """The CPU step's [d, V] copy of the tied embedding gives the same log-probs as the table
    itself, and follows an in-place change of the weights (a stale copy would decode with the
    old embedding)."""
    model = _model(seed=4)
    reqs = [ARRequest(p, 6, ignore_eos=True) for p in _prompts(2, seed=5)]
    runner = FusedRunner(model, batch_sizes=(2,), lengths=(32,))
    runner.capture()
    head = runner.fused.head_t()
    wte = model.transformer.wte.weight
    assert head is not None and head.shape == (wte.shape[1], wte.shape[0]) and head.is_contiguous()
    x = torch.randn(3, wte.shape[1])
    torch.testing.assert_close(x @ head, torch.nn.functional.linear(x, wte))
    _same(ar_generate(model, reqs, 2, PAD, static=runner), ar_generate(model, reqs, 2, PAD))
    wte.mul_(-1.5)  # an in-place load, as load_state_dict does
    assert runner.fused.head_t() is not head
    torch.testing.assert_close(runner.fused.head_t(), wte.t())
    _same(ar_generate(model, reqs, 2, PAD, static=runner), ar_generate(model, reqs, 2, PAD))


def test_batches_no_window_holds_fall_back_to_hf(model) -> None:
    runner = FusedRunner(model, batch_sizes=(1, 2), lengths=(16,))
    runner.capture()
    assert not runner.fits(3, 4, 4) and not runner.fits(1, 10, 7) and runner.fits(2, 10, 6)
    reqs = [ARRequest([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 8, ignore_eos=True)]
    got = ar_generate(model, reqs, 2, PAD, static=runner)
    assert runner.current is None  # never started: the HF runner served it
    assert got[0].tokens == ar_generate(model, reqs, 2, PAD)[0].tokens
    with pytest.raises(ValueError, match="no captured window"):
        runner.generate([ARRequest([1] * 10, 7)], 2, PAD)


def test_unsupported_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="tied"):
        FusedGPT2(_model(tie_word_embeddings=False), 2, 16)
    with pytest.raises(ValueError, match="n_positions"):
        FusedGPT2(_model(), 2, 200)


def test_versus_shapes_and_floor() -> None:
    from yan_serve.bench.versus import ar_floor_ms, ar_model, fim_budget, protocol_shape

    assert fim_budget(512) == 51 + 26 + 1
    assert protocol_shape("complete") == (128, 129, 128)
    assert protocol_shape("infill") == (512, 513, 512)
    m = ar_model("ar-tiny", 8192, "cpu", torch.float32)
    assert m.config.n_positions >= 513 + 512
    one, two = ar_floor_ms(m, 1, 10, 5, 1e9, 1e15), ar_floor_ms(m, 2, 10, 5, 1e9, 1e15)
    assert 0 < one < two < 2 * one  # the weights are read once per token whatever the batch
    # the roofline, derived again by hand for ar-tiny (fp32): bytes alone, flops alone, and
    # per pass the larger of the two
    d, layers, vocab, B, P, N = 192, 6, 8192, 2, 10, 5
    weights = sum(p.numel() for p in m.parameters()) - m.config.n_positions * d
    kv = B * layers * 2 * d * 4
    nbytes = N * weights * 4 + P * kv + sum((P + t + 1) * kv for t in range(N - 1))
    block = 12 * d * d * layers  # QKV 3d^2, out d^2, MLP 8d^2 per layer
    flops = B * (2 * block * P + 2 * layers * d * P * (P + 1) + 2 * d * vocab)
    flops += sum(
        B * (2 * block + 4 * layers * d * (P + t + 1) + 2 * d * vocab) for t in range(N - 1)
    )
    assert ar_floor_ms(m, B, P, N, 1e9, math.inf) == pytest.approx(nbytes / 1e6)
    assert ar_floor_ms(m, B, P, N, math.inf, 1e12) == pytest.approx(flops / 1e9)
    # at 3 flops per byte the prefill is compute-bound and the decode steps memory-bound
    both = ar_floor_ms(m, B, P, N, 1e9, 3e9)
    assert max(nbytes / 1e6, flops / 3e6) < both < nbytes / 1e6 + flops / 3e6


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("trim,check_every", [(True, 1), (False, 4)])
@pytest.mark.parametrize("sampled", [False, True])
def test_fused_linear_step_equals_reference(model, backend: str, trim: bool, check_every: int,
                                            sampled: bool) -> None:  # fmt: skip
    """`step="triton"`: every linear layer through `ops.fused_linear` (norm prologue, tanh GELU
    and residual epilogues, Conv1D weights read transposed), the attention with its cache
    writes through `ops.decode_attention`, and a greedy window's end through
    `ops.greedy_select` (the Triton interpreter on a CPU): greedy rows alone, or with sampled
    rows (the sampling window), EOS mid-batch, a row ignoring EOS, padding rows: the
    reference's tokens."""
    from yan_kernels import ops

    reqs = [ARRequest(p, 5 + 2 * i, seed=i, temperature=0.8 if sampled and i % 2 else 0.0,
                      top_k=5 * (i % 3)) for i, p in enumerate(_prompts(5, seed=4))]  # fmt: skip
    reqs[2].ignore_eos = True
    eos = _mid_row_eos(model, [ARRequest(r.prompt, r.max_new) for r in reqs])
    runner = FusedRunner(model, batch_sizes=(8,), lengths=(40,), step="triton",
                         check_every=check_every)  # fmt: skip
    runner.fused.trim = trim
    with ops.force(backend):
        runner.capture()
        got = ar_generate(model, reqs, eos, PAD, static=runner)
    assert runner.current is not None and runner.current.batch == 8
    _same(got, ar_generate(model, reqs, eos, PAD))


def test_triton_step_with_split_attention_equals_reference(model, monkeypatch) -> None:
    """The attention's slots split over two programs per (row, head) (asked for three; the
    window has two blocks), as on a GPU (the interpreter's default is one), across every layer
    and step of a window sharing one set of arrival counters: the reference's tokens, and the
    counters back at zero."""
    from yan_kernels import decode_attention, ops

    monkeypatch.setattr(decode_attention, "default_splits", lambda *a: 3)
    reqs = [ARRequest(p, 5 + 2 * i, seed=i) for i, p in enumerate(_prompts(5, seed=4))]
    eos = _mid_row_eos(model, [ARRequest(r.prompt, r.max_new) for r in reqs])
    runner = FusedRunner(model, batch_sizes=(8,), lengths=(96,), step="triton")
    runner.fused.trim = False  # the whole window: 96 slots, two 64-slot blocks, two splits
    with ops.force("triton"):
        runner.capture()
        got = ar_generate(model, reqs, eos, PAD, static=runner)
    _same(got, ar_generate(model, reqs, eos, PAD))
    assert not runner.fused.attn_counts.any() and not runner.fused.select_counts.any()


def test_unknown_step_is_refused(model) -> None:
    with pytest.raises(ValueError, match="step must be one of torch, compile, triton"):
        FusedRunner(model, batch_sizes=(1,), lengths=(8,), step="cutlass")


@pytest.mark.slow
def test_compiled_step_equals_eager_in_every_window(model) -> None:
    """12 windows, more than dynamo's default recompile limit (8), each one generating: the
    compiled body serves them all (a server captures ~35) and equals the eager tokens."""
    runner = FusedRunner(model, batch_sizes=(1, 2, 4), lengths=(16, 24, 32, 40), step="compile")
    runner.fused.trim = False  # the windows' shapes only
    runner.capture()
    g = torch.Generator().manual_seed(3)
    for b, n in runner.windows:
        reqs = [ARRequest(torch.randint(3, V, (n - 6,), generator=g).tolist(), 6, seed=i)
                for i in range(b)]  # fmt: skip
        got = ar_generate(model, reqs, 2, PAD, static=runner)
        cur = runner.current
        assert cur is not None and (cur.batch, cur.length) == (b, n)
        _same(got, ar_generate(model, reqs, 2, PAD))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("step", ["torch", "compile", "triton", "triton+pdl"])
def test_cuda_graph_fused_decoding_equals_reference(step: str) -> None:
    """Each step body in CUDA graphs; `triton+pdl`: its kernels chained by programmatic
    dependent launch (sm_90 and newer; elsewhere the plain launches)."""
    model = _model(device="cuda")
    body, _, pdl = step.partition("+")
    runner = FusedRunner(model, batch_sizes=(1, 8, 16), lengths=(32, 96), step=body,
                         pdl=bool(pdl))  # fmt: skip
    graphs, _ = runner.capture(sample=True)
    assert graphs == 12
    assert isinstance(runner.windows[(8, 96)].graphs[False], torch.cuda.CUDAGraph)
    gen = torch.Generator().manual_seed(0)
    reqs = [ARRequest(torch.randint(3, V, (int(n),), generator=gen).tolist(), 40, seed=i,
                      temperature=1.0 if i % 3 == 0 else 0.0, top_k=10 * (i % 2))
            for i, n in enumerate(torch.randint(1, 50, (13,), generator=gen))]  # fmt: skip
    eos = _mid_row_eos(model, reqs)
    ref = ar_generate(model, reqs, eos, PAD)
    got = ar_generate(model, reqs, eos, PAD, static=runner)
    assert runner.current is not None and runner.current.batch == 16
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    assert [g.hit_eos for g in got] == [r.hit_eos for r in ref]


def test_versus_times_each_ar_step(capsys) -> None:
    """`bench versus --ar-steps`: one row per step body, labelled, the YAN time shared."""
    from yan_serve.bench import main

    argv = ["versus", "--device", "cpu", "--batches", "1", "--protocols", "complete",
            "--iters", "1", "--no-ref", "--ar-steps", "torch,triton"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ar_steps=torch,triton" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("yan-tiny/ar-tiny")]
    assert [r[0] for r in rows] == ["yan-tiny/ar-tiny", "yan-tiny/ar-tiny+triton"]
    assert rows[0][3] == rows[1][3]  # the YAN ms, measured once per row
    assert all(float(r[5]) > 0 for r in rows)  # AR ms
    launches = {}
    for ln in out.splitlines():
        if ln.startswith("AR ") and "launches per token" in ln:
            launches[ln.split()[1]] = int(ln.split()[3])
    assert launches.keys() == {"torch", "triton"} and launches["triton"] < launches["torch"]


def test_versus_step_names_take_pdl_only_on_the_triton_step() -> None:
    import argparse

    from yan_serve.bench.versus import _step_list

    assert _step_list("triton,triton+pdl") == ["triton", "triton+pdl"]
    for bad in ("torch+pdl", "compile+pdl", "triton+"):
        with pytest.raises(argparse.ArgumentTypeError):
            _step_list(bad)
