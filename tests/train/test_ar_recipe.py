"""scripts/train_ar.sh trains the AR baseline sized like the YAN model it is compared with:
CONFIG (YAN's preset, as train_default.sh and gpu_train.sh's RECIPE=both read it) picks the GPT-2
preset unless AR_CONFIG names one. A step or two of each on a small stand-in corpus.

Run: python -m pytest tests/train/test_ar_recipe.py -q
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import write_stand_in_corpus
from yan_serve.ar.model import load_ar

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("knobs", "preset"),
    [
        ({"CONFIG": "yan-small"}, "ar-small"),
        ({"CONFIG": "yan-tiny", "AR_CONFIG": "ar-small"}, "ar-small"),
        ({}, "ar-tiny"),
    ],
    ids=["yan-small", "named", "default"],
)
def test_the_ar_recipe_trains_the_preset_sized_like_config(tmp_path: Path, knobs, preset) -> None:
    data = write_stand_in_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    env = {**os.environ, "OUT": str(out), "DATA": str(data), "DEVICE": "cpu",
           "TOKENIZER": str(ROOT / "weights/yan-tiny-kjv"), "S1": "1", "S2": "1", "FT": "1",
           "FILL": "0", "ANNEAL": "0", "DECAY": "1", "BS": "2", "EVAL": "0",
           "OMP_NUM_THREADS": "1", **knobs}  # fmt: skip
    for k in ("CONFIG", "AR_CONFIG"):
        if k not in knobs:
            env.pop(k, None)
    r = subprocess.run(["bash", str(ROOT / "scripts/train_ar.sh")], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("pretrain", "finetune"):  # the fine-tune continues the pre-trained preset
        model = load_ar(out / stage)
        assert model.config.yan_preset == preset, stage
        assert model.config.yan_max_length == 256  # the tokenizer's checkpoint's max_length
