"""The load-test runner end to end on CPU: both servers, Locust headless, table and plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_runner_writes_the_table_the_plot_and_the_raw_csvs(tmp_path, ar_checkpoint) -> None:
    if shutil.which("bible") is None and not (ROOT / "data" / "kjv" / "test.jsonl").exists():
        pytest.fail("needs the KJV text: apt-get install bible-kjv (CI installs it)")
    out = tmp_path / "results"
    data = ROOT / "data" / "kjv" if (ROOT / "data" / "kjv" / "test.jsonl").exists() else tmp_path
    cmd = [sys.executable, str(ROOT / "loadtests" / "run.py"), "--yan", str(CHECKPOINT),
           "--ar", str(ar_checkpoint), "--duration", "2", "--users", "1,2", "--endpoints",
           "complete,infill,infill-full", "--max-tokens", "16", "--payloads", "20",
           "--threads", "1", "--data", str(data), "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {(r["server"], r["endpoint"], r["users"]) for r in rows} == {
        (s, e, u)
        for s in ("yan", "ar")
        for e in ("complete", "infill", "infill-full")
        for u in (1, 2)
    }
    assert all(r["requests"] > 0 and r["failures"] == 0 for r in rows), rows
    assert all(r["p50_ms"] > 0 and r["rps"] > 0 for r in rows)
    table = (out / "results.md").read_text()
    assert "| yan | complete | 1 |" in table and "speed-up" in table
    assert (out / "results.png").stat().st_size > 10_000
    assert len(list((out / "raw").glob("*_stats.csv"))) == 12
    payloads = json.loads((out / "payloads.json").read_text())
    assert all(p["protocol"] == "full" and p["ignore_eos"] for p in payloads["infill-full"])
    assert [p["text"] for p in payloads["infill-full"]] == [p["text"] for p in payloads["infill"]]


def test_long_passage_payloads(tmp_path) -> None:
    """--infill-words: runs of consecutive test verses of that many words, one word in ten
    masked (the paper's long-passage protocol)."""
    sys.path.insert(0, str(ROOT / "loadtests"))
    try:
        from run import build_payloads
    finally:
        sys.path.pop(0)
    data = ROOT / "data" / "kjv"
    if not (data / "test.jsonl").exists():
        if shutil.which("bible") is None:
            pytest.fail("needs the KJV text: apt-get install bible-kjv (CI installs it)")
        data = tmp_path  # build_payloads builds the corpus there
    p = build_payloads(data, 5, 16, 3, infill_words=120)
    assert len(p["infill"]) == 5
    for item in p["infill"]:
        words = item["text"].split()
        assert len(words) == 120 and words.count("[MASK]") == 12


def test_runner_refuses_a_missing_checkpoint(tmp_path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "loadtests" / "run.py"), "--ar",
                        str(tmp_path / "none"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "not a checkpoint" in p.stderr
