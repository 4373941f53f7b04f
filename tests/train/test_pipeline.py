"""The documented recipe end to end, shortened: scripts/train_default.sh with a few steps per
stage on the real KJV corpus, then `yan eval` at every step count of the model card.

Needs the `bible` program (Debian package bible-kjv; .ci/run installs it).
Run: python -m pytest tests/train/test_pipeline.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from yan_serve.weights import SERVING_FILES, from_pretrained, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


# shape -> (environment, the stages it runs, the evaluated and published stage)
SHAPES = {
    # the default: stage 1 and stage 2 in the per-position layout, then straight to the fill
    # stage, which decays
    "default": ({"FILL": "4", "DECAY": "2"}, ("stage1", "stage2", "fill"), "fill"),
    # the earlier five-stage shape: the paper's layout up to the fill stage, + the paper-layout
    # fine-tune and the anneal; MODEL_SET overrides yan-tiny's fields from stage 1 on
    "five-stage": (
        {
            "FT": "8",
            "FILL": "4",
            "ANNEAL": "4",
            "DECAY": "2",
            "FOCUS_WEIGHT": "3",
            "ANNEAL_TASKS": "infill,complete,qa:2,classify",
            "S1_MASKS": "",
            "MODEL_SET": "dropout=0.05 moe_sigma=0.5",
        },
        ("stage1", "stage2", "finetune", "fill", "anneal"),
        "anneal",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shortened_default_recipe(tmp_path, shape) -> None:
    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install bible-kjv (apt-get) for the recipe test")
        pytest.skip("the `bible` program (apt-get install bible-kjv) is not installed")
    knobs, stages, final = SHAPES[shape]
    env = {**os.environ, "OUT": str(tmp_path / "run"), "DATA": str(tmp_path / "kjv"),
           "PUBLISH": str(tmp_path / "published"), "S1": "4", "S2": "4", **knobs,
           "BS": "4", "EVAL_LIMIT": "4", "DEVICE": "cpu", "OMP_NUM_THREADS": "2"}  # fmt: skip
    r = subprocess.run(["bash", str(ROOT / "scripts/train_default.sh")], env=env,
                       capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("stage1", "stage2", "finetune"):
        assert f"done: {stage}" in r.stderr
    # every fine-tuning stage (paper layout, fill, anneal) is a `finetune` run
    assert r.stderr.count("done: finetune") == len(stages) - 2
    assert {d.name for d in (tmp_path / "run").iterdir() if d.is_dir()} == set(stages)
    for stage in stages:
        d = tmp_path / "run" / stage
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in d.iterdir()
        }
    # the model's config fields from stage 1 on (MODEL_SET; yan-tiny's own otherwise)
    want = (0.05, 0.5) if "MODEL_SET" in knobs else (0.0, 1.0)
    for stage in stages:
        cfg = from_pretrained(tmp_path / "run" / stage).config
        assert (cfg.dropout, cfg.moe_sigma) == want, stage
    early = "per_position" if shape == "default" else "collapsed"  # S1_MASKS
    for stage in ("stage1", "stage2", "finetune"):
        if stage in stages:
            assert from_pretrained(tmp_path / "run" / stage).config.infill_masks == early
    # stage 1 trained on the corpus's shared tokenizer (built once: passages and QA stories)
    shared = tmp_path / "kjv/tokenizer-yan-tiny/tokenizer.json"
    assert shared.read_text() == (tmp_path / "run/stage1/tokenizer.json").read_text()
    model = from_pretrained(tmp_path / "run" / final)  # the evaluated and published stage
    tok = load_tokenizer(tmp_path / "run" / final, model.config)
    assert tok.special.mask == model.config.mask_token_id
    assert model.config.infill_masks == "per_position"
    # only the last stage decays its learning rate (DECAY steps); `focus` only in the anneal
    train_cfg = {
        s: json.loads((tmp_path / "run" / s / "trainer_state.json").read_text())["train_config"]
        for s in stages
    }
    assert {s: c["decay"] for s, c in train_cfg.items()} == {s: 2 * (s == final) for s in stages}
    assert train_cfg["fill"]["seed"] == 0  # the anneal draws a fresh data order
    if final == "anneal":
        assert (train_cfg["anneal"]["stage2"]["focus"], train_cfg["anneal"]["seed"]) == (3.0, 1)
        # ANNEAL_TASKS: QA takes two of every five anneal batches; the fill stage round-robin
        assert train_cfg["anneal"]["tasks"] == ["infill", "complete", "qa", "qa", "classify"]
        assert train_cfg["fill"]["tasks"] == ["infill", "complete", "qa", "classify"]
    results = json.loads((tmp_path / "run/eval.json").read_text())["results"]
    tasks = ("infill", "infill-served", "complete", "qa", "classify", "classify-scored")
    assert {(r["task"], r["steps"]) for r in results} == {("infill-copy-source", 0)} | {
        (t, T) for t in tasks for T in (1, 2, 3, 4, 6)
    }
    assert (tmp_path / "run" / final / "labels.json").exists()  # the server's label table
    # PUBLISH: the final stage's serving files with bf16 weights, and the eval of those weights
    pub = tmp_path / "published"
    assert {p.name for p in pub.iterdir()} == {*SERVING_FILES, "eval.json"}
    # served at T = 4 (the recipe's SERVE_STEPS), the rest of the config as trained
    assert from_pretrained(pub).config == dataclasses.replace(model.config, ode_steps=4)
    assert r.stderr.count("[eval] infill T=3") == 1 and "exported" in r.stdout
    assert all(r["n"] == 4 for r in results)
    for r in results:  # infill rows carry the masked spans' and the copied text's token accuracy
        if r["task"] == "infill":
            assert 0 <= r["scores"]["span_acc"] <= 100 and 0 <= r["scores"]["copy_acc"] <= 100
    assert all(r["tokens_per_s"] > 0 for r in results if r["steps"] > 0)
    copy = next(r for r in results if r["task"] == "infill-copy-source")
    assert copy["scores"]["rouge1"] > 80  # the source minus its masks is most of the target
    # the corpus split by book: test books only in test.jsonl
    test_books = {json.loads(ln)["book"] for ln in (tmp_path / "kjv/test.jsonl").open()}
    assert test_books == {"Ruth", "Ecclesiastes", "Jonah", "Philippians", "James"}
    train_books = {json.loads(ln)["book"] for ln in (tmp_path / "kjv/train.jsonl").open()}
    assert not train_books & (test_books | {"Esther", "Lamentations", "Haggai", "Titus"})
