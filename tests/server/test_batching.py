"""64 concurrent requests: all succeed, are batched, and equal the same requests sent alone."""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.server.conftest import ServerProcess

VERSES = [
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And the evening and the morning were the first day.",
    "Blessed are the meek: for they shall inherit the earth.",
    "The LORD is my shepherd; I shall not want.",
    "Vanity of vanities, saith the Preacher; all is vanity.",
    "Let not your heart be troubled: ye believe in God, believe also in me.",
]


def payloads() -> list[tuple[str, dict]]:
    out = []
    for i in range(64):
        v = VERSES[i % len(VERSES)]
        words = v.split()
        kind = i % 4
        if kind == 0:
            words[2 + i % 4] = "[MASK]"
            out.append(("/v1/infill", {"text": " ".join(words), "seed": i, "routing": "sample"}))
        elif kind == 1:
            out.append(
                (
                    "/v1/complete",
                    {"prompt": " ".join(words[:-1]), "max_tokens": 4 + i % 9, "seed": i},
                )
            )
        elif kind == 2:
            out.append(
                (
                    "/v1/qa",
                    {
                        "context": f"Mary went to the kitchen. {v}",
                        "question": "Where is Mary?",
                        "seed": i,
                    },
                )
            )
        else:
            out.append(("/v1/classify", {"text": v, "seed": i}))
    return out


def batch_histogram(metrics: str) -> dict[str, float]:
    rows = re.findall(r'^yan:batch_size_bucket\{le="([^"]+)"\} (\S+)$', metrics, re.M)
    return {le: float(v) for le, v in rows}


def test_concurrent_requests_are_batched_and_batch_independent() -> None:
    s = ServerProcess("--max-wait-ms", "50", "--max-batch-size", "64").wait_ready()
    try:
        reqs = payloads()

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                return await asyncio.gather(*(c.post(p, json=b) for p, b in reqs))

        together = asyncio.run(fire())
        assert [r.status_code for r in together] == [200] * 64, [r.text for r in together][:3]
        hist = batch_histogram(httpx.get(s.url + "/metrics").text)
        assert hist["1.0"] < hist["+Inf"], hist  # some batches held more than one job

        with httpx.Client(base_url=s.url, timeout=60) as c:
            alone = [c.post(p, json=b) for p, b in reqs]
        for (path, _), a, b in zip(reqs, together, alone, strict=False):
            ja, jb = a.json(), b.json()
            assert ja["text"] == jb["text"], (path, ja["text"], jb["text"])
            assert ja["usage"] == jb["usage"]
    finally:
        assert s.stop() == 0
