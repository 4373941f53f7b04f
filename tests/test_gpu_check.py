"""The GPU-machine check (scripts/gpu_check.sh) and its served smoke test (scripts/gpu_smoke.py).

A lent GPU machine gives minutes, not retries, so both scripts are exercised here on the CPU:
the shell script's syntax and stage wiring, and the smoke client end to end against the shipped
checkpoints (the same code path as on the GPU, with `--device cpu`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "gpu_check.sh"
SMOKE = ROOT / "scripts" / "gpu_smoke.py"
STAGES = ("tests", "kernels", "sampler", "scan", "smoke")  # the default run
EXTRA_STAGES = ("versus", "loadtest", "train")  # on request: STAGES="versus train"


def load_smoke():
    return load_script("gpu_smoke")


def test_check_script_parses_and_wires_every_stage() -> None:
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0
    text = CHECK.read_text()
    assert f'STAGES=${{STAGES:-"{" ".join(STAGES)}"}}' in text
    for stage in (*STAGES, *EXTRA_STAGES):
        assert f"        {stage})\n" in text, f"no case branch for stage {stage}"
        assert f"{stage.upper()}_TIMEOUT" in text
        assert f"{stage.upper()}_ARGS" in text or stage == "tests"
    assert f"tests | {' | '.join((*STAGES, *EXTRA_STAGES)[1:])}) ;;" in text
    for bench in ("kernels", "sampler", "scan", "versus", "train"):
        assert f"-m yan_serve.bench {bench}" in text
        assert f"{bench.upper()}_ARGS" in text
    assert '-m pytest -q -m "${TEST_MARK:-gpu}"' in text
    paths = "tests/kernels tests/engine tests/ar tests/train tests/test_gpu_train.py"
    assert "${TEST_PATHS:-" + paths + "}" in text
    assert "scripts/gpu_smoke.py" in text and "SMOKE_ARGS" in text
    assert "PYTEST_ARGS" in text
    assert 'workers=(-n "$tw" --dist loadfile)' in text and "TEST_WORKERS" in text


def test_check_script_refuses_an_unknown_stage(tmp_path: Path) -> None:
    env = {**os.environ, "STAGES": "tests bogus", "OUT": str(tmp_path)}
    p = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "unknown stage 'bogus'" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_smoke_helpers() -> None:
    m = load_smoke()
    assert m.pct([], 50) is None
    assert m.pct([3.0, 1.0, 2.0], 50) == 2.0
    assert m.pct([0.0, 10.0], 90) == pytest.approx(9.0)
    events = m.parse_sse(b'event: result\ndata: {"a": 1}\n\ndata: [DONE]\n\n')
    assert events == [("result", '{"a": 1}'), ("message", "[DONE]")]
    assert m._check_sse_openai([("message", "[DONE]")]) == "chunks are not text_completion objects"
    assert len(set(m.ENDPOINT_NAMES)) == len(m.ENDPOINT_NAMES)
    a = m.parse_args(["--device", "cpu", "--burst", "infill", "--out", "/tmp/x/s.jsonl"])
    assert a.burst == ["infill"] and a.log_dir == "/tmp/x"
    rows = [
        {"kind": "server", "model": "y", "kind_of_model": "yan", "exit_code": 0},
        {"kind": "server", "model": "a", "kind_of_model": "ar", "exit_code": 0},
        {"kind": "sequential", "model": "y", "endpoint": "/v1/complete", "p50_ms": 10.0},
        {"kind": "sequential", "model": "a", "endpoint": "/v1/complete", "p50_ms": 40.0},
    ]
    table = m.report(rows)
    assert "YAN speedup" in table
    assert "4.00x" in table.splitlines()[2]


def test_smoke_reports_the_log_tail_of_a_server_that_fails_to_start(tmp_path: Path) -> None:
    """A checkpoint the server refuses: the smoke client prints the server's own error line
    from its log (once) and exits 1 with its failures, not a traceback of its own."""
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{}")  # no weights: yan-serve exits 2 at once
    cmd = [sys.executable, str(SMOKE), "--device", "cpu", "--models", str(bad), "--burst", "",
           "--out", str(tmp_path / "smoke.jsonl")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert p.stdout.count("--- server log tail") == 1
    assert "yan-serve: error: no model.safetensors" in p.stdout
    assert "broken start: the server exited with code 2" in p.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "/nonexistent"], "--models: no checkpoint directory /nonexistent"),
        (["--models", ","], "--models: name at least one checkpoint directory"),
        (["--concurrency", "0"], "--concurrency: expected a positive integer, got 0"),
        (["--seq", "-1"], "--seq: expected a positive integer, got -1"),
        (["--duration", "0"], "--duration: expected a positive number of seconds"),
    ],
)
def test_smoke_refuses_bad_flags_before_starting_anything(
    argv: list[str], message: str, tmp_path: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exc:
        load_smoke().parse_args([*argv, "--out", str(tmp_path / "s.jsonl")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.jsonl"
    cmd = [
        sys.executable, str(SMOKE), "--device", "cpu", "--duration", "1", "--concurrency", "4",
        "--seq", "3", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = load_smoke().ENDPOINT_NAMES
    for model in ("yan-tiny-kjv", "ar-tiny-kjv"):
        got = {r["endpoint"]: r for r in rows if r["kind"] == "endpoint" and r["model"] == model}
        assert sorted(got) == sorted(names), model
        for name, r in got.items():
            assert r["status"] == 200 and r["ok"], (model, name, r)
        server = [r for r in rows if r["kind"] == "server" and r["model"] == model]
        assert server and server[0]["exit_code"] == 0, server
        seq = {r["endpoint"]: r for r in rows if r["kind"] == "sequential" and r["model"] == model}
        assert seq["/v1/complete"]["completion_tokens"] == 128  # ignore_eos: the whole budget
        assert seq["/v1/infill"]["queue_ms_p50"] is not None
        bursts = [r for r in rows if r["kind"] == "burst" and r["model"] == model]
        assert {r["endpoint"] for r in bursts} == {"/v1/complete", "/v1/infill"}
        assert all(r["errors"] == 0 and r["requests"] > 0 for r in bursts), bursts
    assert "YAN speedup" in p.stdout


def test_loadtest_stage_needs_no_locust_and_no_corpus() -> None:
    """The GPU image has neither Locust nor the KJV corpus: the stage uses the built-in client
    and the shipped payload file, and its results reach results.json through extras."""
    text = CHECK.read_text()
    assert 'loadtests/run.py --device "$DEVICE"' in text
    assert "--client builtin --payload-file loadtests/payloads-kjv-test.json" in text
    assert (ROOT / "loadtests" / "payloads-kjv-test.json").exists()
    payloads = json.loads((ROOT / "loadtests" / "payloads-kjv-test.json").read_text())
    assert set(payloads) == {"infill", "infill-full", "complete", "qa", "classify"}
    assert 'work / "loadtest" / "results.json"' in text and '"versus"' in text


def test_the_lease_plan_flags_parse() -> None:
    """Every bench's flags in the next lease's plan (docs/gpu_session.md) are ones the bench
    takes: a renamed flag would otherwise cost a stage of a 15-minute lease."""
    import re
    import shlex

    from yan_serve.bench import build_parser

    plan = (ROOT / "docs" / "gpu_session.md").read_text()
    found = re.findall(r'\b(KERNELS|SAMPLER|SCAN|VERSUS|TRAIN)_ARGS="([^"]*)"', plan)
    assert {name for name, _ in found} >= {"KERNELS", "SAMPLER", "VERSUS", "TRAIN"}
    parser = build_parser()
    for name, flags in found:
        try:
            parser.parse_args([name.lower(), "--device", "cuda", *shlex.split(flags)])
        except SystemExit as exc:
            raise AssertionError(f"{name}_ARGS={flags!r} does not parse") from exc


def test_wheel_script_pins_what_the_check_installs() -> None:
    """scripts/gpu_wheels.sh fills .whl/ for the GPU image: exact pins, one per package, the web
    stack the server imports, and every package gpu_check.sh installs only when missing."""
    script = ROOT / "scripts" / "gpu_wheels.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    body = script.read_text().split("PINS=(", 1)[1].split(")", 1)[0]
    pins = [w for line in body.splitlines() for w in line.split("#")[0].split()]
    names = [p.split("==")[0] for p in pins]
    assert all(p.count("==") == 1 and p.split("==")[1] for p in pins), pins
    assert len(set(names)) == len(names), names
    assert {"fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn"} <= set(names)
    if_missing = CHECK.read_text().split("IF_MISSING = {", 1)[1].split("}", 1)[0]
    for dist in re.findall(r'"([a-z0-9-]+)":', if_missing):
        assert dist in names, f"gpu_check.sh may install {dist} from .whl/, which gets none"
