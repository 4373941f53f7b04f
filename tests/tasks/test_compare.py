"""`yan compare`: YAN columns per T, AR columns once, protocols paired row by row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from yan_serve.tasks.compare import columns, table


def _write(d, results, model_type=None):
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"results": results}))
    if model_type:
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


def _r(task, steps, scores, tps=0.0, n=10):
    return {"task": task, "steps": steps, "n": n, "scores": scores, "tokens_per_s": tps}


@pytest.fixture
def dirs(tmp_path):
    yan = _write(tmp_path / "yan", [
        _r("infill-copy-source", 0, {"rouge1": 95.0}),
        *[_r("infill", t, {"rouge1": 10.0 * t, "rougeL": 9.0 * t}, 1000.0 * t) for t in (2, 3, 4)],
        *[_r("infill-served", t, {"rouge1": 90.0 + t}) for t in (2, 3, 4)],
        *[_r("complete", t, {"exact_match": 1.0 * t}) for t in (2, 3, 4)],
    ])  # fmt: skip
    ar = _write(tmp_path / "ar", [
        _r("infill", 0, {"rouge1": 61.0, "rougeL": 60.0}, 250.0),
        _r("infill-fim", 0, {"rouge1": 93.5}),
        _r("complete", 0, {"exact_match": 7.0}),
        _r("classify-scored", 0, {"accuracy": 41.0}),
    ], model_type="gpt2")  # fmt: skip
    return yan, ar


def test_table_pairs_protocols_and_columns(dirs) -> None:
    yan, ar = dirs
    cols = columns([yan, ar], [2, 4])
    assert [c.name for c in cols] == ["yan T=2", "yan T=4", "ar"]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            table(cols).splitlines() if line.startswith("| ") and "metric" not in line}  # fmt: skip
    assert rows["infill ROUGE-1, paper protocol (whole passage)"] == ["20.0", "40.0", "61.0 |"]
    assert rows["infill ROUGE-1, known text kept (YAN served / AR FIM)"] == ["92.0", "94.0",
                                                                             "93.5 |"]  # fmt: skip
    assert rows["completion last-word EM %"] == ["2.0", "4.0", "7.0 |"]
    assert rows["classification accuracy %, scored labels"] == ["-", "-", "41.0 |"]
    assert rows["infill decoding tokens/s (eval batch)"] == ["2,000", "4,000", "250 |"]
    assert "QA F1" not in rows  # no checkpoint has it: the row is left out


def test_missing_steps_and_files_are_one_line_errors(dirs, tmp_path) -> None:
    yan, _ = dirs
    with pytest.raises(ValueError, match="no results at T=6"):
        columns([yan], [6])
    cli = [sys.executable, "-m", "yan_serve.cli", "compare"]
    p = subprocess.run([*cli, str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no eval.json" in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    p = subprocess.run([*cli, str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "not a `yan eval --json` file" in p.stderr
    out = tmp_path / "t.md"
    p = subprocess.run([*cli, *map(str, dirs), "--steps", "3", "--out", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0 and out.read_text().startswith("| metric | yan T=3 | ar |")
