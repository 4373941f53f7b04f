"""Shared fixtures and the suite's order. Run: `python -m pytest -q` (CI and the README add
`-n 2 --dist loadfile --no-loadscope-reorder`: two workers); GPU tests are marked `gpu`."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():  # Triton's CPU interpreter must be chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from yan_serve.config import YANConfig
from yan_serve.model import YAN

# Test files collected before all others. The suite runs on two workers a file at a time in
# collection order (`-n 2 --dist loadfile --no-loadscope-reorder`, README and CI): the compile
# guard's full compiles (~10 minutes of both cores) then start at once beside the rest of the
# suite, instead of being dealt last and running alone at the end.
FIRST_FILES = ("kernels/test_compile_guard.py",)
TESTS = Path(__file__).resolve().parent


def _first(item: pytest.Item) -> bool:
    return any(item.path == TESTS / f for f in FIRST_FILES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not _first(item))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` imported as the module `name` (registered in sys.modules, where
    dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


STAND_IN_VERSES = [  # (section, text)
    ("law", "In the beginning God created the heaven and the earth."),
    ("law", "And God said, Let there be light: and there was light."),
    ("history", "And it came to pass after these things, that the king sent unto the city."),
    ("wisdom", "The LORD is my shepherd; I shall not want."),
    ("prophets", "Comfort ye, comfort ye my people, saith your God."),
    ("gospels", "Blessed are the meek: for they shall inherit the earth."),
    ("epistles", "Charity suffereth long, and is kind; charity envieth not."),
    ("revelation", "And I saw a new heaven and a new earth."),
]


def write_stand_in_corpus(directory: Path) -> Path:
    """A 32-passage corpus directory (train.jsonl, val.jsonl) in the `yan data kjv` row format,
    every section present: enough for a recipe script to run a few steps without the `bible`
    program."""
    directory.mkdir(parents=True, exist_ok=True)
    verses = STAND_IN_VERSES
    for split in ("train", "val"):
        rows = [{"id": f"{split} {i}", "book": "Genesis", "section": sec, "split": split,
                 "text": f"{text} {verses[(i + 1) % len(verses)][1]}"}
                for i, (sec, text) in enumerate(verses * 4)]  # fmt: skip
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


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


YAN_DEFAULT = Path(__file__).resolve().parents[1] / "weights" / "yan-tiny-kjv"


@pytest.fixture(scope="session")
def ar_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ar-tiny GPT-2 on the shipped tokenizer: enough to exercise the AR backend
    (outputs are noise; the trained baseline is weights/ar-tiny-kjv)."""
    import shutil

    import torch
    from transformers import GPT2LMHeadModel

    from yan_serve.ar.model import ar_config, save_ar
    from yan_serve.tokenizer import YANTokenizer

    out = tmp_path_factory.mktemp("ar-random")
    tok = YANTokenizer.load(YAN_DEFAULT)
    torch.manual_seed(0)
    save_ar(GPT2LMHeadModel(ar_config(tok, 256, "ar-tiny")), tok, out)
    shutil.copy(YAN_DEFAULT / "labels.json", out / "labels.json")
    return out
