"""Shared fixtures. Run: `python -m pytest -q`; GPU tests are marked `gpu`."""

from __future__ import annotations

import pytest
import torch

from yan_serve.config import YANConfig
from yan_serve.model import YAN


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def micro_config(**overrides) -> YANConfig:
    """A model small enough that a test can build dozens of them."""
    base = dict(
        vocab_size=61,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        mask_token_id=3,
        max_length=40,
        d_model=32,
        attention_heads=4,
        encoder_n_trf_blocks=2,
        n_trf_blocks=3,
        cross_att_idx=(0, 2),
        decoder_n_resi_blocks=1,
        moe_n_experts=3,
        moe_sigma=0.5,
        dropout=0.0,
        name="micro",
    )
    base.update(overrides)
    return YANConfig(**base)


@pytest.fixture
def micro_cfg() -> YANConfig:
    return micro_config()


@pytest.fixture
def micro_model(micro_cfg: YANConfig) -> YAN:
    torch.manual_seed(0)
    return YAN(micro_cfg).eval()
