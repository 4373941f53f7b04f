"""scripts/served_fill_eval.py on a few passages: it prints both rows and never reports an empty
fill when empty spans are not allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_masked_items_hide_one_to_three_words() -> None:
    mod = load_script("served_fill_eval")
    rows = [{"text": "one two three four five six seven eight nine ten"}] * 20
    for text, gold in mod.masked_items(rows, 20, seed=1):
        assert text.count("[MASK]") == 1 and 1 <= len(gold.split()) <= 3
        assert text.replace("[MASK]", gold) == rows[0]["text"]


@pytest.mark.parametrize("model", ["yan-tiny-kjv", "ar-tiny-kjv"])
def test_runs_and_reports_both_settings(tmp_path: Path, capsys, model: str) -> None:
    """Through the server's worker for either backend (the AR baseline fills by FIM)."""
    mod = load_script("served_fill_eval")
    passages = [
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light: and there was light.",
        "The LORD is my shepherd; I shall not want.",
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    rc = mod.main(["--model", str(ROOT / "weights" / model), "--data", str(tmp_path), "--n", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and f"({model.split('-')[0]})" in out
    rows = re.findall(r"allow_empty=(True|False)\s+ROUGE-L ([0-9.]+)\s+empty fills (\d+)/3", out)
    assert [r[0] for r in rows] == ["True", "False"]
    assert rows[1][2] == "0"
    ckpt_steps = json.loads((ROOT / "weights" / model / "config.json").read_text()).get("ode_steps")
    assert (f"T = {ckpt_steps}" in out) == (model == "yan-tiny-kjv")  # the checkpoint's by default
    assert mod.main(["--data", str(tmp_path / "missing")]) == 2
    if model == "yan-tiny-kjv":  # --steps: the Euler time points the fills are sampled with
        argv = ["--model", str(ROOT / "weights" / model), "--data", str(tmp_path), "--n", "3"]
        assert mod.main([*argv, "--steps", "2"]) == 0
        assert "T = 2" in capsys.readouterr().out
