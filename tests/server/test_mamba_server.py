"""The same server and endpoints on the shipped YAN-Mamba checkpoint (issue #8,
weights/yan-mamba-tiny-kjv): the bidirectional Mamba mixer behind every endpoint, streaming and
the OpenAI route included. What is checked is that each request is served, well-formed and
independent of its batch-mates; the checkpoint's quality is tests/test_default_checkpoint.py's."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ROOT, ServerProcess, assert_completions_ignore_batching

MAMBA_CHECKPOINT = ROOT / "weights" / "yan-mamba-tiny-kjv"


@pytest.fixture(scope="module")
def mamba_checkpoint() -> Path:
    return MAMBA_CHECKPOINT


@pytest.fixture(scope="module")
def mamba_server(mamba_checkpoint: Path):
    s = ServerProcess("--model", str(mamba_checkpoint), "--max-wait-ms", "20").wait_ready(180)
    yield s
    assert s.stop() == 0


def test_every_endpoint_answers_on_a_mamba_checkpoint(mamba_server, mamba_checkpoint) -> None:
    cfg = json.loads((mamba_checkpoint / "config.json").read_text())
    assert "mamba" in json.dumps(cfg).lower()  # it really is the Mamba variant
    text = "In the beginning God created the [MASK] and the [MASK:2]."
    with httpx.Client(base_url=mamba_server.url, timeout=120) as c:
        r = c.post("/v1/infill", json={"text": text, "seed": 0})
        assert r.status_code == 200, r.text
        a, b = r.json()["fills"]
        assert r.json()["text"] == f"In the beginning God created the{a} and the{b}."
        r = c.post("/v1/complete", json={"prompt": "And God said", "max_tokens": 6,
                                         "ignore_eos": True, "seed": 0})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        r = c.post("/v1/qa", json={"context": "Mary went home.", "question": "Where is Mary?",
                                   "max_tokens": 2, "seed": 0})  # fmt: skip
        assert r.status_code == 200 and "answer" in r.json()
        r = c.post("/v1/classify", json={"text": "Blessed are the meek"})
        assert r.status_code == 200 and "label" in r.json()
        r = c.post("/v1/classify", json={"text": "Blessed are the meek",
                                         "labels": ["law", "gospels", "wisdom"]})  # fmt: skip
        assert r.status_code == 200 and len(r.json()["scores"]) == 3
        r = c.post("/v1/completions", json={"prompt": "And God said", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        with c.stream("POST", "/v1/infill", json={"text": text, "stream": True, "steps": 3}) as s:
            events = [ln for ln in s.iter_lines() if ln.startswith("data:")]
        assert s.status_code == 200 and len(events) >= 3  # a preview per time point, then done
        assert c.get("/v1/models").json()["data"][0]["id"] == mamba_checkpoint.name


def test_mamba_results_do_not_depend_on_batching(mamba_server) -> None:
    assert_completions_ignore_batching(mamba_server.url)
