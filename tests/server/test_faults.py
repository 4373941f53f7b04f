"""Backpressure (429), request timeout (504), client disconnect, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.server.conftest import ServerProcess

QA = {
    "context": " ".join(f"Person{i} went to the kitchen." for i in range(9)),
    "question": "Where is Person3?",
    "max_tokens": 8,
}


async def fire(url: str, n: int, body: dict, path: str = "/v1/qa") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post(path, json={**body, "seed": i}) for i in range(n)))


def test_full_queue_answers_429_and_admitted_requests_succeed() -> None:
    s = ServerProcess("--max-queue", "2", "--max-batch-size", "1").wait_ready()
    try:
        rs = asyncio.run(fire(s.url, 40, QA))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) > 0 and codes.count(200) >= 2, codes
        for r in rs:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["answer"] is not None
        assert 'yan:rejected_total{reason="queue_full"}' in httpx.get(s.url + "/metrics").text
    finally:
        assert s.stop() == 0


def test_request_timeout_is_504_and_the_server_keeps_serving() -> None:
    s = ServerProcess("--request-timeout", "0.05", "--max-batch-size", "1").wait_ready()
    try:
        rs = asyncio.run(fire(s.url, 12, {**QA, "n": 4}))  # ~48 queued jobs: well over 0.05 s
        codes = [r.status_code for r in rs]
        assert 504 in codes and set(codes) <= {200, 504}, codes
        assert next(r for r in rs if r.status_code == 504).json()["error"]["type"] == "timeout"
        time.sleep(0.5)
        assert httpx.get(s.url + "/ready").status_code == 200
        metrics = httpx.get(s.url + "/metrics").text
        assert 'yan:rejected_total{reason="timeout"}' in metrics
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_in_flight_work_refuses_new_and_exits_0() -> None:
    s = ServerProcess("--max-batch-size", "1", "--shutdown-timeout", "60").wait_ready()

    async def scenario() -> tuple[list[httpx.Response], list[int]]:
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            tasks = [
                asyncio.create_task(c.post("/v1/qa", json={**QA, "seed": i})) for i in range(24)
            ]
            while True:  # wait until the batcher has queued work
                m = (await c.get("/metrics")).text
                depth = float(m.split("\nyan:queue_depth ")[1].split()[0])
                if depth >= 5:
                    break
                await asyncio.sleep(0.01)
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            late = []
            for _ in range(3):
                try:
                    late.append((await c.post("/v1/qa", json=QA)).status_code)
                    late.append((await c.get("/ready")).status_code)
                except httpx.TransportError:
                    late.append(-1)  # already closed: acceptable only after the drain
            return await asyncio.gather(*tasks), late

    done, late = asyncio.run(scenario())
    assert [r.status_code for r in done] == [200] * 24
    assert late[0] == 503 and late[1] == 503, late
    assert s.proc.wait(60) == 0


def test_client_disconnect_drops_its_queued_work() -> None:
    s = ServerProcess("--max-batch-size", "1").wait_ready()
    try:
        # 30 requests x 8 candidates = 240 single-job batches: seconds of work. Once the server
        # has queued them, the client goes away (tasks cancelled, connections closed).
        async def abandon() -> None:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                tasks = [asyncio.create_task(c.post("/v1/qa", json={**QA, "seed": i, "n": 8}))
                         for i in range(30)]  # fmt: skip
                async with httpx.AsyncClient(base_url=s.url, timeout=10) as probe:
                    while True:
                        m = (await probe.get("/metrics")).text
                        if float(m.split("\nyan:queue_depth ")[1].split()[0]) >= 100:
                            break
                        await asyncio.sleep(0.02)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(abandon())
        pattern = 'yan:rejected_total{reason="disconnect"} '
        deadline = time.time() + 30
        while time.time() < deadline:
            metrics = httpx.get(s.url + "/metrics").text
            if pattern in metrics and float(metrics.split("\nyan:queue_depth ")[1].split()[0]) == 0:
                break
            time.sleep(0.2)
        assert pattern in metrics, "no disconnect was seen"
        assert float(metrics.split(pattern)[1].split()[0]) > 0
        served = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("yan:batch_size_count")
        )
        assert served < 30 * 8  # the abandoned jobs never reached the model
        assert httpx.get(s.url + "/ready").status_code == 200
    finally:
        assert s.stop() == 0
