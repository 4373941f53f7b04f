"""Server-sent events: the task endpoints' previews and result, and OpenAI's completion chunks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from yan_serve.engine.requests import EngineRequest, Result
from yan_serve.server import schemas as S
from yan_serve.server.batcher import Job
from yan_serve.server.dispatch import (
    admit,
    cancel,
    gather_all,
    job_error,
    request_timeout,
    timeout_error,
)
from yan_serve.server.errors import APIError
from yan_serve.server.state import State

EVENT_STREAM = "text/event-stream"


def sse(event: str, data: Any) -> bytes:
    """One named event whose data is JSON."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _EventStream(StreamingResponse):
    """An SSE response whose `cleanup` runs however it ends: also when the client is gone
    before the first byte, where Starlette gives up without ever starting (or closing) the
    events' generator, so that no `finally` in it runs."""

    def __init__(self, events: Any, cleanup: Callable[[], None] | None = None) -> None:
        super().__init__(events, media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache"})
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.cleanup is not None:
                self.cleanup()


def _response(events: Any, cleanup: Callable[[], None] | None = None) -> StreamingResponse:
    return _EventStream(events, cleanup)


def result_stream(body: BaseModel) -> StreamingResponse:
    """A stream of the one `result` event (a result computed without Euler previews)."""
    return _response(iter([sse("result", body.model_dump(mode="json"))]))


def preview_stream(
    state: State,
    requests: Sequence[EngineRequest],
    body: Callable[[list[Job], list[Result]], BaseModel],
    t0: float,
) -> StreamingResponse:
    """Queue the requests and stream a `preview` of each candidate's decoded text (cut at EOS)
    at each Euler time point, then the `result` event, `body(jobs, results)`; an `error` event
    instead on a failure (the status and message the non-streaming call would answer, see
    `job_error`) or after --request-timeout (counted from `t0`; 0: none). A client that goes
    away before the last event has its jobs dropped and is counted as a disconnect, as a
    non-streaming one is."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    tok = state.serving_worker().tokenizer
    for idx, r in enumerate(requests):

        def on_step(step: int, row: list[int], idx: int = idx) -> None:  # the model thread
            loop.call_soon_threadsafe(events.put_nowait, ("preview", idx, step, row))

        r.on_step = on_step
    jobs = admit(state, requests)

    finished = False  # the last event (result or error) went out

    def error_event(err: APIError) -> bytes:
        return sse("error", {"error": {"message": err.message, "type": err.type,
                                       "code": err.status}})  # fmt: skip

    async def stream() -> AsyncIterator[bytes]:
        nonlocal finished
        gathered = gather_all(jobs)
        gathered.add_done_callback(lambda _: events.put_nowait(("done", 0, 0, None)))
        last_step: dict[int, int] = {}  # per candidate: a batch split and retried runs again
        timeout = request_timeout(state)
        deadline = t0 + timeout if timeout is not None else None
        while True:
            left = None if deadline is None else max(deadline - time.perf_counter(), 0)
            try:
                kind, idx, step, row = await asyncio.wait_for(events.get(), left)
            except asyncio.TimeoutError:
                state.metrics.rejected.labels("timeout").inc()
                last = error_event(timeout_error(state))
                break
            if kind == "preview":
                if step <= last_step.get(idx, -1):
                    continue  # a retry's repeat of a time point already sent (same tokens)
                last_step[idx] = step
                eos = tok.special.eos
                cut = row.index(eos) if eos in row else len(row)
                yield sse("preview", {"index": idx, "step": step, "text": tok.decode(row[:cut])})
                continue
            try:
                results = gathered.result()
            except Exception as e:
                last = error_event(job_error(e))
            else:
                last = sse("result", body(jobs, results).model_dump(mode="json"))
            break
        yield last
        finished = True  # runs once the event is sent: Starlette asks for the next one

    def cleanup() -> None:
        # However the response ended: a client gone before the last event (mid-stream, or
        # before the first byte, where the generator never started) is a disconnect, and
        # whatever of its work is still queued is dropped.
        if not finished:
            state.metrics.rejected.labels("disconnect").inc()
        cancel(jobs)

    return _response(stream(), cleanup)


def openai_stream(body: S.OpenAICompletion, include_usage: bool) -> StreamingResponse:
    """A finished completion as OpenAI's chunks: each choice's text in one chunk, then one with
    its finish_reason; with `include_usage` a last chunk with `usage`; then `[DONE]`."""

    async def stream() -> AsyncIterator[bytes]:
        common: dict[str, Any] = {
            "id": body.id,
            "object": "text_completion",
            "created": body.created,
            "model": body.model,
        }
        if include_usage:
            common["usage"] = None  # OpenAI: null on every chunk but the last
        for c in body.choices:
            lp = c.logprobs.model_dump() if c.logprobs is not None else None
            for text, logprobs, reason in ((c.text, lp, None), ("", None, c.finish_reason)):
                choice = {"text": text, "index": c.index, "logprobs": logprobs,
                          "finish_reason": reason}  # fmt: skip
                yield f"data: {json.dumps({**common, 'choices': [choice]})}\n\n".encode()
        if include_usage:
            chunk = {**common, "choices": [], "usage": body.usage.model_dump()}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type=EVENT_STREAM)
