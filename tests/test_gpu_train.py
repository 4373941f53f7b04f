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

from tests.conftest import write_stand_in_corpus
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
    # continuing a checkpoint with no stage to run is refused before anything trains
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv/train.jsonl").touch()
    env = {**os.environ, "INIT": "weights/yan-tiny-kjv", "FILL": "0", "ANNEAL": "0",
           "DATA": str(tmp_path / "kjv"), "OUT": str(tmp_path / "run")}  # fmt: skip
    r = subprocess.run(["bash", str(ROOT / "scripts/train_default.sh")], env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "set FILL or ANNEAL" in r.stderr
    # from scratch, a recipe with no fine-tuning stage at all is refused too
    env = {**env, "INIT": "", "FT": "0", "FILL": "0"}
    r = subprocess.run(["bash", str(ROOT / "scripts/train_default.sh")], env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "no fine-tuning stage" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_failing_in_its_first_stage_brings_its_error_back(tmp_path: Path) -> None:
    """A recipe that dies before any stage's `done:` line (on a GPU: out of memory, a compile
    error) still prints its log's tail and returns train.tar.gz with train.out; under
    RECIPE=both, both.out holds each run's error."""
    data = tmp_path / "kjv"
    data.mkdir()
    (data / "train.jsonl").touch()
    env = {**os.environ, "DATA": str(data), "DEVICE": "cpu", "CONFIG": "yan-bogus",
           "MINUTES": "1"}  # fmt: skip
    r = subprocess.run(["bash", str(SCRIPT)], env={**env, "OUT": str(tmp_path / "one")},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0
    assert "unknown preset 'yan-bogus'" in r.stdout, r.stdout + r.stderr
    back = tmp_path / "one/gpu-train/train.tar.gz"
    listing = subprocess.run(["tar", "-tzf", str(back)], capture_output=True, text=True)
    assert "train.out" in listing.stdout.split()
    # both runs continue the shipped checkpoints and fail at once: the corpus has no val split
    env = {
        **env,
        "OUT": str(tmp_path / "both"),
        "RECIPE": "both",
        "CONFIG": "yan-tiny",
        "INIT": str(ROOT / "weights/yan-tiny-kjv"),
        "AR_INIT": str(ROOT / "weights/ar-tiny-kjv"),
    }
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode != 0
    both = (tmp_path / "both/gpu-train/both.out").read_text()
    assert both.count("val.jsonl") >= 2, both
    for run in ("yan", "ar"):
        part = tmp_path / f"both/gpu-train/{run}.tar.part-aa"
        listing = subprocess.run(["tar", "-tf", str(part)], capture_output=True, text=True)
        assert "./train.tar.gz" in listing.stdout.split(), listing.stdout


def test_unpack_refuses_a_folder_without_weights_and_keeps_the_old_ones(tmp_path: Path) -> None:
    """No model.safetensors.part-*: one line, exit 2, and the checkpoint already in DST (and
    its config) untouched; with parts, the weights are assembled whole and readable."""
    src, dst = tmp_path / "back", tmp_path / "ckpt"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (src / name).write_text('{"new": 1}')
        (dst / name).write_text('{"old": 1}')
    (dst / "model.safetensors").write_bytes(b"old weights")
    unpack = ["bash", str(SCRIPT), "--unpack", str(src), str(dst)]
    r = subprocess.run(unpack, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model.safetensors.part-" in r.stderr
    assert (dst / "model.safetensors").read_bytes() == b"old weights"
    assert (dst / "config.json").read_text() == '{"old": 1}'
    assert sorted(f.name for f in dst.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]  # fmt: skip
    (src / "tokenizer.json").unlink()  # a missing tokenizer is named before anything is copied
    (src / "model.safetensors.part-aa").write_bytes(b"new ")
    r = subprocess.run(unpack, capture_output=True, text=True)
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr
    assert (dst / "model.safetensors").read_bytes() == b"old weights"
    (src / "tokenizer.json").write_text('{"new": 1}')
    (src / "model.safetensors.part-ab").write_bytes(b"weights")
    subprocess.run(unpack, check=True, capture_output=True)
    assert (dst / "model.safetensors").read_bytes() == b"new weights"
    assert (dst / "model.safetensors").stat().st_mode & 0o044  # not mktemp's 0600
    assert sorted(f.name for f in dst.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]  # fmt: skip


def stage_summaries(both_out: str) -> dict[str, set[str]]:
    """Each run's distinct `done: ...` lines (one per training stage) in a RECIPE=both log."""
    runs: dict[str, set[str]] = {}
    run = None
    for line in both_out.splitlines():
        if line.startswith("=== ") and line.endswith(" ==="):
            run = line[4:-4]
            runs[run] = set()
        elif run is not None and line.startswith("done: "):
            runs[run].add(line)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["train_default", "train_ar", "both"])
def test_a_short_cpu_run_comes_back_within_the_limits_and_unpacks(
    tmp_path: Path, recipe: str
) -> None:
    """train_default / train_ar: one recipe from scratch. both: the YAN and AR recipes at once,
    continuing the shipped checkpoints (INIT, AR_INIT), each packed into its own archive parts
    and unpacked into its own checkpoint."""
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
    if recipe == "both":
        env["INIT"] = str(ROOT / "weights/yan-tiny-kjv")
        r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
        assert r.returncode == 2 and "set INIT and AR_INIT" in r.stderr  # one side only
        env["AR_INIT"] = str(ROOT / "weights/ar-tiny-kjv")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    back = list((tmp_path / "out/gpu-train").iterdir())
    assert len(back) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in back)
    ckpt, ar = tmp_path / "ckpt", tmp_path / "ar"
    unpack = ["bash", str(SCRIPT), "--unpack", str(tmp_path / "out/gpu-train"), str(ckpt)]
    if recipe == "both":
        assert {f.name for f in back} == {"both.out", "yan.tar.part-aa", "ar.tar.part-aa"}
        r = subprocess.run(unpack, capture_output=True, text=True)  # the AR folder is missing
        assert r.returncode != 0 and "AR" in r.stderr
        subprocess.run([*unpack, str(ar)], check=True)
        done = stage_summaries((ckpt / "both.out").read_text())
        assert [len(done["yan"]), len(done["ar"])] == [2, 1], done  # fill + anneal; fine-tune
        assert all(line.endswith(("/fill", "/anneal")) for line in done["yan"])
        # each continued checkpoint keeps its own tokenizer
        for got, init in ((ckpt, "yan-tiny-kjv"), (ar, "ar-tiny-kjv")):
            want = (ROOT / "weights" / init / "tokenizer.json").read_bytes()
            assert (got / "tokenizer.json").read_bytes() == want
    else:
        assert {"config.json", "tokenizer.json", "labels.json", "train.tar.gz",
                "model.safetensors.part-aa"} <= {f.name for f in back}  # fmt: skip
        subprocess.run(unpack, check=True)
        if recipe == "train_ar":
            ckpt, ar = None, ckpt
    if ar is not None and ar.exists():
        from yan_serve.ar.model import load_ar

        assert next(load_ar(ar).parameters()).dtype == torch.float32
        assert (ar / "generation_config.json").exists() and (ar / "train.out").exists()
        state = json.loads((ar / "logs/finetune/trainer_state.json").read_text())
        assert state["step"] == 6  # FT + FILL + ANNEAL fine-tuning steps
        # continuing: no pre-training, and a data order the shipped run never drew
        assert (ar / "logs/pretrain").exists() == (recipe != "both")
        if recipe == "train_ar":  # from scratch: the tokenizer a from-scratch YAN would share
            shared = data / "tokenizer-yan-tiny/tokenizer.json"
            assert (ar / "tokenizer.json").read_text() == shared.read_text()
        assert state["train_config"]["seed"] == (2 if recipe == "both" else 0)
    if ckpt is None:
        return
    assert (ckpt / "train.out").exists()
    model = from_pretrained(ckpt)
    assert model.config.infill_masks == "per_position"
    assert (ckpt / "logs/stage1").exists() == (recipe != "both")
    fill = json.loads((ckpt / "logs/fill/trainer_state.json").read_text())
    state = json.loads((ckpt / "logs/anneal/trainer_state.json").read_text())  # the last stage
    assert state["step"] == 2 and state["train_config"]["decay"] == 1
    seeds = (fill["train_config"]["seed"], state["train_config"]["seed"])
    assert seeds == ((2, 3) if recipe == "both" else (0, 1))


@pytest.mark.gpu
def test_the_lease_training_call_runs_on_cuda(tmp_path: Path) -> None:
    """What a GPU lease's training call runs (docs/gpu_session.md: RECIPE=both continuing the
    shipped pair), a few steps of each stage on CUDA with a small stand-in corpus: bf16
    autocast, the forked batch worker after CUDA is up, both processes on one GPU, the
    packing. The GPU check runs this before the lease spends minutes on the real call."""
    data = write_stand_in_corpus(tmp_path / "corpus")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(data), "DEVICE": "cuda",
           "RECIPE": "both", "INIT": str(ROOT / "weights/yan-tiny-kjv"),
           "AR_INIT": str(ROOT / "weights/ar-tiny-kjv"), "MINUTES": "3", "FT": "3", "FILL": "3",
           "ANNEAL": "3", "BS": "16"}  # fmt: skip
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    log = (tmp_path / "out/gpu-train/both.out").read_text()
    done = stage_summaries(log)  # YAN fill + anneal, the AR's fine-tune, each on the GPU
    assert [len(done["yan"]), len(done["ar"])] == [2, 1], log[-3000:]
    assert all(" on cuda; " in line for lines in done.values() for line in lines), done
    subprocess.run(["bash", str(SCRIPT), "--unpack", str(tmp_path / "out/gpu-train"),
                    str(tmp_path / "yan"), str(tmp_path / "ar")], check=True)  # fmt: skip
    assert from_pretrained(tmp_path / "yan").config.infill_masks == "per_position"
    state = json.loads((tmp_path / "ar/logs/finetune/trainer_state.json").read_text())
    assert state["step"] == 9 and state["train_config"]["device"] == "cuda"
