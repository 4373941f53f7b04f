"""scripts/gpu_train.sh, which trains the default recipe (or it and the AR baseline at once) on
a lent GPU in one call, run here on the CPU with a few steps: what comes back fits the device's
return limits (8 files, 16 MiB each) and unpacks into checkpoints that load."""

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
@pytest.mark.parametrize("recipe", ["train_default", "both"])
def test_a_short_cpu_run_comes_back_within_the_limits_and_unpacks(
    tmp_path: Path, recipe: str
) -> None:
    """train_default: the YAN recipe alone. both: the YAN and AR recipes at once, each packed
    into its own archive parts, unpacked into two checkpoints with one tokenizer."""
    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install bible-kjv (apt-get) for the recipe test")
        pytest.skip("the `bible` program (apt-get install bible-kjv) is not installed")
    data = tmp_path / "kjv"
    subprocess.run(["yan", "data", "kjv", "--out", str(data)], check=True, capture_output=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(data), "DEVICE": "cpu",
           "RECIPE": recipe,
           "MINUTES": "5", "S1": "2", "S2": "2", "FT": "2", "FILL": "2", "ANNEAL": "2", "BS": "4",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    back = list((tmp_path / "out/gpu-train").iterdir())
    assert len(back) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in back)
    yan, ar = tmp_path / "yan", tmp_path / "ar"
    unpack = ["bash", str(SCRIPT), "--unpack", str(tmp_path / "out/gpu-train"), str(yan)]
    if recipe == "both":
        assert {f.name for f in back} == {"both.out", "yan.tar.part-aa", "ar.tar.part-aa"}
        r = subprocess.run(unpack, capture_output=True, text=True)  # the AR folder is missing
        assert r.returncode != 0 and "AR" in r.stderr
        subprocess.run([*unpack, str(ar)], check=True)
        from yan_serve.ar.model import load_ar

        assert next(load_ar(ar).parameters()).dtype == torch.float32
        assert (ar / "generation_config.json").exists() and (ar / "train.out").exists()
        state = json.loads((ar / "logs/finetune/trainer_state.json").read_text())
        assert state["step"] == 6  # FT + FILL + ANNEAL fine-tuning steps
        assert (ar / "tokenizer.json").read_text() == (yan / "tokenizer.json").read_text()
        assert "=== yan ===" in (yan / "both.out").read_text()
    else:
        assert {"config.json", "tokenizer.json", "labels.json", "train.tar.gz",
                "model.safetensors.part-aa"} <= {f.name for f in back}  # fmt: skip
        subprocess.run(unpack, check=True)
    assert (yan / "train.out").exists()
    model = from_pretrained(yan)
    assert model.config.infill_masks == "per_position"
    assert (yan / "logs/fill/trainer_state.json").exists()
    state = json.loads((yan / "logs/anneal/trainer_state.json").read_text())  # the last stage
    assert state["step"] == 2 and state["train_config"]["decay"] == 1
