"""Converter from the paper author's checkpoints to our format.

The reference checkpoint is synthetic: a random micro YAN renamed back to the author's layout
(shared embeddings under several names, one FFN per expert with out-major weights), saved with
`torch.save` the way the author's trainer does. Converting it must give back a model whose
outputs are bit-identical to the source model's.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from tests.conftest import micro_config
from yan_serve.config import YANConfig
from yan_serve.convert import (
    ConversionWarning,
    add_subparser,
    config_from_reference,
    convert_checkpoint,
    convert_state_dict,
    load_reference_checkpoint,
)
from yan_serve.model import YAN

_REF_CONFIG_KEYS = (
    "d_model",
    "attention_heads",
    "encoder_n_trf_blocks",
    "n_trf_blocks",
    "cross_att_idx",
    "decoder_n_resi_blocks",
    "dropout",
    "max_length",
    "vocab_size",
    "qkv_bias",
    "moe_n_experts",
    "ode_steps",
    "moe_gate_temperature",
    "moe_gate_dim_multiplier",
    "moe_sigma",
    "latent_noise",
    "init_noise",
    "beta_a",
    "beta_b",
    "pad_token_id",
    "eos_token_id",
    "encoder_use_mamba",
    "flow_use_mamba",
    "mamba_d_state",
)
# the micro config's ids are not inferable (pad + 1 is BOS there), so tests pass them
_IDS = {"bos_token_id": 1, "mask_token_id": 3}


class _Opaque:
    """Not a tensor or plain container: torch.load(weights_only=True) must refuse it."""


# ------------------------------------------------------------------------------- helpers


def _source_model(**overrides: Any) -> YAN:
    """A random micro YAN; every parameter perturbed so no LayerNorm is left at 1/0."""
    torch.manual_seed(0)
    model = YAN(micro_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def to_reference_state_dict(model: YAN) -> dict[str, Tensor]:
    """Inverse of the converter: our names -> the author's (spec section 7)."""
    ref: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "tok_emb.weight":
            # one tensor under several names, as torch.save stores a shared module
            for alias in ("shared_tok_emb.weight", "encoder.tok_emb.weight"):
                ref[alias] = t
        elif name == "pos_emb.weight":
            for alias in ("shared_pos_emb.weight", "encoder.pos_emb.weight", "flow.pos_emb.weight"):
                ref[alias] = t
        elif name.startswith("flow.experts."):
            slot = name.rsplit(".", 1)[1]
            layer = "0" if slot in ("w1", "b1") else "2"
            param = "weight" if slot.startswith("w") else "bias"
            for k in range(t.shape[0]):
                # nn.Linear weights are out-major: layers.0.weight is [4d, d] = w1[k].T
                v = t[k].t().contiguous() if param == "weight" else t[k].clone()
                ref[f"flow.expert_out_proj.{k}.layers.{layer}.{param}"] = v
        else:
            ref[name] = t
    return ref


def reference_model_config(cfg: YANConfig) -> dict[str, Any]:
    mc = {k: getattr(cfg, k) for k in _REF_CONFIG_KEYS}
    mc["cross_att_idx"] = list(cfg.cross_att_idx)
    return mc


def save_reference(
    path: Path, model: YAN, sd: dict[str, Tensor] | None = None, **config_changes: Any
) -> Path:
    ckpt = {
        "model": to_reference_state_dict(model) if sd is None else sd,
        "step": 1234,
        "model_config": {**reference_model_config(model.config), **config_changes},
        "loss_config": {"a_fm": 1.0, "a_ce": 1.0},
        "trainer_config": {"lr": 1e-4, "warmup": 1000},
        "val_metrics": {"loss": 2.5},
    }
    torch.save(ckpt, path)
    return path


def _load_converted(out: Path) -> YAN:
    cfg = YANConfig.load(out)
    model = YAN(cfg).eval()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    return model


def _assert_same_outputs(a: YAN, b: YAN) -> None:
    g = torch.Generator().manual_seed(1)
    V, d, K = a.config.vocab_size, a.config.d_model, a.config.moe_n_experts
    src = torch.randint(4, V, (2, 7), generator=g)
    src_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    tgt_mask = torch.tensor([[1] * 5 + [0], [1] * 6], dtype=torch.bool)
    z = torch.randn(2, 6, d, generator=g)
    t = torch.tensor([0.0, 0.7])
    with torch.no_grad():
        ha, hb = a.encode(src, src_mask), b.encode(src, src_mask)
        assert torch.equal(ha, hb)
        assert torch.equal(a.decode_logits(z), b.decode_logits(z))
        sa = a.flow.trunk(z, t, a.condition(ha, src_mask, tgt_mask))
        sb = b.flow.trunk(z, t, b.condition(hb, src_mask, tgt_mask))
        assert torch.equal(sa.h, sb.h)
        assert torch.equal(sa.t_emb, sb.t_emb)
        assert torch.equal(a.flow.gate_logits(sa), b.flow.gate_logits(sb))
        fa, fb = a.flow.expert_fields(sa), b.flow.expert_fields(sb)
        assert fa.shape == (2, 6, K, d)
        assert torch.equal(fa, fb)
        assert fa[tgt_mask].abs().amax() > 0  # a real comparison, not of zeros


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "overrides",
    [{}, {"moe_n_experts": 11, "qkv_bias": True, "cross_att_idx": (1,)}],
    ids=["k3", "k11-qkv-bias"],  # 11 experts: expert 10 must not sort between 1 and 2
)
def test_converted_model_reproduces_the_source_exactly(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    source = _source_model(**overrides)
    src = save_reference(tmp_path / "ref-ckpt.pt", source)
    out = convert_checkpoint(src, tmp_path / "converted", overrides=_IDS)
    assert out == tmp_path / "converted"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    cfg = YANConfig.load(out)
    # the reference has one `ode_steps`, used for training and sampling alike
    want = {**source.config.to_dict(), "name": "ref-ckpt", "train_ode_steps": 3}
    assert cfg.to_dict() == want
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "converted_from": "ref-ckpt.pt", "step": "1234"}

    converted = _load_converted(out)
    for name, t in source.state_dict().items():
        assert torch.equal(converted.state_dict()[name], t), name
    _assert_same_outputs(source, converted)
    # a directory that holds files is refused (another model's tokenizer would stay beside)
    with pytest.raises(ValueError, match="not an empty directory"):
        convert_checkpoint(src, out, overrides=_IDS)


def test_state_dict_conversion_handles_wrappers_and_missing_primary_embedding() -> None:
    source = _source_model()
    ref = to_reference_state_dict(source)
    del ref["shared_tok_emb.weight"]  # only the submodule copy is left: it is used
    wrapped = {f"module._orig_mod.{k}": v for k, v in ref.items()}
    sd = convert_state_dict(wrapped, source.config)
    assert list(sd) == list(source.state_dict())
    for name, t in source.state_dict().items():
        assert torch.equal(sd[name], t), name


# ---------------------------------------------------------------------------- bad input


def test_mismatched_duplicate_embedding_is_an_error(tmp_path: Path) -> None:
    source = _source_model()
    ref = to_reference_state_dict(source)
    ref["flow.pos_emb.weight"] = ref["flow.pos_emb.weight"].clone()
    ref["flow.pos_emb.weight"][3, 5] += 1e-3
    with pytest.raises(ValueError, match=r"flow\.pos_emb\.weight.*shared_pos_emb\.weight"):
        convert_state_dict(ref, source.config)
    save_reference(tmp_path / "bad.pt", source, sd=ref)
    with pytest.raises(ValueError, match="differs"):
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out", overrides=_IDS)
    assert not (tmp_path / "out").exists()  # nothing written on failure


@pytest.mark.parametrize(
    "name",
    [
        "flow.expert_out_proj.2.layers.2.bias",
        "encoder.trf_blocks.1.norm_ff.scale",
        "flow.trf_blocks.2.cross_att.W_v.weight",
        "decoder.lm_head.bias",
        "flow.gate.0.weight",
    ],
)
def test_missing_tensor_is_named(name: str) -> None:
    source = _source_model()
    ref = to_reference_state_dict(source)
    del ref[name]
    with pytest.raises(ValueError, match=r"missing 1: " + name.replace(".", r"\.") + "$"):
        convert_state_dict(ref, source.config)


def test_missing_embedding_everywhere_is_named() -> None:
    source = _source_model()
    ref = to_reference_state_dict(source)
    for k in ("shared_tok_emb.weight", "encoder.tok_emb.weight"):
        del ref[k]
    with pytest.raises(ValueError, match=r"missing 1: shared_tok_emb\.weight"):
        convert_state_dict(ref, source.config)


def test_unexpected_tensor_is_named_unless_ignored() -> None:
    source = _source_model()
    ref = to_reference_state_dict(source)
    ref["encoder.trf_blocks.0.self_att.mask"] = torch.ones(4, 4)
    ref["flow.expert_out_proj.3.layers.0.bias"] = torch.zeros(128)  # a 4th expert, K = 3
    with pytest.raises(
        ValueError, match=r"unexpected 2: .*self_att\.mask, flow\.expert_out_proj\.3"
    ):
        convert_state_dict(ref, source.config)
    del ref["flow.expert_out_proj.3.layers.0.bias"]
    sd = convert_state_dict(ref, source.config, ignore=["*.self_att.mask"])
    assert set(sd) == set(source.state_dict())


def test_wrong_shape_is_an_error() -> None:
    source = _source_model()
    ref = to_reference_state_dict(source)
    ref["decoder.lm_head.weight"] = ref["decoder.lm_head.weight"][:-1]
    with pytest.raises(ValueError, match=r"shape mismatch.*decoder\.lm_head\.weight"):
        convert_state_dict(ref, source.config)
    # config says qkv_bias but the checkpoint has none: named as missing
    with pytest.raises(ValueError, match=r"missing \d+: .*W_k\.bias"):
        convert_state_dict(to_reference_state_dict(source), micro_config(qkv_bias=True))


@pytest.mark.parametrize("flag", ["encoder_use_mamba", "flow_use_mamba"])
def test_mamba_checkpoint_is_not_implemented(tmp_path: Path, flag: str) -> None:
    src = save_reference(tmp_path / "mamba.pt", _source_model(), **{flag: True})
    with pytest.raises(NotImplementedError, match="Mamba variant not supported yet"):
        convert_checkpoint(src, tmp_path / "out", overrides=_IDS)


def _one_line_value_error(path: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as ei:
        load_reference_checkpoint(path)
    assert "\n" not in str(ei.value)


def test_a_file_that_is_not_a_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\nat all\n")
    _one_line_value_error(text, "is not a torch checkpoint")

    torch.save({"model": {}}, tmp_path / "no_config.pt")
    _one_line_value_error(tmp_path / "no_config.pt", "'model' and 'model_config'")

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    _one_line_value_error(tmp_path / "tensor.pt", "got Tensor")

    torch.save({"model": {}, "model_config": {}, "extra": _Opaque()}, tmp_path / "pickled.pt")
    _one_line_value_error(tmp_path / "pickled.pt", r"weights_only=True\) refused it")

    with pytest.raises(FileNotFoundError):
        load_reference_checkpoint(tmp_path / "absent.pt")


# ------------------------------------------------------------------------------- config


def test_config_infers_the_paper_layout_and_warns_on_unknown_keys() -> None:
    paper = YANConfig.from_name("yan-paper")
    mc = {**reference_model_config(paper), "use_flash_attn": True}
    with pytest.warns(ConversionWarning, match="not used by the converter: use_flash_attn"):
        cfg = config_from_reference(mc)
    assert (cfg.pad_token_id, cfg.mask_token_id, cfg.bos_token_id) == (128256, 128257, 128000)
    assert cfg.ode_steps == cfg.train_ode_steps == paper.ode_steps
    for k in _REF_CONFIG_KEYS:
        assert getattr(cfg, k) == getattr(paper, k), k
    del mc["use_flash_attn"]
    cfg = config_from_reference(mc, mask_token_id=5, bos_token_id=6, ode_steps=4)
    assert (cfg.mask_token_id, cfg.bos_token_id, cfg.ode_steps) == (5, 6, 4)
    assert cfg.train_ode_steps == paper.ode_steps  # an override changes inference only


def test_config_defaults_and_failures() -> None:
    mc = reference_model_config(micro_config())
    for k in ("moe_sigma", "moe_gate_temperature", "latent_noise"):
        del mc[k]
    with pytest.warns(ConversionWarning, match="moe_sigma=1.0") as rec:
        cfg = config_from_reference(mc, **_IDS)
    assert "latent_noise" in str(rec[0].message)
    assert (cfg.moe_sigma, cfg.moe_gate_temperature) == (1.0, 1.0)  # the reference defaults

    full = reference_model_config(micro_config())
    with pytest.raises(ValueError, match="--bos-token-id"):
        config_from_reference(full, mask_token_id=3)
    with pytest.raises(ValueError, match="--mask-token-id"):  # pad + 1 is BOS here
        config_from_reference(full, bos_token_id=1)
    with pytest.raises(ValueError, match="--mask-token-id"):  # pad + 1 outside the vocabulary
        config_from_reference({**full, "pad_token_id": 60}, bos_token_id=1)
    with pytest.raises(ValueError, match=r"lacks required key.*d_model"):
        config_from_reference({k: v for k, v in full.items() if k != "d_model"}, **_IDS)
    with pytest.raises(ValueError, match="unknown YANConfig override"):
        config_from_reference(full, **_IDS, not_a_field=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete config converts without warnings
        assert (
            config_from_reference(full, **_IDS).to_dict()
            == micro_config(name="custom", train_ode_steps=3).to_dict()
        )


# ----------------------------------------------------------------------------------- CLI


def _word_tokenizer(directory: Path, mask: str = "<mask>") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", mask, "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text("{}\n")
    (directory / "README.md").write_text("not copied\n")
    return directory


_ID_ARGS = ("--mask-token-id", "3", "--bos-token-id", "1")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yan")
    add_subparser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_convert_with_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _source_model()
    src = save_reference(tmp_path / "ref.pt", source, extra_flag=1)
    tok_dir = _word_tokenizer(tmp_path / "tok")
    out = tmp_path / "model"
    args = _parser().parse_args(
        ["convert", str(src), str(out), "--tokenizer", str(tok_dir), *_ID_ARGS]
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    n = source.num_parameters()
    assert captured.out.strip() == (
        f"converted ref.pt -> {out}: {n / 1e6:.3f}M parameters, step 1234, ode_steps=3"
    )
    assert "extra_flag" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    _assert_same_outputs(source, _load_converted(out))


def test_cli_rejects_a_tokenizer_that_does_not_fit(tmp_path: Path) -> None:
    src = save_reference(tmp_path / "ref.pt", _source_model())
    tok_dir = _word_tokenizer(tmp_path / "tok", mask="<unused>")  # its mask would be appended
    args = _parser().parse_args(
        ["convert", str(src), str(tmp_path / "m"), "--tokenizer", str(tok_dir), *_ID_ARGS]
    )
    with pytest.raises(ValueError, match="wrong tokenizer"):
        args.func(args)
    assert not (tmp_path / "m").exists()
