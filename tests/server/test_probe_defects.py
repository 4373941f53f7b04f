"""Regression tests for the probe defects of #17: bad input anywhere is a 4xx with a JSON body
naming the problem (never a 500), a bad checkpoint or flag stops the process at start with one
line, and shutdown keeps one deadline."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import CHECKPOINT, ServerProcess

QA = {
    "context": " ".join(f"Person{i} went to the kitchen." for i in range(9)),
    "question": "Where is Person3?",
    "max_tokens": 8,
}


def batches_run(url: str) -> float:
    m = httpx.get(url + "/metrics").text
    return float(m.split("\nyan:batch_size_count ")[1].split()[0])


def queue_depth(metrics: str) -> float:
    return float(metrics.split("\nyan:queue_depth ")[1].split()[0])


def test_a_huge_mask_budget_is_400_not_500(client: httpx.Client) -> None:
    r = client.post("/v1/infill", json={"text": "a [MASK:" + "9" * 5000 + "] b"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "span budget" in err["message"] and len(err["message"]) < 200


def test_a_huge_content_length_is_413_not_500(server: ServerProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n{}"
        )
        head = s.recv(4096).split(b"\r\n", 1)[0]
    assert head.split()[1] in (b"400", b"413"), head  # h11 or our gate, never a 500


@pytest.mark.parametrize("bad", ["yes", [1], {"include_usage": "yes"}])
def test_bad_stream_options_are_422_before_the_model_runs(server: ServerProcess, bad) -> None:
    before = batches_run(server.url)
    body = {"prompt": "And God said", "max_tokens": 2, "stream": True, "stream_options": bad}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["param"] == "stream_options"
    assert batches_run(server.url) == before  # refused before any model work


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "return_confidence": 1}, "return_confidence"),
        ({"prompt": "x", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
    ],
)
def test_the_schema_is_strict_about_types(client: httpx.Client, body: dict, field: str) -> None:
    r = client.post("/v1/complete", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(field)


def test_what_the_schema_allows_is_served(client: httpx.Client) -> None:
    # JSON Schema's integers include 2.0
    r = client.post("/v1/complete", json={"prompt": "And God said", "max_tokens": 2.0, "n": 1.0})
    assert r.status_code == 200, r.text
    # candidate labels with stream: the one `result` event (scoring has no previews)
    body = {"text": "Blessed are the meek", "labels": ["law", "gospels"], "seed": 0}
    with client.stream("POST", "/v1/classify", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[0] == "event: result" and len(lines) == 2
    streamed = json.loads(lines[1].removeprefix("data: "))
    plain = client.post("/v1/classify", json=body).json()
    assert streamed["scores"] == plain["scores"] and streamed["label"] == plain["label"]


def test_the_schema_says_what_the_server_accepts(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    steps = schemas["InfillRequest"]["properties"]["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 16)  # this server's --max-steps
    seed = schemas["CompleteRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["maximum"] == 2**53 - 1  # exact as a JSON number
    assert schemas["InfillRequest"]["properties"]["text"]["pattern"] == r"\[MASK(:[0-9]+)?\]"
    top_p = schemas["OpenAICompletionRequest"]["properties"]["top_p"]["anyOf"][0]
    assert (top_p["minimum"], top_p["maximum"]) == (1, 1)
    # generated lengths: at most the checkpoint's 256 positions less the EOS's (longer is
    # refused with a 400), and the largest the schema allows is served
    for name in ("CompleteRequest", "QARequest"):
        assert schemas[name]["properties"]["max_tokens"]["maximum"] == 255, name
    oai = schemas["OpenAICompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert oai["maximum"] == 255
    r = client.post("/v1/complete", json={"prompt": "In the beginning", "max_tokens": 255})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "In the beginning", "max_tokens": 255})
    assert r.status_code == 200, r.text
    assert schemas["ClassifyRequest"]["properties"]["max_tokens"]["maximum"] == 64
    r = client.post("/v1/complete", json={"prompt": "In the beginning", "max_tokens": 257})
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    # echo with a suffix: excluded by the schema, refused by the server
    both = schemas["OpenAICompletionRequest"]["not"]
    assert both["required"] == ["echo", "suffix"] and both["properties"]["echo"] == {"const": True}
    r = client.post("/v1/completions", json={"prompt": "a", "suffix": "b", "echo": True})
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]


def test_duplicate_labels_are_refused(client: httpx.Client) -> None:
    text = "Blessed are the meek: for they shall inherit the earth."
    r = client.post("/v1/classify", json={"text": text, "labels": ["law", "gospels", "law"]})
    assert r.status_code == 400 and "'law'" in r.json()["error"]["message"]
    # "Law " is the checkpoint's label "law" too: the same candidate
    r = client.post("/v1/classify", json={"text": text, "labels": ["law", "Law "]})
    assert r.status_code == 400 and "same candidate" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def keyed() -> ServerProcess:
    s = ServerProcess("--api-key", "clé-ü", "--max-queue", "8").wait_ready()
    yield s
    s.stop()


def test_a_non_ascii_api_key_matches_its_utf8_bytes(keyed: ServerProcess) -> None:
    req = {"prompt": "And God said", "max_tokens": 2}
    ok = {"Authorization": "Bearer clé-ü".encode()}
    assert httpx.post(keyed.url + "/v1/complete", json=req, headers=ok).status_code == 200
    bad = {"Authorization": "Bearer cle-u"}
    assert httpx.post(keyed.url + "/v1/complete", json=req, headers=bad).status_code == 401


def test_more_candidates_than_the_queue_holds_is_400_not_429(keyed: ServerProcess) -> None:
    auth = {"Authorization": "Bearer clé-ü".encode()}
    r = httpx.post(keyed.url + "/v1/qa", json={**QA, "n": 9}, headers=auth, timeout=60)
    assert r.status_code == 400, r.text
    assert "--max-queue" in r.json()["error"]["message"] and "8" in r.json()["error"]["message"]
    r = httpx.post(keyed.url + "/v1/qa", json={**QA, "n": 8}, headers=auth, timeout=60)
    assert r.status_code == 200  # what fits is still served


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--request-timeout", "nan"], "--request-timeout"),
        (["--shutdown-timeout", "inf"], "--shutdown-timeout"),
        (["--threads", "-3"], "--threads"),
        (["--api-key", " key "], "--api-key"),
    ],
)
def test_bad_numbers_exit_with_one_line(flags: list[str], needle: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "yan_serve", *flags], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yan-serve: error:") and needle in lines[0]


def _config(**change):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **change}))

    return edit


def _corrupt(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 64)


BAD_CHECKPOINTS = {
    "corrupt weights": (_corrupt, [], ["model.safetensors", "not a readable safetensors"]),
    "wrong type": (_config(d_model="wide"), [], ["config.json", "d_model", "'wide'"]),
    "unknown key": (_config(widht=3), [], ["config.json", "widht"]),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), [], ["tokenizer.json"]),
    "vocab mismatch": (_config(vocab_size=4096), [], ["model.safetensors", "tok_emb.weight"]),
    "no cuda": (lambda d: None, ["--device", "cuda"], ["--device cuda", "CUDA"]),
}


def test_a_bad_checkpoint_or_device_exits_at_start_with_one_line(tmp_path: Path) -> None:
    import torch

    procs = {}
    for name, (edit, flags, _) in BAD_CHECKPOINTS.items():
        if name == "no cuda" and torch.cuda.is_available():
            continue
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(CHECKPOINT, d, ignore=shutil.ignore_patterns("*.md", "*.log", "logs"))
        edit(d)
        cmd = [sys.executable, "-m", "yan_serve", "--model", str(d), "--port", "0", *flags]
        if "--device" not in flags:
            cmd += ["--device", "cpu"]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)  # fmt: skip
    deadline = time.time() + 120  # all of them together (a server that stays up is killed)
    outputs = {}
    try:
        for name, p in procs.items():
            try:
                outputs[name] = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                outputs[name] = ("", "(still running: never exited)")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in procs.items():
        out, err = outputs[name]
        assert p.returncode is not None and p.returncode > 0, f"{name}: {out}{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("yan-serve: error:"), (name, err)
        for needle in BAD_CHECKPOINTS[name][2]:
            assert needle in lines[0], (name, lines[0])


LOAD_FAILS = """
import sys
from yan_serve.server import app, main
from yan_serve.server.settings import Settings

real = app.create_app


def broken(settings, **kw):
    def factory(_):
        raise RuntimeError("the weights do not fit")

    return real(settings, worker_factory=factory)


app.create_app = broken
sys.exit(main.serve(Settings(model=sys.argv[1], device="cpu", port=0, log_level="error")))
"""


def test_a_load_failure_after_start_stops_the_server_non_zero() -> None:
    """What the start-up check cannot see (e.g. memory) still ends the process: exit 1."""
    p = subprocess.run([sys.executable, "-c", LOAD_FAILS, str(CHECKPOINT)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 1, p.stderr
    assert "the weights do not fit" in p.stderr


def test_request_timeouts_leave_no_unretrieved_exception_in_the_log() -> None:
    s = ServerProcess(
        "--request-timeout", "0.05", "--max-batch-size", "1", "--log-level", "info"
    ).wait_ready()
    try:

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/v1/qa", json={**QA, "seed": i, "n": 4}) for i in range(12))
                )

        codes = [r.status_code for r in asyncio.run(fire())]
        assert 504 in codes, codes
        time.sleep(1.0)  # every queued job has been dropped or run
    finally:
        assert s.stop() == 0
    log = s.proc.stdout.read()
    assert "never retrieved" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_sigterm_past_the_shutdown_timeout_answers_503_json_within_one_deadline() -> None:
    timeout = 3.0
    s = ServerProcess("--max-batch-size", "1", "--shutdown-timeout", str(timeout)).wait_ready()

    async def scenario() -> tuple[list, float, float]:
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            # 15 x 16 candidates, one per batch: far more work than 3 s on this machine
            tasks = [asyncio.create_task(c.post("/v1/qa", json={**QA, "seed": i, "n": 16}))
                     for i in range(15)]  # fmt: skip
            while queue_depth((await c.get("/metrics")).text) < 200:
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            s.proc.send_signal(signal.SIGTERM)
            done = await asyncio.gather(*tasks, return_exceptions=True)
            answered = time.perf_counter() - t0
            await asyncio.to_thread(s.proc.wait, 60)
            return done, answered, time.perf_counter() - t0

    done, answered, exited = asyncio.run(scenario())
    assert all(isinstance(r, httpx.Response) for r in done), done
    codes = [r.status_code for r in done]
    assert set(codes) <= {200, 503} and 503 in codes, codes
    for r in done:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "unavailable", r.text
    assert s.proc.returncode == 0
    assert answered < timeout + 1.5, answered  # one deadline, not three
    assert exited < timeout + 4.0, exited  # (+ the interpreter's teardown of torch)
