"""Every [MASK] gets at least one word unless the request allows an empty span, and a span's
confidence comes from its own word tokens (an empty or forced fill never reports 1.0)."""

from __future__ import annotations

import httpx

TEXT = "In the beginning God created the [MASK] and the earth."


def test_each_mask_gets_a_word_with_its_own_confidence(client: httpx.Client) -> None:
    body = {"text": TEXT, "seed": 0, "return_confidence": True}
    r = client.post("/v1/infill", json=body)
    assert r.status_code == 200, r.text
    cand = r.json()["candidates"][0]
    (fill,) = cand["fills"]
    assert fill.strip(), "the shipped checkpoint pads this gap: the server must still fill it"
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
