"""Waiting for jobs, streamed and not, and the `Gate` middleware, in process on a fake worker:
how a job's failure is answered, --request-timeout 0, and how disconnects are counted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from yan_serve.engine.requests import EngineRequest
from yan_serve.server import dispatch
from yan_serve.server.batcher import Batcher
from yan_serve.server.errors import INTERNAL_ERROR, APIError
from yan_serve.server.metrics import Metrics
from yan_serve.server.middleware import Gate
from yan_serve.server.settings import Settings
from yan_serve.server.state import State
from yan_serve.server.streaming import preview_stream

SECRET = "secret internal detail"


class Worker:
    """Echoes each request's seed after `delay` seconds; seed 66 is refused (ValueError), seed
    67 hits a bug (RuntimeError with an internal message), seed 68 runs out of memory."""

    tokenizer = None  # no previews: the worker never calls on_step

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def run(self, requests):
        for r in requests:
            if r.seed == 66:
                raise ValueError("seed 66 cannot be served")
            if r.seed == 67:
                raise RuntimeError(SECRET)
            if r.seed == 68:
                raise RuntimeError("CUDA out of memory")
        time.sleep(self.delay)
        return [r.seed * 10 for r in requests]


class Client:
    """The part of a Starlette `Request` that `dispatch.wait` uses."""

    def __init__(self) -> None:
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


def state_with(worker: Worker, max_wait_ms: float = 0.0, **settings) -> State:
    state = State(Settings(**settings), Metrics())
    state.worker, state.ready = worker, True  # type: ignore[assignment]
    state.batcher = Batcher(worker, 8, max_wait_ms, metrics=state.metrics)
    state.batcher.start()
    return state


def req(seed: int) -> EngineRequest:
    return EngineRequest(src=[5] * 4, tgt_len=4, seed=seed, steps=3)


def rejected(state: State, reason: str) -> float:
    return state.metrics.rejected.labels(reason)._value.get()


async def answer(state: State, seeds: list[int]) -> list[int] | APIError:
    try:
        client: Any = Client()
        return (await dispatch.run(state, client, [req(s) for s in seeds]))[1]
    except APIError as e:
        return e


class Body(BaseModel):
    results: list[int]


async def events(state: State, seeds: list[int]) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a preview stream of the seeds' jobs."""
    body = lambda jobs, results: Body(results=results)  # noqa: E731
    stream = preview_stream(state, [req(s) for s in seeds], body, time.perf_counter())
    out = []
    async for chunk in stream.body_iterator:
        head, data = chunk.decode().strip().split("\n")
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_a_job_failure_answers_its_own_status_and_hides_internal_messages() -> None:
    """A refused request is a 400 with its message; a bug is a 500 that says nothing of the
    cause (the batcher logged it); out of memory a 503. Requests batched with a failing one get
    their results."""

    async def main():
        state = state_with(Worker(delay=0.05))
        out = await asyncio.gather(*(answer(state, [s]) for s in (1, 66, 2, 67, 3, 68, 4)))
        await state.batcher.stop()
        return out

    good1, refused, good2, bug, good3, oom, good4 = asyncio.run(main())
    assert (good1, good2, good3, good4) == ([10], [20], [30], [40])
    assert isinstance(refused, APIError) and refused.status == 400
    assert refused.message == "seed 66 cannot be served"
    assert isinstance(bug, APIError) and (bug.status, bug.type) == (500, "internal_error")
    assert SECRET not in bug.message
    assert isinstance(oom, APIError) and oom.status == 503


def test_a_stream_reports_a_failure_as_the_non_streaming_call_does() -> None:
    async def main():
        state = state_with(Worker())
        out = [await events(state, seeds) for seeds in ([66], [67], [5])]
        await state.batcher.stop()
        return out

    refused, bug, good = asyncio.run(main())
    message = "seed 66 cannot be served"
    assert refused == [("error", {"error": {"message": message, "type": "invalid_request_error",
                                            "code": 400}})]  # fmt: skip
    message = INTERNAL_ERROR
    assert bug == [("error", {"error": {"message": message, "type": "internal_error",
                                        "code": 500}})]  # fmt: skip
    assert good == [("result", {"results": [50]})]


def test_a_stream_split_off_a_failing_batch_previews_each_time_point_once() -> None:
    """The retry of a split batch runs the stream's job again from the first time point."""

    class Previewing(Worker):
        tokenizer = SimpleNamespace(special=SimpleNamespace(eos=-1), decode=str)

        def run(self, requests):
            for step in range(3):
                for r in requests:
                    if r.on_step is not None:
                        r.on_step(step, [r.seed, step])
            return super().run(requests)

    async def main():
        state = state_with(Previewing(), max_wait_ms=100)  # the two requests share a batch
        out = await asyncio.gather(events(state, [5]), answer(state, [67]))
        await state.batcher.stop()
        return out

    (streamed, failed) = asyncio.run(main())
    assert isinstance(failed, APIError) and failed.status == 500
    previews = [(d["index"], d["step"]) for e, d in streamed if e == "preview"]
    assert previews == [(0, 0), (0, 1), (0, 2)]
    assert streamed[-1] == ("result", {"results": [50]})


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_0_means_no_timeout(stream: bool) -> None:
    async def main():
        state = state_with(Worker(delay=0.2), request_timeout=0)
        out = await (events(state, [3]) if stream else answer(state, [3]))
        await state.batcher.stop()
        return out

    out = asyncio.run(main())
    assert out == ([("result", {"results": [30]})] if stream else [30])


def test_a_timed_out_stream_reports_what_the_non_streaming_call_does() -> None:
    async def main():
        state = state_with(Worker(delay=0.3), request_timeout=0.05)
        plain = await answer(state, [3])
        streamed = await events(state, [4])
        await state.batcher.stop()
        return plain, streamed

    plain, streamed = asyncio.run(main())
    assert isinstance(plain, APIError) and plain.status == 504
    want = {"message": plain.message, "type": plain.type, "code": plain.status}
    assert streamed == [("error", {"error": want})]
    assert "0.05 s" in plain.message


def queued_stream_left(leave: Callable[[Any], Awaitable[None]]) -> tuple[State, float, float]:
    """A preview stream of two jobs queued behind a busy worker, whose client leaves as
    `leave(response)` does: (state, the queue depth before, the depth after)."""

    async def main():
        state = state_with(Worker(delay=0.3))
        busy = asyncio.ensure_future(answer(state, [1]))  # holds the worker
        await asyncio.sleep(0.05)
        body = lambda jobs, results: Body(results=results)  # noqa: E731
        response = preview_stream(state, [req(2), req(3)], body, time.perf_counter())
        queued = state.metrics.queue_depth._value.get()
        await leave(response)
        await asyncio.sleep(0)
        after = state.metrics.queue_depth._value.get()
        await busy
        await state.batcher.stop()
        return state, queued, after

    return asyncio.run(main())


def test_a_stream_whose_client_leaves_drops_its_jobs_and_counts_a_disconnect() -> None:
    """Starlette cancels the response (and so the stream's generator) when the client goes."""

    async def leave(response) -> None:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:  # ASGI 2.4: the response does not listen
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        call = asyncio.ensure_future(response(scope, receive, send))
        await asyncio.sleep(0.05)
        assert [m["type"] for m in sent] == ["http.response.start"]  # streaming, no event yet
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    state, queued, after = queued_stream_left(leave)
    assert rejected(state, "disconnect") == 1
    assert (queued, after) == (2, 0)


def test_a_stream_whose_client_left_before_its_first_byte_drops_its_jobs() -> None:
    """Starlette gives up at the response's start (the send fails) without starting the events'
    generator: the queued jobs are dropped and the disconnect counted all the same."""
    from starlette.requests import ClientDisconnect

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("the client is gone")

    async def leave(response) -> None:
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(ClientDisconnect):
            await response(scope, receive, send)

    state, queued, after = queued_stream_left(leave)
    assert (queued, after) == (2, 0)
    assert rejected(state, "disconnect") == 1


def test_a_client_gone_while_uploading_is_a_disconnect_not_a_500() -> None:
    state = State(Settings(), Metrics())
    messages = [
        {"type": "http.request", "body": b'{"prompt": "In the', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return messages.pop(0)

    async def send(msg):
        raise AssertionError(f"nothing can be sent to a gone client: {msg}")

    async def app(scope, receive, send):
        raise AssertionError("the route never runs without the whole body")

    scope = {"type": "http", "path": "/v1/complete", "method": "POST", "headers": []}
    asyncio.run(Gate(app, state)(scope, receive, send))
    counted = {
        s.labels["status"]: s.value
        for m in state.metrics.requests.collect()
        for s in m.samples
        if s.name == "yan:requests_total" and s.labels["endpoint"] == "/v1/complete"
    }
    assert counted == {"499": 1.0}
    assert rejected(state, "disconnect") == 1
