"""scripts/gpu_train.sh, which trains the default recipe on a lent GPU in one call, run here on
the CPU with a few steps: what comes back fits the device's return limits (8 files, 16 MiB
each) and unpacks into a checkpoint that loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from yan_serve.weights import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_train.sh"


def test_script_parses_and_refuses_a_missing_corpus(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "DATA": str(tmp_path / "none")}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "yan data kjv" in r.stderr
    r = subprocess.run(["bash", str(SCRIPT)], env={**env, "RECIPE": "train_gpt5"},
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "RECIPE must be" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["train_default", "train_ar"])
def test_a_short_cpu_run_comes_back_within_the_limits_and_unpacks(
    tmp_path: Path, recipe: str
) -> None:
    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install bible-kjv (apt-get) for the recipe test")
        pytest.skip("the `bible` program (apt-get install bible-kjv) is not installed")
    data = tmp_path / "kjv"
    subprocess.run(["yan", "data", "kjv", "--out", str(data)], check=True, capture_output=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(data), "DEVICE": "cpu",
           "RECIPE": recipe,
           "MINUTES": "5", "S1": "2", "S2": "2", "FT": "2", "FILL": "2", "ANNEAL": "2", "BS": "4",
           "OMP_NUM_THREADS": "2"}  # fmt: skip
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    back = list((tmp_path / "out/gpu-train").iterdir())
    assert len(back) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in back)
    assert {"config.json", "tokenizer.json", "labels.json", "train.tar.gz",
            "model.safetensors.part-aa"} <= {f.name for f in back}  # fmt: skip
    ckpt = tmp_path / "ckpt"
    subprocess.run(["bash", str(SCRIPT), "--unpack", str(tmp_path / "out/gpu-train"), str(ckpt)],
                   check=True)  # fmt: skip
    assert (ckpt / "train.out").exists()
    if recipe == "train_ar":
        from yan_serve.ar.model import load_ar

        assert next(load_ar(ckpt).parameters()).dtype == torch.float32
        assert (ckpt / "generation_config.json").exists()
        state = json.loads((ckpt / "logs/finetune/trainer_state.json").read_text())
        assert state["step"] == 6  # FT + FILL + ANNEAL fine-tuning steps
        return
    model = from_pretrained(ckpt)
    assert model.config.infill_masks == "per_position"
    assert (ckpt / "logs/fill/trainer_state.json").exists()
    state = json.loads((ckpt / "logs/anneal/trainer_state.json").read_text())  # the last stage
    assert state["step"] == 2 and state["train_config"]["decay"] == 1
