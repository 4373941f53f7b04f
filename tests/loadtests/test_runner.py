"""The load-test runner end to end on CPU: both servers, Locust headless, table and plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _runner_main():
    sys.path.insert(0, str(ROOT / "loadtests"))
    try:
        from run import main
    finally:
        sys.path.pop(0)
    return main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--payload-file", "MISSING"], "--payload-file: cannot read"),
        (["--payload-file", "NOT_JSON"], "is not JSON"),
        (["--payload-file", "NO_QA", "--endpoints", "complete,qa"], "has no requests for qa"),
        (["--device", "tpu"], "--device tpu: not a device torch knows"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit"),
        ),
    ],
)
def test_runner_refuses_bad_input_in_one_line_and_writes_nothing(
    argv: list[str], message: str, tmp_path, capsys
) -> None:
    """Refused before any server starts: exit 2, one line, no results folder."""
    files = {"MISSING": tmp_path / "none.json", "NOT_JSON": tmp_path / "x.json",
             "NO_QA": tmp_path / "p.json"}  # fmt: skip
    files["NOT_JSON"].write_text("{oops")
    files["NO_QA"].write_text(json.dumps({"complete": [{"prompt": "In the", "max_tokens": 2}]}))
    argv = [str(files.get(a, a)) for a in argv]
    out = tmp_path / "results"
    assert _runner_main()([*argv, "--out", str(out), "--client", "builtin"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("loadtest: error: "), err
    assert message in err and not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--users", "0"], "--users: expected comma-separated positive integers (e.g. 1,2,3)"),
        (["--users", "1,-4"], "--users: expected comma-separated positive integers"),
        (["--duration", "0"], "--duration: expected a positive integer, got '0'"),
        (["--servers", ","], "--servers: name yan, ar or both"),
    ],
)
def test_runner_bad_flags_exit_2(argv: list[str], message: str, tmp_path, capsys) -> None:
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        _runner_main()([*argv, "--out", str(out)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_builtin_client_measures_a_closed_loop_load(tmp_path) -> None:
    """The standard-library client (the GPU image has no Locust) against a stub server: every
    request counted, seeds per user as the Locust users send them, failures counted."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sys.path.insert(0, str(ROOT / "loadtests"))
    try:
        from run import percentile, run_builtin
    finally:
        sys.path.pop(0)
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append({**body, "path": self.path})
            ok = body["seed"] % 7 != 3  # some requests fail
            out = json.dumps({"usage": {"completion_tokens": 5}} if ok else {"detail": "no"})
            self.send_response(200 if ok else 500)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out.encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        payloads = tmp_path / "payloads.json"
        payloads.write_text(json.dumps({"complete": [{"prompt": f"p{i}"} for i in range(5)]}))
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = run_builtin(url, "complete", 3, 0.5, tmp_path / "ar_complete_u3", payloads)
    finally:
        server.shutdown()
    assert r["requests"] == len(seen) > 10
    assert r["failures"] == sum(b["seed"] % 7 == 3 for b in seen) > 0
    assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["rps"] > 0
    assert r["output_tok_s"] > 0 and all(b["path"] == "/v1/complete" for b in seen)
    assert {b["seed"] // 1000 for b in seen} == {0, 1, 2}  # three users, their own seeds
    lines = (tmp_path / "ar_complete_u3_latencies.csv").read_text().splitlines()
    assert lines[0] == "latency_ms" and len(lines) - 1 == r["requests"] - r["failures"]
    assert (tmp_path / "ar_complete_u3_failures.txt").exists()
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 50) == 0.0
