"""The same server and endpoints on an AR (GPT-2) checkpoint."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, assert_completions_ignore_batching


@pytest.fixture(scope="module")
def ar_server(ar_checkpoint: Path):
    s = ServerProcess("--model", str(ar_checkpoint), "--max-wait-ms", "20").wait_ready()
    yield s
    assert s.stop() == 0


def test_every_endpoint_answers_on_an_ar_checkpoint(ar_server: ServerProcess) -> None:
    text = "In the beginning God created the [MASK] and the [MASK:2]."
    with httpx.Client(base_url=ar_server.url, timeout=120) as c:
        for protocol in ("fim", "full"):
            r = c.post("/v1/infill", json={"text": text, "seed": 0, "protocol": protocol})
            assert r.status_code == 200, r.text
            body = r.json()
            a, b = body["fills"]
            assert body["text"] == f"In the beginning God created the{a} and the{b}."
        r = c.post("/v1/complete", json={"prompt": "And God said", "max_tokens": 6,
                                         "ignore_eos": True, "seed": 0})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        r = c.post("/v1/qa", json={"context": "Mary went home.", "question": "Where is Mary?",
                                   "max_tokens": 2, "seed": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        r = c.post("/v1/classify", json={"text": "Blessed are the meek", "labels": ["law",
                                         "gospels"]})  # fmt: skip
        assert r.status_code == 200 and len(r.json()["scores"]) == 2
        r = c.post("/v1/completions", json={"prompt": "And God said", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        assert c.get("/v1/models").json()["data"][0]["id"] == ar_server_id(ar_server)


def ar_server_id(s: ServerProcess) -> str:
    return Path(s.proc.args[s.proc.args.index("--model", 4) + 1]).name


def test_ar_results_do_not_depend_on_batching(ar_server: ServerProcess) -> None:
    assert_completions_ignore_batching(ar_server.url)


def test_echo_logprobs_on_an_ar_checkpoint(ar_server: ServerProcess) -> None:
    """Each prompt token after the first is scored by the AR model after its prefix (+ the
    completion format's <mask> and BOS), and top_logprobs hold the AR model's own argmax."""
    import torch

    from yan_serve.ar.generate import ar_score
    from yan_serve.ar.model import load_ar
    from yan_serve.tokenizer import YANTokenizer

    d = Path(ar_server.proc.args[ar_server.proc.args.index("--model", 4) + 1])
    tok, model = YANTokenizer.load(d), load_ar(d)
    ids = tok.encode("And God said unto Moses")
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "seed": 0}
    lp = httpx.post(ar_server.url + "/v1/completions", json=body, timeout=60).json()
    lp = lp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    sp = tok.special
    for i in range(1, len(ids)):
        prompt, target = [*ids[:i], sp.mask, sp.bos], [*ids[i:], sp.eos]
        want = ar_score(model, [prompt], [target], sp.pad)[0][0]
        assert abs(lp["token_logprobs"][i] - want) < 1e-4
        with torch.no_grad():
            best = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
        top = lp["top_logprobs"][i]
        assert max(top, key=top.get) == tok.decode([best], skip_special=False)
