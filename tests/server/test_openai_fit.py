"""/v1/completions fits OpenAI clients (#17): suffix infilling, stream usage, OpenAI-shaped
errors, deterministic greedy decoding, echoed prompt log-probabilities; /docs works offline."""

from __future__ import annotations

import functools
import json
import math
import re

import httpx
import openai
import pytest

from tests.server.conftest import CHECKPOINT, ServerProcess

PROMPT = "And God said, Let there be light"


@functools.cache
def reference():
    """The shipped checkpoint in this process: (tokenizer, sampler), to check served numbers."""
    from yan_serve.engine import Sampler
    from yan_serve.weights import from_pretrained, load_tokenizer

    model = from_pretrained(CHECKPOINT)
    return load_tokenizer(CHECKPOINT, model.config), Sampler(model)


def prefix_scores(ids: list[int], seed: int, k: int = 0) -> list[tuple[float, int]]:
    """(log p(token i | tokens before it), the most likely token there) for i >= 1, computed
    with Sampler.score as the server documents it: source = prefix + <mask>, target = the rest
    of the prompt + EOS, position 0; the checkpoint's steps (`ode_steps`), argmax routing."""
    import torch

    from yan_serve.engine import GenerationRequest

    tok, sampler = reference()
    sp = tok.special
    steps = sampler.model.config.ode_steps  # what the server uses when a request names none
    out = []
    for i in range(1, len(ids)):
        req = GenerationRequest([*ids[:i], sp.mask], len(ids) - i + 1, seed)
        lp = sampler.score([req], [[*ids[i:], sp.eos]], steps=steps, routing="argmax")[0][0]
        batch = sampler.prepare([req])
        z = sampler.solve(batch, steps, "argmax").z
        best = int(torch.argmax(sampler.model.decode_logits(z)[0, 0]))
        out.append((lp, best))
    return out


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_suffix_is_infilling_and_the_text_is_the_fill(client: httpx.Client) -> None:
    prompt, suffix = "In the beginning God created the heaven ", " and the earth."
    r = client.post(
        "/v1/completions",
        json={"prompt": prompt, "suffix": suffix, "max_tokens": 3, "seed": 4, "logprobs": 0},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # the same gap through /v1/infill: same plan, same seed, so the same fill
    ref = client.post("/v1/infill", json={"text": f"{prompt}[MASK:3]{suffix}", "seed": 4})
    assert ref.status_code == 200, ref.text
    assert choice["text"] == ref.json()["fills"][0]
    assert suffix not in choice["text"] and prompt.strip() not in choice["text"]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert all(v < 0 for v in lp["token_logprobs"])
    tok, _ = reference()
    n_prompt = len(tok.encode(prompt.rstrip())) + len(tok.encode(suffix))
    assert r.json()["usage"]["prompt_tokens"] == n_prompt


def test_stream_include_usage_ends_with_a_usage_chunk(server: ServerProcess) -> None:
    c = client(server)
    kw = dict(model="yan-tiny-kjv", prompt=PROMPT, max_tokens=5, n=2, seed=3)
    plain = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(ch.usage is None for ch in chunks[:-1]) and all(ch.choices for ch in chunks[:-1])
    texts = {i: "".join(ch.choices[0].text for ch in chunks[:-1] if ch.choices[0].index == i)
             for i in (0, 1)}  # fmt: skip
    assert texts == {ch.index: ch.text for ch in plain.choices}


def test_unknown_model_is_404_model_not_found(server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-4" in e.value.message
    body = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).json()
    assert body["error"]["param"] == "model" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"prompt": "And God said " * 100}, "prompt"), ({"max_tokens": 3000}, "max_tokens")],
)
def test_too_long_for_the_context_is_openai_400(
    server: ServerProcess, extra: dict, param: str
) -> None:
    kw = {"model": "yan-tiny-kjv", "prompt": "x", **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(**kw)
    assert e.value.code == "context_length_exceeded" and e.value.param == param
    assert e.value.body["message"].startswith("This model's maximum context length is 256 tokens.")


def test_temperature_0_without_seed_is_deterministic_and_candidates_differ(
    server: ServerProcess,
) -> None:
    c = client(server)
    kw = dict(model="yan-tiny-kjv", prompt="Blessed are the poor in spirit", max_tokens=8, n=4,
              logprobs=1)  # fmt: skip

    def run(**more) -> list[tuple[str, list[float]]]:
        choices = c.completions.create(**{**kw, **more}).choices
        return [(ch.text, ch.logprobs.token_logprobs) for ch in choices]

    a = run(temperature=0)
    assert a == run()  # absent: greedy too
    # the n candidates keep their own seeds (0, 1, ...): candidate k is the request with seed k
    # (its text exactly; its noise, hence its log-probabilities, its own). A trained model may
    # write the same words from different noise, so the texts alone need not differ.
    assert len({tuple(lp) for _, lp in a}) == len(a)
    for k, (text, lp) in enumerate(a):
        [(solo_text, solo_lp)] = run(n=1, seed=k)
        assert solo_text == text
        assert solo_lp == pytest.approx(lp, rel=1e-4, abs=1e-5)
    assert run(seed=0) == a  # the documented default seed is 0


def test_echo_logprobs_score_every_prompt_token(client: httpx.Client) -> None:
    tok, _ = reference()
    ids = tok.encode(PROMPT)
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 1, "seed": 5}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
    assert lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids]
    assert lp["text_offset"][: len(ids)] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    assert lp["text_offset"][-1] == len(PROMPT)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i, (want, best) in enumerate(prefix_scores(ids, seed=5), start=1):
        got = lp["token_logprobs"][i]
        assert math.isclose(got, want, abs_tol=1e-4), (i, got, want)
        top = lp["top_logprobs"][i]
        assert len(top) <= 3 and top[lp["tokens"][i]] == got
        assert max(top, key=top.get) == tok.decode([best])
        assert (max(top.values()) == got) == (best == ids[i])  # lm-eval's is_greedy test
    # a token-id prompt is the same request
    same = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert same["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    assert same["choices"][0]["text"] == choice["text"]
    # only the prompt: max_tokens 0 runs no generation
    only = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]
    assert only["text"] == PROMPT and only["logprobs"]["tokens"] == lp["tokens"][:-1]


def test_bad_token_ids_are_400(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": [5, 10**6], "max_tokens": 1})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"


def test_docs_page_works_offline(client: httpx.Client) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger-ui" in r.text
    assert not re.search(r"https?://", r.text), "the page must not load anything from a CDN"
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for a in assets:
        got = client.get(a)
        assert got.status_code == 200 and len(got.content) > 500, a
    assert "SwaggerUIBundle" in client.get(next(a for a in assets if a.endswith(".js"))).text
    assert json.loads(client.get("/openapi.json").text)["info"]["title"] == "yan-serve"


def test_docs_without_the_assets_package_is_a_503_not_a_crash(monkeypatch) -> None:
    """Where swagger-ui-bundle is missing (an image with only the server's minimal wheels) the
    app still builds and serves; /docs says which package it needs."""
    import builtins

    from fastapi.testclient import TestClient

    from yan_serve.server.docs import install_docs

    real_import = builtins.__import__

    def no_bundle(name, *args, **kwargs):
        if name.startswith("swagger_ui_bundle"):
            raise ImportError("No module named 'swagger_ui_bundle'")
        return real_import(name, *args, **kwargs)

    from fastapi import FastAPI

    app = FastAPI(docs_url=None, redoc_url=None)
    monkeypatch.setattr(builtins, "__import__", no_bundle)
    install_docs(app)
    monkeypatch.undo()
    r = TestClient(app).get("/docs")
    assert r.status_code == 503 and "swagger-ui-bundle" in r.json()["error"]["message"]
