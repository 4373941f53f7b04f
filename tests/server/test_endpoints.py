"""Each endpoint answers real requests on the shipped checkpoint; errors are JSON 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

PASSAGE = "In the beginning God created the heaven and the earth."


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    if r.url.path == "/v1/completions":  # OpenAI's shape: `param`, and a string code if any
        assert set(body) == {"message", "type", "code", "param"}
        assert body["code"] in (status, "model_not_found", "context_length_exceeded")
    else:
        assert set(body) == {"message", "type", "code"} and body["code"] == status
    assert body["message"]
    return body


def test_probes_and_models(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    for probe in ("/health", "/ready"):
        r = client.head(probe)
        assert r.status_code == 200 and r.content == b"", probe
    # OpenAPI wants one operationId per operation: HEAD stays out of the schema
    paths = client.get("/openapi.json").json()["paths"]
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert set(paths["/health"]) == set(paths["/ready"]) == {"get"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "yan-tiny-kjv"
    text = client.get("/metrics").text
    assert "yan:ready 1.0" in text and "yan:batch_size_bucket" in text


def test_infill_keeps_the_text_and_fills_each_span(client: httpx.Client) -> None:
    text = "In the beginning God [MASK] the heaven and the [MASK:3]."
    r = client.post("/v1/infill", json={"text": text, "seed": 1, "return_confidence": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["fills"]) == 2
    a, b = body["fills"]
    assert body["text"] == f"In the beginning God{a} the heaven and the{b}."
    c = body["candidates"][0]
    assert len(c["token_confidence"]) == 2 + 3  # one probability per budgeted position
    assert body["usage"]["prompt_tokens"] > 0 and body["timing"]["compute_ms"] > 0


def test_complete_qa_classify(client: httpx.Client) -> None:
    r = client.post(
        "/v1/complete",
        json={
            "prompt": "And God said, Let there be light: and there was",
            "max_tokens": 8,
            "seed": 0,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 8

    ctx = "Mary moved to the bathroom. John went to the hallway."
    r = client.post("/v1/qa", json={"context": ctx, "question": "Where is Mary?", "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == r.json()["text"]

    r = client.post("/v1/classify", json={"text": PASSAGE, "seed": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] and body["scores"] is None

    labels = ["law", "history", "gospels"]
    r = client.post("/v1/classify", json={"text": PASSAGE, "seed": 0, "labels": labels})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = body["scores"]
    assert sorted(s["label"] for s in scores) == sorted(labels)
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-6
    assert body["label"] == scores[0]["label"] and body["label_id"] in (1, 2, 5)


def test_same_seed_same_output_and_n_candidates(client: httpx.Client) -> None:
    req = {"text": "And the [MASK] was upon the face of the deep.", "seed": 5, "routing": "sample"}
    a, b = client.post("/v1/infill", json=req).json(), client.post("/v1/infill", json=req).json()
    assert a["text"] == b["text"] and a["candidates"] == b["candidates"]
    many = client.post("/v1/infill", json={**req, "n": 4}).json()
    conf = [c["confidence"] for c in many["candidates"]]
    assert len(conf) == 4 and conf == sorted(conf, reverse=True)
    assert many["text"] == many["candidates"][0]["text"]


@pytest.mark.parametrize(
    ("path", "req"),
    [
        (
            "/v1/infill",
            {"text": "And the [MASK:3] was upon the face of the deep.", "routing": "sample"},
        ),
        (
            "/v1/complete",
            {"prompt": "And God said unto Moses", "max_tokens": 6, "routing": "sample"},
        ),
    ],
)
def test_n_candidates_take_consecutive_seeds(client: httpx.Client, path: str, req: dict) -> None:
    """One request with n = 3 and seed s: three different candidates, each the answer a single
    request with seed s, s + 1 or s + 2 gets (candidates come best first, so matched as sets)."""
    seed = 41
    many = client.post(path, json={**req, "seed": seed, "n": 3})
    assert many.status_code == 200, many.text
    cands = [(c["text"], c["confidence"]) for c in many.json()["candidates"]]
    assert len({conf for _, conf in cands}) == 3, cands  # three seeds, three draws
    for i in range(3):
        one = client.post(path, json={**req, "seed": seed + i}).json()["candidates"]
        assert len(one) == 1
        text, conf = one[0]["text"], one[0]["confidence"]
        match = [c for c in cands if c[0] == text and c[1] == pytest.approx(conf, rel=1e-4)]
        assert match, f"seed {seed + i}: {text!r} ({conf}) not among {cands}"
        cands.remove(match[0])


def test_stream_sends_a_preview_per_euler_point_then_the_result(client: httpx.Client) -> None:
    req = {"text": PASSAGE.replace("heaven", "[MASK]"), "seed": 3, "steps": 4, "stream": True}
    events = []
    with client.stream("POST", "/v1/infill", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    previews = [d for k, d in events if k == "preview"]
    assert [p["step"] for p in previews] == [0, 1, 2, 3]
    assert events[-1][0] == "result"
    plain = client.post("/v1/infill", json={**req, "stream": False}).json()
    assert events[-1][1]["text"] == plain["text"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/infill", {"text": "no placeholder here"}, 422, "[MASK]"),
        ("/v1/infill", {"text": "word " * 400 + "[MASK]"}, 400, "at most"),
        ("/v1/infill", {"text": "a [MASK:0] b"}, 400, "budget"),
        ("/v1/infill", {"text": "a [MASK] b", "steps": 0}, 422, "steps"),
        ("/v1/infill", {"text": "a [MASK] b", "steps": 99}, 400, "steps"),
        ("/v1/complete", {"prompt": "x", "max_tokens": 4000}, 400, "target positions"),
        ("/v1/complete", {"prompt": "   "}, 422, "empty"),
        ("/v1/complete", {"prompt": 3}, 422, "prompt"),
        ("/v1/complete", {}, 422, "prompt"),
        ("/v1/complete", {"prompt": "x", "n": 0}, 422, "n"),
        ("/v1/complete", {"prompt": "x", "seed": -1}, 422, "seed"),
        ("/v1/complete", {"prompt": "x", "routing": "best"}, 422, "routing"),
        ("/v1/complete", {"prompt": "x", "bogus": 1}, 422, "bogus"),
        ("/v1/qa", {"context": "c", "question": ""}, 422, "question"),
        ("/v1/classify", {"text": "t", "labels": []}, 422, "labels"),
        ("/v1/completions", {"prompt": "x", "top_p": 0.5}, 422, "top_p"),
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "other"),
        ("/v1/classify", {"text": "t", "labels": ["law", " "]}, 422, "blank"),
        ("/v1/classify", {"text": "  "}, 422, "blank"),
        ("/v1/complete", {"prompt": "x", "seed": 2**53}, 422, "seed"),
    ],
)
def test_bad_inputs_get_their_status_and_a_json_message(
    client: httpx.Client, path: str, body: dict, status: int, needle: str
) -> None:
    err = error_of(client.post(path, json=body), status)
    assert needle.lower() in err["message"].lower()


def test_malformed_json_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    r = client.post(
        "/v1/infill", content=b"{not json", headers={"content-type": "application/json"}
    )
    error_of(r, 422)
    error_of(client.get("/v1/nothing"), 404)
    error_of(client.get("/v1/infill"), 405)


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = {"text": "a [MASK] " + "x" * (1 << 20)}
    error_of(client.post("/v1/infill", json=big), 413)
    # chunked upload without Content-Length is held to the same limit
    chunks = iter([b'{"text": "', b"y" * (1 << 20), b'[MASK]"}'])
    error_of(client.post("/v1/infill", content=chunks), 413)


def test_api_key() -> None:
    s = ServerProcess("--api-key", "s3cret").wait_ready()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            req = {"prompt": "And God said", "max_tokens": 2}
            err = error_of(c.post("/v1/complete", json=req), 401)
            assert "key" in err["message"]
            bad = {"Authorization": "Bearer nope"}
            error_of(c.post("/v1/complete", json=req, headers=bad), 401)
            ok = {"Authorization": "Bearer s3cret"}
            assert c.post("/v1/complete", json=req, headers=ok).status_code == 200
            assert c.get("/health").status_code == 200  # probes stay open
            assert c.get("/metrics").status_code == 200
    finally:
        assert s.stop() == 0


def test_bad_flags_exit_with_one_line(tmp_path) -> None:
    import json
    import shutil
    import subprocess
    import sys

    ar = tmp_path / "ar"  # an AR checkpoint whose config has a field of the wrong type
    shutil.copytree(Path(__file__).resolve().parents[2] / "weights" / "ar-tiny-kjv", ar)
    cfg = json.loads((ar / "config.json").read_text())
    (ar / "config.json").write_text(json.dumps({**cfg, "n_embd": "wide"}))
    bad = (
        ["--model", str(tmp_path)],
        ["--model", str(ar)],
        ["--device", "tpu"],
        ["--max-queue", "0"],
        ["--port", "abc"],
        ["--bogus"],
    )
    for args in bad:
        p = subprocess.run(
            [sys.executable, "-m", "yan_serve", *args], capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("yan-serve: error:"), p.stderr
