"""The fused inference engine against the model's modules (the reference).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/engine/test_fused.py
On CPU the engine runs twice: with the kernels' pure-torch references (`ops.force("ref")`) and
with the Triton kernels in the CPU interpreter; GPU tests (marked `gpu`) run yan-paper shapes.
"""

from __future__ import annotations

import pytest
import torch
from yan_kernels import ops

from tests.conftest import micro_config
from yan_serve.engine.fused import FusedEngine
from yan_serve.engine.launches import count_dispatched
from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.model import YAN


def _requests(vocab: int, seed: int = 0) -> list[GenerationRequest]:
    """Awkward batch: very different source and target lengths, a one-token source, a
    negative seed and one above 2**32; rows that sample (temperature, top-k) and one whose first
    positions must hold a content token (an infill gap's)."""
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    return [
        GenerationRequest(toks(5), 7, seed=1),
        GenerationRequest(toks(1), 13, seed=-3),
        GenerationRequest(toks(26), 2, seed=2**40 + 5),
        GenerationRequest(toks(11), 11, seed=7),
        GenerationRequest(toks(8), 9, seed=11, temperature=0.8),
        GenerationRequest(toks(3), 6, seed=12, temperature=1.3, top_k=5),
        GenerationRequest(toks(6), 8, seed=13, content=(0, 4)),
    ]


def _model(**overrides) -> YAN:
    torch.manual_seed(0)
    return YAN(micro_config(**overrides)).eval()


def _compare(model: YAN, steps: int, routing: str, reqs=None, linears="cublas",
             attention="auto") -> None:  # fmt: skip
    reqs = reqs or _requests(model.config.vocab_size)
    ref = Sampler(model, fused=False)
    fast = Sampler(model, fused=True)
    fast.engine.linears = linears
    fast.engine.attention = attention
    batch = ref.prepare(reqs)
    # the oracle: the modules with every kernel's pure-torch reference, whatever backend the
    # caller selected for the engine (the modules under "triton" would run the same kernels)
    with ops.force("ref"):
        noise = ref.draw(batch)
        want = ref.solve(batch, steps, routing, noise=noise)
        want_gen = ref.generate(reqs, steps, routing)
    got = fast.solve(batch, steps, routing, noise=noise)
    real = batch.tgt_mask
    assert torch.equal(got.expert[real], want.expert[real])
    torch.testing.assert_close(got.z[real], want.z[real], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.gate_probs[real], want.gate_probs[real], atol=2e-6, rtol=2e-5)
    for a, b in zip(fast.generate(reqs, steps, routing), want_gen, strict=True):
        assert a.full == b.full and a.expert == b.expert
        torch.testing.assert_close(
            torch.tensor(a.full_confidence), torch.tensor(b.full_confidence), atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("routing", ["argmax", "sample"])
@pytest.mark.parametrize("steps", [1, 3, 4])
def test_engine_equals_the_modules(backend: str, routing: str, steps: int) -> None:
    pytest.importorskip("triton")
    with ops.force(backend):
        _compare(_model(), steps, routing)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_gelu_epilogue_equals_the_modules(backend: str) -> None:
    """Every FFN's up-projection through `ops.linear_gelu` (the Triton GEMM with the exact GELU
    in its epilogue, in the interpreter off CUDA): the same sample as the modules."""
    pytest.importorskip("triton")
    with ops.force(backend):
        _compare(_model(decoder_n_resi_blocks=2), 3, "argmax", linears="gelu")


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("routing", ["argmax", "sample"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(decoder_n_resi_blocks=2),
        dict(cross_att_idx=(0, 1, 2), qkv_bias=True, encoder_n_trf_blocks=1),
        dict(cross_att_idx=(), decoder_n_resi_blocks=0),
    ],
)
def test_fused_linears_equal_the_modules(backend: str, routing: str, overrides: dict) -> None:
    """`linears="fused"`: every norm in the prologue of the GEMM after it, every residual in
    the epilogue of the GEMM before it (`ops.fused_linear`, the interpreter off CUDA), over
    biased and unbiased QKV, with and without cross-attention and decoder blocks: the same
    latents, experts and tokens as the modules."""
    pytest.importorskip("triton")
    with ops.force(backend):
        _compare(_model(**overrides), 3, routing, linears="fused")


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("linears", ["cublas", "fused"])
def test_triton_attention_equals_the_modules(backend: str, linears: str) -> None:
    """`attention="triton"` (`ops.attention`: key lengths instead of a mask, the keys split
    over programs; the interpreter off CUDA) in self- and cross-attention, on a batch of very
    different source and target lengths: the modules' latents, experts and tokens."""
    pytest.importorskip("triton")
    with ops.force(backend):
        _compare(_model(cross_att_idx=(0, 1, 2)), 3, "argmax", linears=linears,
                 attention="triton")  # fmt: skip


def test_fused_linears_run_mamba_mixers_as_modules() -> None:
    model = _model(encoder_use_mamba=True, flow_use_mamba=True, mamba_d_state=4)
    with ops.force("ref"):
        _compare(model, 3, "argmax", linears="fused")


def test_fused_linears_launch_fewer_kernels() -> None:
    """Per sample, on the CPU proxy: each block's norms leave their own launch for the GEMM
    after them and each residual add its own for the GEMM before it."""
    model = _model(decoder_n_resi_blocks=2)
    # greedy rows: a sampled or content row runs the decoder once more for its logits
    reqs = [r for r in _requests(model.config.vocab_size) if not r.temperature and not r.content]
    counts = {}
    for linears in ("cublas", "gelu", "fused"):
        fast = Sampler(model, fused=True)
        fast.engine.linears = linears
        with ops.force("ref"):
            ran = count_dispatched(lambda s=fast: s.generate(reqs, 3, "argmax"))
        counts[linears] = sum(ran.values())
    cfg = model.config
    E, n, C, m = (cfg.encoder_n_trf_blocks, cfg.n_trf_blocks, len(cfg.cross_att_idx),
                  cfg.decoder_n_resi_blocks)  # fmt: skip
    # "gelu" against "cublas": one GELU pass per FFN (the trunk's FFNs run in T - 1 = 2 passes)
    assert counts["cublas"] - counts["gelu"] == E + 2 * n + m, counts
    # "fused" against "gelu": 2 norms per encoder block; per trunk pass 2 per block and 1 per
    # cross-attention (the first norm and the final norm are one launch each either way); the
    # decoder's m blocks: m norms and the last block's separate residual add
    assert counts["gelu"] - counts["fused"] == 2 * E + 2 * (2 * n + C) + m + 1, counts


@pytest.mark.parametrize(
    "overrides",
    [
        dict(cross_att_idx=()),  # no cross-attention at all
        dict(cross_att_idx=(0, 1, 2), qkv_bias=True),  # every block crosses, biased QKV
        dict(decoder_n_resi_blocks=2, encoder_n_trf_blocks=1),
        dict(decoder_n_resi_blocks=0),
        dict(moe_gate_temperature=0.5, moe_n_experts=5),
    ],
)
def test_engine_covers_every_config_variant(overrides: dict) -> None:
    with ops.force("ref"):
        _compare(_model(**overrides), 3, "sample")


def test_engine_runs_mamba_mixers_as_modules() -> None:
    model = _model(encoder_use_mamba=True, flow_use_mamba=True, mamba_d_state=4)
    with ops.force("ref"):
        _compare(model, 3, "argmax")


def test_padding_rows_never_change_real_rows() -> None:
    """A request solved alone and inside a padded batch gets the same latent and experts."""
    model = _model()
    reqs = _requests(model.config.vocab_size, seed=3)
    fast = Sampler(model, fused=True)
    with ops.force("ref"):
        both = fast.generate(reqs, 3, "sample")
        for r, g in zip(reqs, both, strict=True):
            alone = fast.generate([r], 3, "sample")[0]
            assert alone.full == g.full and alone.expert == g.expert


def test_previews_equal_the_reference_previews() -> None:
    model = _model()
    reqs = _requests(model.config.vocab_size, seed=4)
    with ops.force("ref"):
        got = Sampler(model, fused=True).generate(reqs, 4, "argmax", return_previews=True)
        want = Sampler(model, fused=False).generate(reqs, 4, "argmax", return_previews=True)
    assert [g.previews for g in got] == [w.previews for w in want]


def test_refresh_follows_weight_updates() -> None:
    """The packed QKV, the step tables and the gate's time term are derived from the weights:
    after an in-place update the engine notices, re-derives them in place, and agrees again."""
    model = _model()
    fast = Sampler(model, fused=True)
    with ops.force("ref"):
        fast.generate(_requests(model.config.vocab_size), 3, "sample")
        engine = fast.engine
        assert isinstance(engine, FusedEngine) and not engine.stale()
        qkv = next(iter(engine._attn.values())).w_qkv
        mods = engine.tables(3).mods[0][0]
        with torch.no_grad():
            for blk in model.flow.trf_blocks:
                blk.adaLN[1].weight.mul_(1.5)
                blk.self_att.W_k.weight.add_(0.1)
            model.flow.gate[0].bias.add_(0.3)
            model.flow.time_emb[1].weight.mul_(0.7)
        assert engine.stale()
        assert fast.engine is engine and not engine.stale()  # refreshed, same object
        assert next(iter(engine._attn.values())).w_qkv is qkv  # in place: graphs stay valid
        assert engine.tables(3).mods[0][0] is mods
        _compare(model, 3, "sample")


def test_training_mode_uses_the_modules() -> None:
    model = _model()
    sampler = Sampler(model, fused=True)
    assert sampler.engine is not None
    model.train()
    assert sampler.engine is None  # dropout lives in the modules
    model.eval()


def test_engine_dispatches_far_fewer_ops() -> None:
    """The CPU proxy for launches per sample: the engine's count is well under half the
    modules' (packed QKV, per-step constants, fused residual + norm, hoisted cross K/V)."""
    model = _model()
    reqs = _requests(model.config.vocab_size)[:1]
    counts = {}
    with ops.force("ref"):
        for fused in (False, True):
            s = Sampler(model, fused=fused)
            s.generate(reqs, 3, "argmax")  # build the engine and its tables first
            counts[fused] = sum(
                count_dispatched(lambda s=s: s.generate(reqs, 3, "argmax")).values()
            )
    assert counts[True] < 0.5 * counts[False], counts


# --------------------------------------------------------------------------------- GPU
def _paper_model(dtype: torch.dtype) -> YAN:
    from yan_serve.config import YANConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        return YAN(YANConfig.from_name("yan-paper", dropout=0.0)).to(dtype).eval()


def _paper_requests(seed: int, shapes: list[tuple[int, int]]) -> list[GenerationRequest]:
    """(source length, target length) per request, random ids below the special tokens."""
    g = torch.Generator().manual_seed(seed)
    return [
        GenerationRequest(torch.randint(4, 128000, (n,), generator=g).tolist(), m, seed=i)
        for i, (n, m) in enumerate(shapes)
    ]


def _solve_both(a: Sampler, b: Sampler, reqs: list[GenerationRequest]):
    """The same padded batch and draws through two samplers: (batch, a's solve, b's solve)."""
    batch = a.prepare(reqs)
    noise = a.draw(batch)
    return batch, a.solve(batch, 3, "argmax", noise=noise), b.solve(batch, 3, "argmax", noise=noise)


@pytest.mark.gpu
@pytest.mark.parametrize("linears", ["cublas", "gelu", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_equals_the_modules_at_paper_shapes_on_gpu(dtype: torch.dtype, linears: str) -> None:
    model = _paper_model(dtype)
    reqs = _paper_requests(0, [(300, 257), (17, 512), (512, 1)])
    ref, fast = Sampler(model, fused=False), Sampler(model, fused=True)
    fast.engine.linears = linears
    batch, want, got = _solve_both(ref, fast, reqs)
    real = batch.tgt_mask
    err = (got.z[real].float() - want.z[real].float()).norm() / want.z[real].float().norm()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-3), float(err)
    agree = (got.expert[real] == want.expert[real]).float().mean()
    assert agree > (0.97 if dtype == torch.bfloat16 else 0.999), float(agree)
    tok_a = fast.decode(got.z)[0][real.cpu()]
    tok_b = ref.decode(got.z)[0][real.cpu()]
    assert (tok_a == tok_b).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "triton"])
def test_other_attention_equals_sdpa_at_paper_shapes_on_gpu(backend: str) -> None:
    """FlashAttention's variable-length kernel (padded keys skipped, Q/K/V read from the packed
    projections), and our split-key kernel (key lengths, no mask), against SDPA with the
    additive mask, on a padded batch: same latents at real positions up to bf16 rounding, the
    same experts."""

    model = _paper_model(torch.bfloat16)
    reqs = _paper_requests(1, [(300, 257), (17, 512), (512, 1), (1, 64)])
    sdpa, flash = Sampler(model, fused=True), Sampler(model, fused=True)
    sdpa.engine.attention, flash.engine.attention = "sdpa", backend
    assert flash.engine.uses_flash(next(model.parameters())) == (backend == "flash")
    batch, want, got = _solve_both(sdpa, flash, reqs)
    real = batch.tgt_mask
    err = (got.z[real].float() - want.z[real].float()).norm() / want.z[real].float().norm()
    assert err < 2e-2, float(err)
    assert (got.expert[real] == want.expert[real]).float().mean() > 0.97


def test_attention_backend_is_checked() -> None:
    model = _model()
    with pytest.raises(ValueError, match="attention must be one of"):
        FusedEngine(model, attention="xformers")
    eng = FusedEngine(model, attention="flash")
    with pytest.raises(ValueError, match="needs CUDA, 16-bit weights"):
        eng.uses_flash(next(model.parameters()))  # a CPU float32 model
    assert not FusedEngine(model).uses_flash(next(model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_key_bias_is_zero_at_real_keys_and_minus_inf_elsewhere(dtype: torch.dtype) -> None:
    """A prefix mask's additive form; a row with no real key attends everywhere (all zeros),
    as `key_padding_mask` does, rather than to nothing (NaN)."""
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    bias = FusedEngine.key_bias(mask, dtype)
    assert bias.shape == (3, 1, 1, 4) and bias.dtype == dtype
    inf = float("-inf")
    assert bias.flatten(1).tolist() == [[0, 0, inf, inf], [0, 0, 0, 0], [0, 0, 0, 0]]
