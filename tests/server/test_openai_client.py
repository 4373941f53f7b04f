"""The official `openai` client talks to /v1/completions unchanged."""

from __future__ import annotations

import openai

from tests.server.conftest import ServerProcess


def test_openai_client_completes_streaming_and_not(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompt = "And God said, Let there be light: and there was"
    res = client.completions.create(model="yan-tiny-kjv", prompt=prompt, max_tokens=6, seed=0)
    assert res.object == "text_completion" and len(res.choices) == 1
    choice = res.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert res.usage.completion_tokens <= 6
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model="yan-tiny-kjv", prompt=prompt, max_tokens=6, seed=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    def sampled():
        return client.completions.create(
            model="yan-tiny-kjv",
            prompt=[prompt, "In the beginning"],
            max_tokens=4,
            n=2,
            seed=1,
            temperature=0.8,
        )

    many = sampled()
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    again = sampled()
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded sampling


def test_openai_client_sees_errors_as_api_errors(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        client.completions.create(model="yan-tiny-kjv", prompt="x", max_tokens=3000)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "maximum context length" in str(e)
    else:
        raise AssertionError("expected a 400")
