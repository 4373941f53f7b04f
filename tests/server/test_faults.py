"""Backpressure (429), request timeout (504), client disconnect, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from tests.server.conftest import CHECKPOINT, ServerProcess, free_port

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


FAULTY = """
import sys, time
import yan_serve.server.loader as loader
from yan_serve.server.main import main

real = loader.load_worker


class Faulty:
    \"\"\"The real worker, failing on seeds 666 (refused) and 667 (a bug); slow on 668.\"\"\"

    def __init__(self, w):
        self.w = w

    def __getattr__(self, name):
        return getattr(self.w, name)

    def run(self, requests):
        for r in requests:
            if r.seed == 666:
                raise ValueError("seed 666 cannot be served")
            if r.seed == 667:
                raise RuntimeError("secret internal detail")
            if r.seed == 668:
                time.sleep(8)
        return self.w.run(requests)


loader.load_worker = lambda *a, **k: Faulty(real(*a, **k))
sys.exit(main(sys.argv[1:]))
"""


class FaultyServer(ServerProcess):
    """A server whose worker fails on chosen seeds (`FAULTY`)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--model", str(CHECKPOINT), "--device", "cpu", "--port", str(self.port),
                 "--threads", "1", "--log-level", "warning", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAULTY, *flags],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def shared_batches(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    rows = dict(re.findall(r'^yan:batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.M))
    return float(rows["+Inf"]) - float(rows["1.0"])


def test_a_failing_request_fails_alone_with_its_own_status() -> None:
    """Requests batched with a failing one get their answers; the failing one gets 400 with its
    own message (refused) or a 500 that tells nothing of the cause (a bug), streamed or not."""
    s = FaultyServer("--max-wait-ms", "500").wait_ready()  # the requests below share a batch
    try:
        one = {"prompt": "And God said", "max_tokens": 5}

        async def together() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                seeds = [0, 1, 666, 2, 667, 3]
                reqs = [c.post("/v1/complete", json={**one, "seed": i}) for i in seeds]
                reqs.append(c.post("/v1/complete", json={**one, "seed": 667, "stream": True}))
                return await asyncio.gather(*reqs)

        before = shared_batches(s.url)
        *rs, stream = asyncio.run(together())
        assert shared_batches(s.url) == before + 1, "the requests did not share one batch"
        codes = [r.status_code for r in rs]
        assert codes == [200, 200, 400, 200, 500, 200], [r.text for r in rs]
        alone = [httpx.post(s.url + "/v1/complete", json={**one, "seed": i}, timeout=60)
                 for i in range(4)]  # fmt: skip
        good = [r.json()["text"] for r in rs if r.status_code == 200]
        assert good == [r.json()["text"] for r in alone]
        assert rs[2].json()["error"]["message"] == "seed 666 cannot be served"
        assert rs[4].json()["error"] == {"message": "internal error; see the server log",
                                         "type": "internal_error", "code": 500}  # fmt: skip
        assert stream.status_code == 200
        event, data = stream.text.strip().split("\n")
        assert event == "event: error"
        assert json.loads(data.removeprefix("data: ")) == {"error": rs[4].json()["error"]}
    finally:
        assert s.stop() == 0
    log = s.proc.stdout.read()
    assert "secret internal detail" in log  # the traceback is the server's, not the client's


def test_sigterm_exits_at_the_deadline_without_waiting_for_the_running_batch() -> None:
    timeout = 1.0
    s = FaultyServer("--shutdown-timeout", str(timeout)).wait_ready()

    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            slow = asyncio.create_task(c.post("/v1/complete", json={"prompt": "In", "seed": 668}))
            while "\nyan:jobs_running 1.0" not in (await c.get("/metrics")).text:
                await asyncio.sleep(0.02)  # the 8-second batch is on the model
            t0 = time.perf_counter()
            s.proc.send_signal(signal.SIGTERM)
            r = await slow
            await asyncio.to_thread(s.proc.wait, 30)
            return r, time.perf_counter() - t0

    r, exited = asyncio.run(scenario())
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
    assert s.proc.returncode == 0
    assert exited < timeout + 3.0, exited  # not the batch's 8 s


def test_the_server_logs_its_address_before_the_model_loads() -> None:
    """The README tells a user to wait for this line; uvicorn prints none for the sockets the
    server binds itself."""
    s = ServerProcess("--log-level", "info").wait_ready()
    assert s.stop() == 0
    out = s.proc.stdout.read()
    line = f"listening on http://127.0.0.1:{s.port}"
    assert line in out, out
    assert out.index(line) < out.index("ready on cpu"), out
