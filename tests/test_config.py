"""Config presets, validation, config.json round-trips. Run: pytest tests/test_config.py"""

from __future__ import annotations

import json

import pytest

from yan_serve.config import PRESETS, YANConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name: str, tmp_path) -> None:
    cfg = YANConfig.from_name(name)
    assert cfg.name == name
    cfg.save(tmp_path)
    assert YANConfig.load(tmp_path) == cfg
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == cfg.d_model


def test_paper_preset_matches_the_paper() -> None:
    cfg = YANConfig.from_name("yan-paper")
    assert (cfg.d_model, cfg.encoder_n_trf_blocks, cfg.n_trf_blocks) == (512, 6, 8)
    assert cfg.cross_att_idx == (0, 1, 2, 4)
    assert (cfg.decoder_n_resi_blocks, cfg.moe_n_experts, cfg.moe_sigma) == (1, 6, 0.1)
    assert (cfg.max_length, cfg.vocab_size) == (2048, 128258)
    assert (cfg.pad_token_id, cfg.mask_token_id) == (128256, 128257)


def test_overrides_apply() -> None:
    assert YANConfig.from_name("yan-tiny", moe_n_experts=7).moe_n_experts == 7


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(d_model=130, attention_heads=4), "divisible"),
        (dict(cross_att_idx=(5,), n_trf_blocks=2), "cross_att_idx"),
        (dict(vocab_size=10, eos_token_id=12), "eos_token_id"),
        (dict(moe_n_experts=0), "moe_n_experts"),
        (dict(moe_sigma=0.0), "moe_sigma"),
        (dict(ode_steps=0), "ode_steps"),
        (dict(infill_masks="sideways"), "infill_masks"),
    ],
)
def test_invalid_configs_name_the_field(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        YANConfig(**bad)


def test_unknown_preset_and_keys(tmp_path) -> None:
    with pytest.raises(ValueError, match="yan-tiny"):
        YANConfig.from_name("yan-huge")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        YANConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        YANConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        YANConfig.load(tmp_path / "missing")


def test_infill_layout_round_trips_and_old_configs_read_as_collapsed(tmp_path) -> None:
    cfg = YANConfig(infill_masks="per_position")
    cfg.save(tmp_path)
    assert YANConfig.load(tmp_path).infill_masks == "per_position"
    old = cfg.to_dict()
    del old["infill_masks"]  # a checkpoint saved before the field existed
    assert YANConfig.from_dict(old).infill_masks == "collapsed"
