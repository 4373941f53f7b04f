"""From a validated API request to engine results: plan, build the `EngineRequest`s, admit
them to the queue and wait for them (with the request's timeout and its client)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence

from fastapi import Request

from yan_serve.engine.requests import EngineRequest, Result, TaskOptions
from yan_serve.flow.solver import Routing
from yan_serve.server import schemas as S
from yan_serve.server.batcher import Job, OutOfMemory, ShuttingDown
from yan_serve.server.errors import INTERNAL_ERROR, APIError, bad_request
from yan_serve.server.state import State, resolve_steps
from yan_serve.tasks import serving as T


def plan_or_400(make: Callable[[], T.Plan]) -> T.Plan:
    """The task's plan; a request the model cannot serve (too long, ...) is a 400."""
    try:
        return make()
    except T.PlanError as e:
        raise bad_request(str(e)) from None


def new_seed(seed: int | None) -> int:
    """The request's seed, or a random one."""
    return seed if seed is not None else secrets.randbelow(S.SEED_MAX + 1)


def generation_requests(
    state: State,
    plan: T.Plan,
    *,
    n: int,
    seed: int | None,
    steps: int | None,
    routing: Routing,
    temperature: float = 0.0,
    options: TaskOptions | None = None,
) -> list[EngineRequest]:
    """`n` candidates of one plan, with seeds seed, seed + 1, ... (random without a seed)."""
    steps = resolve_steps(state, steps)
    base = new_seed(seed)
    return [
        EngineRequest(
            plan.src,
            plan.tgt_len,
            (base + i) % (S.SEED_MAX + 1),
            steps,
            routing,
            temperature,
            plan=plan,
            options=options or TaskOptions(),
        )
        for i in range(n)
    ]


def admit(state: State, requests: Sequence[EngineRequest], what: str = "n") -> list[Job]:
    """Queue the requests, all or none: 400 if even an empty queue could not hold them (`what`
    says why the request needs that many), 429 if the queue is too full now."""
    b = state.serving_batcher
    if len(requests) > b.max_queue:  # would be refused even by an empty queue: not a retry case
        raise bad_request(
            f"this request needs {len(requests)} model jobs ({what}); the server queues at most "
            f"{b.max_queue} (--max-queue)"
        )
    if not b.admit(len(requests)):
        state.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            429,
            f"the queue is full ({b.max_queue} jobs); retry later",
            "rate_limit_error",
            {"Retry-After": "1"},
        )
    jobs = [Job(r) for r in requests]
    for j in jobs:
        b.submit(j)
    return jobs


def gather_all(jobs: Sequence[Job]) -> asyncio.Future:
    """`asyncio.gather` of the jobs' futures whose outcome is always retrieved, so giving up on
    it (timeout, client gone, shutdown) logs no "exception was never retrieved"."""
    gathered = asyncio.gather(*(j.future for j in jobs))
    gathered.add_done_callback(lambda g: g.cancelled() or g.exception())
    return gathered


def cancel(jobs: Sequence[Job]) -> None:
    """Drop the jobs' queued work (a result already computed is discarded)."""
    for j in jobs:
        j.future.cancel()


def job_error(e: BaseException) -> APIError:
    """The API error a job's failure answers, streamed or not: 503 out of memory or shutting
    down; 400 with its message for a ValueError (the worker's way to refuse a request it cannot
    serve); anything else is a server fault, a 500 whose message says nothing of its cause (the
    batcher logged the traceback), since an internal message is no business of the client's."""
    if isinstance(e, OutOfMemory):
        return APIError(503, str(e), "out_of_memory")
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), "unavailable", {"Retry-After": "1"})
    if isinstance(e, ValueError):
        return bad_request(str(e))
    return APIError(500, INTERNAL_ERROR, "internal_error")


def request_timeout(state: State) -> float | None:
    """--request-timeout in seconds, None for 0 (no timeout)."""
    return state.settings.request_timeout or None


async def wait(state: State, request: Request, jobs: Sequence[Job]) -> list[Result]:
    """All results, or 504 after --request-timeout (never with 0); a vanished client cancels
    the jobs. A job's failure is answered as `job_error` says."""
    gathered = gather_all(jobs)

    async def client_gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait(
            {gathered, watcher},
            timeout=request_timeout(state),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if gathered in done:
        try:
            return gathered.result()
        except Exception as e:
            raise job_error(e) from None
    cancel(jobs)
    if watcher in done:
        state.metrics.rejected.labels("disconnect").inc()
        raise APIError(499, "client disconnected", "client_closed")
    state.metrics.rejected.labels("timeout").inc()
    raise timeout_error(state)


def timeout_error(state: State) -> APIError:
    """504 after --request-timeout, streamed or not."""
    return APIError(
        504, f"the request took longer than {state.settings.request_timeout} s", "timeout"
    )


async def run(
    state: State, request: Request, requests: Sequence[EngineRequest], what: str = "n"
) -> tuple[list[Job], list[Result]]:
    """Admit the requests and wait for their results."""
    jobs = admit(state, requests, what)
    return jobs, await wait(state, request, jobs)
