"""The documented recipe end to end, shortened: scripts/train_default.sh with a few steps per
stage on the real KJV corpus, then `yan eval` at every step count of the model card.

Needs the `bible` program (Debian package bible-kjv; .ci/run installs it).
Run: python -m pytest tests/train/test_pipeline.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from yan_serve.weights import SERVING_FILES, from_pretrained, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_shortened_default_recipe(tmp_path) -> None:
    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install bible-kjv (apt-get) for the recipe test")
        pytest.skip("the `bible` program (apt-get install bible-kjv) is not installed")
    env = {**os.environ, "OUT": str(tmp_path / "run"), "DATA": str(tmp_path / "kjv"),
           "PUBLISH": str(tmp_path / "published"), "S1": "4", "S2": "4", "FT": "8", "FILL": "4",
           "ANNEAL": "4", "FOCUS_WEIGHT": "3",
           "BS": "4", "EVAL_LIMIT": "4", "DEVICE": "cpu", "OMP_NUM_THREADS": "2"}  # fmt: skip
    r = subprocess.run(["bash", str(ROOT / "scripts/train_default.sh")], env=env,
                       capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("stage1", "stage2", "finetune"):
        assert f"done: {stage}" in r.stderr
    # the paper-layout fine-tune, then `fill`, then `anneal`
    assert r.stderr.count("done: finetune") == 3
    for stage in ("stage1", "stage2", "finetune", "fill", "anneal"):
        d = tmp_path / "run" / stage
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in d.iterdir()
        }
    assert from_pretrained(tmp_path / "run/finetune").config.infill_masks == "collapsed"
    # stage 1 trained on the corpus's shared tokenizer (built once: passages and QA stories)
    shared = tmp_path / "kjv/tokenizer-yan-tiny/tokenizer.json"
    assert shared.read_text() == (tmp_path / "run/stage1/tokenizer.json").read_text()
    model = from_pretrained(tmp_path / "run/anneal")  # the evaluated and published stage
    tok = load_tokenizer(tmp_path / "run/anneal", model.config)
    assert tok.special.mask == model.config.mask_token_id
    assert model.config.infill_masks == "per_position"
    results = json.loads((tmp_path / "run/eval.json").read_text())["results"]
    tasks = ("infill", "infill-served", "complete", "qa", "classify", "classify-scored")
    assert {(r["task"], r["steps"]) for r in results} == {("infill-copy-source", 0)} | {
        (t, T) for t in tasks for T in (1, 2, 3, 4, 6)
    }
    assert (tmp_path / "run/anneal/labels.json").exists()  # the server's label table
    anneal = json.loads((tmp_path / "run/anneal/trainer_state.json").read_text())["train_config"]
    assert (anneal["stage2"]["focus"], anneal["decay"], anneal["seed"]) == (3.0, 2, 1)
    # PUBLISH: the final stage's serving files with bf16 weights, and the eval of those weights
    pub = tmp_path / "published"
    assert {p.name for p in pub.iterdir()} == {*SERVING_FILES, "eval.json"}
    assert from_pretrained(pub).config == model.config
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
