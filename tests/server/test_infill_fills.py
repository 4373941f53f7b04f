"""Every [MASK] gets at least one word unless the request allows an empty span, and a span's
confidence comes from its own word tokens (an empty or forced fill never reports 1.0).

The server runs a copy of the default checkpoint whose decoder favours <pad> (its output bias
raised), so the model would leave every gap empty whatever the shipped weights have learned."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.server.conftest import CHECKPOINT, ServerProcess

TEXT = "In the beginning God created the [MASK] and the earth."


def pad_loving_checkpoint(out: Path) -> Path:
    """The default checkpoint with <pad>'s output bias raised just enough that the model pads
    TEXT's gap while a forced word keeps a non-zero probability."""
    import torch

    from yan_serve.engine.sampler import GenerationRequest, Sampler
    from yan_serve.tasks import serving as T
    from yan_serve.weights import from_pretrained, load_tokenizer

    model = from_pretrained(CHECKPOINT).eval()
    tok = load_tokenizer(CHECKPOINT, model.config)
    pad = tok.special.pad
    plan = T.plan_infill(tok, TEXT, model.config.max_length, infill_masks=model.config.infill_masks)
    a, b = plan.fill_slots[0]
    bias0 = model.decoder.lm_head.bias.detach().clone()
    for boost in range(8, 41, 2):
        with torch.no_grad():
            model.decoder.lm_head.bias.copy_(bias0)
            model.decoder.lm_head.bias[pad] += boost
        free, forced = Sampler(model).generate(
            [GenerationRequest(plan.src, plan.tgt_len, 0),
             GenerationRequest(plan.src, plan.tgt_len, 0, content=T.content_positions(plan))],
            routing="argmax",
        )  # fmt: skip
        if set(free.full[a:b]) == {pad} and forced.full_confidence[a] > 1e-3:
            break
    else:
        raise AssertionError("no output bias makes the default checkpoint pad the gap")
    shutil.copytree(CHECKPOINT, out)
    weights = load_file(out / "model.safetensors")
    weights["decoder.lm_head.bias"] = model.decoder.lm_head.bias.detach().float()  # exact
    save_file(weights, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    ckpt = pad_loving_checkpoint(tmp_path_factory.mktemp("pad") / "ckpt")
    server = ServerProcess("--model", str(ckpt)).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            yield c
    finally:
        server.stop()


def test_each_mask_gets_a_word_with_its_own_confidence(client: httpx.Client) -> None:
    body = {"text": TEXT, "seed": 0, "return_confidence": True}
    r = client.post("/v1/infill", json=body)
    assert r.status_code == 200, r.text
    cand = r.json()["candidates"][0]
    (fill,) = cand["fills"]
    assert fill.strip(), "the model pads this gap: the server must still fill it"
    assert r.json()["text"] == TEXT.replace("[MASK]", fill.strip())
    (fc,) = cand["fill_confidence"]
    assert 0.0 < fc < 0.5 and cand["confidence"] == fc  # the model preferred padding here
    # the span's confidence is the mean over its word tokens, not over its padded positions
    assert fc < sum(cand["token_confidence"]) / len(cand["token_confidence"])


def test_allow_empty_lets_a_span_stay_empty(client: httpx.Client) -> None:
    r = client.post("/v1/infill", json={"text": TEXT, "seed": 0, "allow_empty": True})
    cand = r.json()["candidates"][0]
    assert cand["fills"] == [""] and cand["fill_confidence"] == [0.0]
    assert cand["confidence"] == 0.0
    assert r.json()["usage"]["completion_tokens"] == 0  # padding is not written text


def test_an_empty_answer_reports_no_confidence(client: httpx.Client) -> None:
    # this checkpoint pads the answer too: an empty answer's confidence is 0.0, not the
    # probability of the padding where the answer would be
    body = {"context": "And God said, Let there be light.", "question": "What was there?",
            "seed": 0, "max_tokens": 2, "return_confidence": True}  # fmt: skip
    r = client.post("/v1/qa", json=body)
    assert r.status_code == 200, r.text
    cand = r.json()["candidates"][0]
    assert r.json()["answer"] == "" and cand["text"] == ""
    assert cand["confidence"] == 0.0 and cand["token_confidence"] == []
    assert r.json()["usage"]["completion_tokens"] == 0
