"""YAN modules: masking, padding invariance, gate, experts, persistence, size.

Run: python -m pytest tests/model -q
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.conftest import micro_config
from yan_serve.config import YANConfig
from yan_serve.model import YAN
from yan_serve.model.layers import MultiHeadAttention, sinusoidal_embedding


def _batch(
    lengths: list[int], L: int, vocab: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, vocab, (len(lengths), L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return toks.masked_fill(~mask, 0), mask


def _pad(x: torch.Tensor, extra: int, value=0) -> torch.Tensor:
    return F.pad(x, (0, extra), value=value) if x.dim() == 2 else F.pad(x, (0, 0, 0, extra))


def test_attention_matches_manual_softmax() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(24, 3, qkv_bias=True).eval()
    x, kv = torch.randn(2, 5, 24), torch.randn(2, 7, 24)
    qm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    km = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = attn(x, qm, kv, km)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, -1, 3, 8).transpose(1, 2)

    q, k, v = heads(attn.W_q(x)), heads(attn.W_k(kv)), heads(attn.W_v(kv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~km[:, None, None], float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 24)
    ref = attn.out_proj(ref) * qm[..., None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out[0, 3:].abs().max() == 0  # padding queries stay silent


def test_sinusoidal_embedding_shape_and_values() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    e = sinusoidal_embedding(t, 8)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert math.isclose(e[2, 0].item(), math.sin(1.0), rel_tol=1e-6)
    assert sinusoidal_embedding(t, 7).shape == (3, 7)


def test_encoder_padding_invariance(micro_model: YAN) -> None:
    toks, mask = _batch([5, 9, 3], 9, micro_model.config.vocab_size)
    z = micro_model.encode(toks, mask)
    z_pad = micro_model.encode(_pad(toks, 6), _pad(mask, 6, False))
    torch.testing.assert_close(z_pad[:, :9][mask], z[mask], rtol=1e-5, atol=1e-5)
    assert z_pad[~_pad(mask, 6, False)].abs().max() == 0


def test_flow_padding_invariance(micro_model: YAN) -> None:
    """Trunk, gate and experts at valid target positions ignore appended source/target padding."""
    m, V = micro_model, micro_model.config.vocab_size
    src, sm = _batch([4, 7], 7, V, seed=1)
    tm = torch.tensor([[1] * 6 + [0] * 2, [1] * 8], dtype=torch.bool)
    z = torch.randn(2, 8, 32)
    t = torch.tensor([0.3, 0.8])

    def run(src, sm, z, tm):
        cond = m.condition(m.encode(src, sm), sm, tm)
        s = m.flow.trunk(z, t, cond)
        return s.h, m.flow.gate_logits(s), m.flow.expert_fields(s)

    base = run(src, sm, z, tm)
    padded = run(_pad(src, 3), _pad(sm, 3, False), _pad(z, 5), _pad(tm, 5, False))
    for a, b in zip(base, padded, strict=True):
        torch.testing.assert_close(b[:, :8][tm], a[tm], rtol=1e-5, atol=1e-5)


def test_gate_is_exactly_uniform_at_padding(micro_model: YAN) -> None:
    m = micro_model
    src, sm = _batch([3, 5], 5, m.config.vocab_size)
    tm = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    s = m.flow.trunk(torch.randn(2, 4, 32), torch.zeros(2), m.condition(m.encode(src, sm), sm, tm))
    probs = m.flow.gate_logits(s).softmax(-1)
    K = m.config.moe_n_experts
    assert torch.equal(probs[~tm], torch.full_like(probs[~tm], 1.0 / K))
    assert not torch.allclose(probs[tm], torch.full_like(probs[tm], 1.0 / K))


def test_gate_temperature_divides_logits() -> None:
    torch.manual_seed(0)
    a = YAN(micro_config())
    b = YAN(micro_config(moe_gate_temperature=2.5))
    b.load_state_dict(a.state_dict())
    src, sm = _batch([4], 4, 61)
    tm = torch.ones(1, 3, dtype=torch.bool)
    z, t = torch.randn(1, 3, 32), torch.tensor([0.4])
    la = a.flow.gate_logits(a.flow.trunk(z, t, a.condition(a.encode(src, sm), sm, tm)))
    lb = b.flow.gate_logits(b.flow.trunk(z, t, b.condition(b.encode(src, sm), sm, tm)))
    torch.testing.assert_close(lb * 2.5, la)


def test_routed_expert_equals_all_experts_gather(micro_model: YAN) -> None:
    ex = micro_model.flow.experts
    h = torch.randn(3, 11, 32)
    e = torch.randint(0, ex.n_experts, (3, 11))
    e[0] = 1  # one expert owning a whole row; another possibly absent
    all_f = ex.all(h)
    ref = all_f.gather(2, e[..., None, None].expand(-1, -1, 1, 32)).squeeze(2)
    torch.testing.assert_close(ex.routed(h, e), ref, rtol=1e-5, atol=1e-6)
    # each expert really is the FFN of its own weights
    k = 2
    manual = F.gelu(h @ ex.w1[k] + ex.b1[k]) @ ex.w2[k] + ex.b2[k]
    torch.testing.assert_close(all_f[:, :, k], manual, rtol=1e-5, atol=1e-6)


def test_latent_noise_only_when_asked(micro_model: YAN) -> None:
    toks, mask = _batch([6], 6, 61)
    a = micro_model.encode(toks, mask)
    torch.testing.assert_close(micro_model.encode(toks, mask), a)
    g = torch.Generator().manual_seed(3)
    noisy = micro_model.encode(toks, mask, add_noise=True, generator=g)
    assert (noisy - a).abs().max() > 1e-4
    # u ~ U(0, latent_noise): the perturbation is bounded in expectation by latent_noise
    assert (noisy - a).std() < 3 * micro_model.config.latent_noise


def test_state_dict_is_unshared_and_round_trips_through_safetensors(
    micro_model: YAN, tmp_path
) -> None:
    sd = micro_model.state_dict()
    ptrs = [t.data_ptr() for t in sd.values()]
    assert len(ptrs) == len(set(ptrs)), "a tensor is registered under two names"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    micro_model.config.save(tmp_path)
    with torch.device("meta"):
        fresh = YAN(YANConfig.load(tmp_path))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    fresh.eval()
    toks, mask = _batch([5, 2], 5, 61)
    torch.testing.assert_close(fresh.encode(toks, mask), micro_model.encode(toks, mask))
    z = torch.randn(2, 5, 32)
    torch.testing.assert_close(fresh.decode_logits(z), micro_model.decode_logits(z))


def test_parameter_names_follow_the_reference_layout(micro_model: YAN) -> None:
    names = set(micro_model.state_dict())
    for n in [
        "tok_emb.weight",
        "pos_emb.weight",
        "encoder.trf_blocks.0.self_att.W_q.weight",
        "encoder.trf_blocks.1.ff.layers.2.bias",
        "encoder.trf_blocks.0.norm_self_att.scale",
        "encoder.final_norm.shift",
        "decoder.resi_blocks.0.norm.scale",
        "decoder.lm_head.bias",
        "flow.time_emb.1.weight",
        "flow.trf_blocks.2.cross_att.out_proj.weight",
        "flow.trf_blocks.0.adaLN.1.weight",
        "flow.final_norm.scale",
        "flow.gate.0.weight",
        "flow.gate.2.bias",
        "flow.experts.w1",
    ]:
        assert n in names, n
    assert "flow.trf_blocks.1.cross_att.W_q.weight" not in names  # block 1 has no cross-attention
    assert micro_model.pos_emb.weight.shape[0] == micro_model.config.max_length + 1
    assert micro_model.flow.trf_blocks[0].adaLN[1].out_features == 6 * 32
    assert micro_model.flow.trf_blocks[1].adaLN[1].out_features == 4 * 32


def test_too_long_inputs_are_rejected(micro_model: YAN) -> None:
    toks = torch.full((1, 41), 5)
    with pytest.raises(ValueError, match="max_length 40"):
        micro_model.encode(toks, torch.ones_like(toks, dtype=torch.bool))


def test_paper_preset_is_about_200m_parameters() -> None:
    with torch.device("meta"):
        model = YAN(YANConfig.from_name("yan-paper"))
    n = model.num_parameters()
    assert 195e6 < n < 215e6, n
    assert model.config.vocab_size == 128258


def test_params_command_prints_the_count() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "yan_serve.cli", "params", "yan-paper"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert 195 < float(total.split()[1].rstrip("M")) < 215
    bad = subprocess.run(
        [sys.executable, "-m", "yan_serve.cli", "params", "yan-nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "unknown preset" in bad.stderr
