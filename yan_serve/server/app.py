"""The FastAPI application: endpoints, errors, auth, body limits, draining, streaming.

Every error is JSON `{"error": {"message", "type", "code"}}`:
400 the input parses but cannot be served, 401 missing/wrong API key, 413 body too large,
422 schema violation, 429 queue full (Retry-After), 503 loading / draining / out of memory,
504 request timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yan_serve.engine import tasks as T
from yan_serve.engine.sampler import Generation
from yan_serve.server import schemas as S
from yan_serve.server.batcher import Batcher, Job, OutOfMemory
from yan_serve.server.metrics import Metrics
from yan_serve.server.settings import Settings

log = logging.getLogger("yan_serve.server")

PROBES = ("/health", "/ready", "/metrics")
KNOWN_PATHS = (
    *PROBES,
    "/v1/models",
    "/v1/infill",
    "/v1/complete",
    "/v1/qa",
    "/v1/classify",
    "/v1/completions",
    "/docs",
    "/openapi.json",
)
API_PREFIX = "/v1/"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "validation_error",
    429: "rate_limit_error",
    503: "unavailable",
    504: "timeout",
}


def error_json(
    status: int, message: str, type_: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": type_ or ERROR_TYPES.get(status, "error"),
            "code": status,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        c: {"model": S.ErrorResponse, "description": ERROR_TYPES.get(c, "error")} for c in codes
    }


MODEL_ERRORS = _responses(400, 401, 413, 422, 429, 503, 504)


def _sse_doc(events: list[str], what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": f"The result as JSON, or with `stream: true` server-sent events: "
            f"{what}.",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "One server-sent event; `data` holds JSON (or `[DONE]`).",
                        "properties": {
                            "event": {"type": "string", "enum": events},
                            "data": {"type": "string"},
                        },
                        "required": ["data"],
                    }
                }
            },
        }
    }


SSE_DOC = _sse_doc(
    ["preview", "result", "error"], "`preview` after each Euler step, then `result` (or `error`)"
)
OPENAI_SSE_DOC = _sse_doc(["message"], "OpenAI `text_completion` chunks, then `[DONE]`")


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    worker: Any = None
    batcher: Batcher | None = None
    ready: bool = False
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0


# ------------------------------------------------------------------------------------ ASGI
class Gate:
    """Pure-ASGI middleware: in-flight accounting, draining, API key and body-size limits.

    It buffers request bodies up to `max_body_bytes` (413 beyond) and replays them, so the
    limit holds for chunked uploads without Content-Length too."""

    def __init__(self, app, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        inner_send = send

        async def send(msg) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await inner_send(msg)

        try:
            await self._handle(scope, receive, send)
        finally:
            path = scope["path"]
            endpoint = path if path in KNOWN_PATHS else "other"
            self.state.metrics.requests.labels(endpoint, str(status)).inc()
            if path.startswith(API_PREFIX):
                self.state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _handle(self, scope, receive, send) -> None:
        st, path = self.state, scope["path"]
        if st.draining and path not in PROBES:
            return await error_json(
                503, "the server is shutting down", "unavailable", {"Retry-After": "1"}
            )(scope, receive, send)
        headers = dict(scope["headers"])
        key = st.settings.api_key
        if key and path.startswith(API_PREFIX):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await error_json(
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
        limit = st.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_json(413, f"request body over {limit} bytes")(scope, receive, send)
        body = b""
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await error_json(413, f"request body over {limit} bytes")(
                    scope, receive, send
                )
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        st.in_flight += 1
        st.metrics.in_flight.set(st.in_flight)
        try:
            await self.app(scope, replay, send)
        finally:
            st.in_flight -= 1
            st.metrics.in_flight.set(st.in_flight)


# ----------------------------------------------------------------------------------- app
def create_app(
    settings: Settings,
    worker_factory: Callable[[Settings], Any] | None = None,
    load_in_background: bool = True,
) -> FastAPI:
    """The app. The worker (model) loads in a background thread after start-up so /health
    answers at once and /ready says when the model is usable."""
    from yan_serve.server.worker import load_worker

    factory = worker_factory or (lambda s: load_worker(s.model, s.device))
    state = State(settings, Metrics())

    def load() -> None:
        try:
            if settings.threads > 0:
                import torch

                torch.set_num_threads(settings.threads)
            t0 = time.perf_counter()
            worker = factory(settings)
            steps = settings.default_steps or worker.default_steps
            warm = worker.warmup(steps) if hasattr(worker, "warmup") else 0.0
            state.worker = worker
            state.ready = True
            state.metrics.ready.set(1)
            log.info(
                "model %s ready on %s in %.1f s (warm-up %.1f s)",
                worker.model_id,
                getattr(worker, "device", "?"),
                time.perf_counter() - t0,
                warm,
            )
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher = Batcher(
            _LazyWorker(state),
            settings.max_batch_size,
            settings.max_wait_ms,
            settings.max_queue,
            state.metrics,
        )
        state.batcher.start()
        if load_in_background:
            threading.Thread(target=load, name="yan-load", daemon=True).start()
        else:
            load()
        yield
        await state.batcher.drain(settings.shutdown_timeout)
        await state.batcher.stop()

    app = FastAPI(
        title="yan-serve",
        version="0.1.0",
        summary="Non-autoregressive YAN inference: infill, complete, QA, classify.",
        lifespan=lifespan,
    )
    app.state.yan = state
    app.add_middleware(Gate, state=state)
    _install_error_handlers(app, state)
    _install_routes(app, state)
    return app


class _LazyWorker:
    """The batcher's view of the worker, which appears once loading finishes."""

    def __init__(self, state: State) -> None:
        self.state = state

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        return self.state.worker.run(jobs)


def _install_error_handlers(app: FastAPI, state: State) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return error_json(e.status, e.message, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_json(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_json(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_json(500, "internal error; see the server log", "internal_error")


# -------------------------------------------------------------------------------- routes
def _install_routes(app: FastAPI, state: State) -> None:

    @app.get("/health", response_model=S.Health, tags=["probes"])
    async def health() -> S.Health:
        """Liveness: the process serves HTTP."""
        return S.Health(status="ok")

    @app.get("/ready", response_model=S.Health, responses=_responses(503), tags=["probes"])
    async def ready() -> Any:
        """Readiness: 200 once weights are loaded and warmed up, 503 before and while draining."""
        if state.draining:
            return error_json(503, "the server is shutting down")
        if state.load_error:
            return error_json(503, f"the model failed to load: {state.load_error}")
        if not state.ready:
            return error_json(503, "the model is loading")
        return S.Health(status="ready")

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["probes"],
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus metrics (`yan:` prefix)."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get(
        "/v1/models", response_model=S.ModelList, responses=_responses(401, 503), tags=["models"]
    )
    async def models() -> S.ModelList:
        w = _worker(state)
        return S.ModelList(data=[S.ModelCard(id=w.model_id, created=w.created)])

    @app.post(
        "/v1/infill",
        response_model=S.InfillResponse,
        responses={**MODEL_ERRORS, **SSE_DOC},
        tags=["yan"],
    )
    async def infill(req: S.InfillRequest, request: Request) -> Any:
        """Fill every `[MASK]` / `[MASK:n]` span of the text in one non-autoregressive pass."""
        w = _worker(state)
        plan = _plan(lambda: T.plan_infill(w.tokenizer, req.text, w.max_length, req.span_tokens))

        def finish(g: Generation) -> S.Candidate:
            text, fills = T.finish_infill(w.tokenizer, plan, g.full)
            conf = [g.full_confidence[a + i] for a, b in plan.fill_slots for i in range(b - a)]
            return _candidate(text, conf, req.return_confidence, fills=fills)

        def respond(base: dict, best: S.Candidate) -> S.InfillResponse:
            return S.InfillResponse(**base, fills=best.fills or [])

        return await _generate(state, request, "infill", req, plan, finish, respond)

    @app.post(
        "/v1/complete",
        response_model=S.CompleteResponse,
        responses={**MODEL_ERRORS, **SSE_DOC},
        tags=["yan"],
    )
    async def complete(req: S.CompleteRequest, request: Request) -> Any:
        """Continue a prompt with up to `max_tokens` tokens, all generated at once."""
        w = _worker(state)
        plan = _plan(lambda: T.plan_complete(w.tokenizer, req.prompt, req.max_tokens, w.max_length))

        def finish(g: Generation) -> S.Candidate:
            if req.ignore_eos:
                g = _uncut(g, plan.tgt_len - 1)
            toks, reason = T.finish_complete(plan, g.tokens, g.finish_reason == "eos")
            return _candidate(
                w.tokenizer.decode(toks),
                g.confidence[: len(toks)],
                req.return_confidence,
                finish_reason=reason,
            )

        def respond(base: dict, best: S.Candidate) -> S.CompleteResponse:
            return S.CompleteResponse(**base, finish_reason=best.finish_reason or "length")

        return await _generate(state, request, "complete", req, plan, finish, respond)

    @app.post(
        "/v1/qa", response_model=S.QAResponse, responses={**MODEL_ERRORS, **SSE_DOC}, tags=["yan"]
    )
    async def qa(req: S.QARequest, request: Request) -> Any:
        """Answer a question about a context."""
        w = _worker(state)
        plan = _plan(
            lambda: T.plan_qa(w.tokenizer, req.context, req.question, req.max_tokens, w.max_length)
        )

        def finish(g: Generation) -> S.Candidate:
            ans = T.answer_tokens(w.tokenizer, plan, g.full)
            conf = g.full_confidence[plan.answer_start : plan.answer_start + max(1, len(ans))]
            return _candidate(
                w.tokenizer.decode(ans).strip(), conf, req.return_confidence, len(ans)
            )

        def respond(base: dict, best: S.Candidate) -> S.QAResponse:
            return S.QAResponse(**base, answer=best.text)

        return await _generate(state, request, "qa", req, plan, finish, respond)

    @app.post(
        "/v1/classify",
        response_model=S.ClassifyResponse,
        responses={**MODEL_ERRORS, **SSE_DOC},
        tags=["yan"],
    )
    async def classify(req: S.ClassifyRequest, request: Request) -> Any:
        """Label a text: generate the label, or score the given candidate labels."""
        w = _worker(state)
        plan = _plan(lambda: T.plan_classify(w.tokenizer, req.text, req.max_tokens, w.max_length))
        if req.labels:
            if req.stream:
                raise APIError(
                    400,
                    "stream is not available when scoring candidate labels",
                    "invalid_request_error",
                )
            return await _score_labels(state, request, req, plan)

        def finish(g: Generation) -> S.Candidate:
            ans = T.answer_tokens(w.tokenizer, plan, g.full)
            conf = g.full_confidence[plan.answer_start :][: max(1, len(ans))]
            return _candidate(
                w.tokenizer.decode(ans).strip(), conf, req.return_confidence, len(ans)
            )

        def respond(base: dict, best: S.Candidate) -> S.ClassifyResponse:
            name, k = T.parse_class(best.text, w.labels)
            return S.ClassifyResponse(**{**base, "text": best.text}, label=name, label_id=k)

        return await _generate(state, request, "classify", req, plan, finish, respond)

    @app.post(
        "/v1/completions",
        response_model=S.OpenAICompletion,
        responses={**MODEL_ERRORS, **OPENAI_SSE_DOC},
        tags=["openai"],
    )
    async def completions(req: S.OpenAICompletionRequest, request: Request) -> Any:
        """OpenAI-compatible text completion mapped onto YAN completion. Greedy unless
        `temperature > 0`; `stop` strings cut the text; streaming sends each choice's text in
        one chunk (a non-autoregressive model has the whole text at once)."""
        return await _openai_completions(state, request, req)


def _worker(state: State):
    if state.load_error:
        raise APIError(503, f"the model failed to load: {state.load_error}", "unavailable")
    if not state.ready:
        raise APIError(
            503,
            "the model is loading; retry when /ready says so",
            "unavailable",
            {"Retry-After": "2"},
        )
    return state.worker


def _uncut(g: Generation, n: int) -> Generation:
    """The generation's first n positions, EOS included (for ignore_eos)."""
    return Generation(
        tokens=g.full[:n],
        finish_reason="length",
        confidence=g.full_confidence[:n],
        expert=g.expert,
        full=g.full,
        full_confidence=g.full_confidence,
    )


def _plan(make: Callable[[], T.Plan]) -> T.Plan:
    try:
        return make()
    except T.PlanError as e:
        raise APIError(400, str(e), "invalid_request_error") from None


def _candidate(
    text: str, conf: Sequence[float], with_conf: bool, n_tokens: int | None = None, **kw
) -> S.Candidate:
    """A candidate; confidence is the mean decoder probability over its output positions."""
    mean = float(sum(conf) / len(conf)) if conf else 0.0
    c = S.Candidate(
        text=text, confidence=mean, token_confidence=list(conf) if with_conf else None, **kw
    )
    c._n_tokens = len(conf) if n_tokens is None else n_tokens
    return c


def _steps(state: State, steps: int | None) -> int:
    w = state.worker
    s = steps if steps is not None else (state.settings.default_steps or w.default_steps)
    if not 1 <= s <= state.settings.max_steps:
        raise APIError(
            400,
            f"steps must be between 1 and {state.settings.max_steps}, got {s}",
            "invalid_request_error",
        )
    return s


def _seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbits(62)


def _jobs(
    state: State,
    plan: T.Plan,
    opts: S.GenerationOptions,
    n: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    protocol: str | None = None,
) -> list[Job]:
    steps = _steps(state, opts.steps)
    base = _seed(seed if seed is not None else opts.seed)
    protocol = protocol or getattr(opts, "protocol", None)
    ignore_eos = bool(getattr(opts, "ignore_eos", False))
    return [
        Job(
            plan.src,
            plan.tgt_len,
            (base + i) % (S.SEED_MAX + 1),
            steps,
            opts.routing,
            temperature,
            extra={"plan": plan, "protocol": protocol, "ignore_eos": ignore_eos},
        )
        for i in range(n or opts.n)
    ]


def _admit(state: State, jobs: list[Job]) -> list[asyncio.Future]:
    b = state.batcher
    if not b.admit(len(jobs)):
        state.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            429,
            f"the queue is full ({b.max_queue} jobs); retry later",
            "rate_limit_error",
            {"Retry-After": "1"},
        )
    return [b.submit(j) for j in jobs]


async def _wait(state: State, request: Request, futures: list[asyncio.Future]) -> list[Any]:
    """All results, or 504 after --request-timeout; a vanished client cancels the jobs."""
    gathered = asyncio.gather(*futures)

    async def client_gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait(
            {gathered, watcher},
            timeout=state.settings.request_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if gathered in done:
        try:
            return gathered.result()
        except OutOfMemory as e:
            raise APIError(503, str(e), "out_of_memory") from None
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error") from None
    for f in futures:
        f.cancel()
    gathered.cancel()
    if watcher in done:
        state.metrics.rejected.labels("disconnect").inc()
        raise APIError(499, "client disconnected", "client_closed")
    state.metrics.rejected.labels("timeout").inc()
    raise APIError(
        504, f"the request took longer than {state.settings.request_timeout} s", "timeout"
    )


def _base(
    state: State,
    task: str,
    jobs: list[Job],
    cands: list[S.Candidate],
    results: list[Generation],
    t0: float,
) -> dict:
    order = sorted(range(len(cands)), key=lambda i: -cands[i].confidence)
    cands = [cands[i] for i in order]
    j = jobs[order[0]]
    completion = cands[0]._n_tokens
    state.metrics.prompt_tokens.inc(len(j.src))
    state.metrics.generated_tokens.inc(sum(c._n_tokens for c in cands))
    return {
        "id": f"yan-{uuid.uuid4().hex[:16]}",
        "model": state.worker.model_id,
        "task": task,
        "text": cands[0].text,
        "candidates": cands,
        "steps": j.steps,
        "usage": S.Usage(
            prompt_tokens=len(j.src),
            completion_tokens=completion,
            total_tokens=len(j.src) + completion,
        ),
        "timing": S.Timing(
            queue_ms=1000 * (j.t_start - j.t_enqueue),
            compute_ms=1000 * (j.t_end - j.t_start),
            total_ms=1000 * (time.perf_counter() - t0),
        ),
    }


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _generate(
    state: State,
    request: Request,
    task: str,
    req: S.GenerationOptions,
    plan: T.Plan,
    finish: Callable[[Generation], S.Candidate],
    respond: Callable[[dict, S.Candidate], Any],
) -> Any:
    t0 = time.perf_counter()
    jobs = _jobs(state, plan, req)
    if not req.stream:
        results = await _wait(state, request, _admit(state, jobs))
        cands = [finish(g) for g in results]
        best = max(cands, key=lambda c: c.confidence)
        return respond(_base(state, task, jobs, cands, results, t0), best)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    tok = state.worker.tokenizer
    for idx, j in enumerate(jobs):

        def on_step(step: int, row: list[int], idx: int = idx) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("preview", idx, step, row))

        j.on_step = on_step
    futures = _admit(state, jobs)

    async def stream() -> AsyncIterator[bytes]:
        gathered = asyncio.gather(*futures)
        gathered.add_done_callback(lambda _: events.put_nowait(("done", 0, 0, None)))
        deadline = t0 + state.settings.request_timeout
        try:
            while True:
                left = deadline - time.perf_counter()
                try:
                    kind, idx, step, row = await asyncio.wait_for(events.get(), max(left, 0))
                except asyncio.TimeoutError:
                    state.metrics.rejected.labels("timeout").inc()
                    yield _sse(
                        "error",
                        {"error": {"message": "request timed out", "type": "timeout", "code": 504}},
                    )
                    return
                if kind == "preview":
                    eos = tok.special.eos
                    cut = row.index(eos) if eos in row else len(row)
                    yield _sse(
                        "preview", {"index": idx, "step": step, "text": tok.decode(row[:cut])}
                    )
                    continue
                try:
                    results = gathered.result()
                except Exception as e:
                    status = 503 if isinstance(e, OutOfMemory) else 400
                    yield _sse(
                        "error",
                        {"error": {"message": str(e), "type": type(e).__name__, "code": status}},
                    )
                    return
                cands = [finish(g) for g in results]
                best = max(cands, key=lambda c: c.confidence)
                body = respond(_base(state, task, jobs, cands, results, t0), best)
                yield _sse("result", body.model_dump(mode="json"))
                return
        finally:
            for f in futures:
                f.cancel()  # client gone or finished: drop any queued work

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _score_labels(
    state: State, request: Request, req: S.ClassifyRequest, plan: T.Plan
) -> S.ClassifyResponse:
    import math

    t0 = time.perf_counter()
    w = state.worker
    steps = _steps(state, req.steps)
    seed = _seed(req.seed)
    labels = [lab for lab in req.labels or [] if lab.strip()]
    if not labels:
        raise APIError(400, "labels are all empty", "invalid_request_error")
    targets = [T.label_target(w.tokenizer, lab, w.labels) for lab in labels]
    too_long = [lab for lab, t in zip(labels, targets, strict=False) if len(t) > w.max_length]
    if too_long:
        raise APIError(400, f"label {too_long[0][:40]!r} is too long", "invalid_request_error")
    targets = T.pad_targets(targets, w.tokenizer.special.eos)
    jobs = [Job(plan.src, len(t), seed, steps, req.routing, target=t) for t in targets]
    logps = await _wait(state, request, _admit(state, jobs))
    header = plan.answer_start
    means = [sum(lp[header:]) for lp in logps]
    top = max(means)
    z = sum(math.exp(m - top) for m in means)
    scores = [
        S.LabelScore(label=lab, score=math.exp(m - top) / z, logprob=m)
        for lab, m in zip(labels, means, strict=False)
    ]
    scores.sort(key=lambda s: -s.score)
    best = scores[0]
    k = None
    if w.labels:
        k = {v.lower(): i for i, v in w.labels.items()}.get(best.label.strip().lower())
    cand = S.Candidate(text=best.label, confidence=best.score)
    j = jobs[0]
    state.metrics.prompt_tokens.inc(len(j.src))
    return S.ClassifyResponse(
        id=f"yan-{uuid.uuid4().hex[:16]}",
        model=w.model_id,
        task="classify",
        text=best.label,
        candidates=[cand],
        steps=steps,
        usage=S.Usage(prompt_tokens=len(j.src), completion_tokens=0, total_tokens=len(j.src)),
        timing=S.Timing(
            queue_ms=1000 * (j.t_start - j.t_enqueue),
            compute_ms=1000 * (j.t_end - j.t_start),
            total_ms=1000 * (time.perf_counter() - t0),
        ),
        label=best.label,
        label_id=k,
        scores=scores,
    )


async def _openai_completions(
    state: State, request: Request, req: S.OpenAICompletionRequest
) -> Any:
    time.perf_counter()
    w = _worker(state)
    if req.top_p is not None and req.top_p < 1:
        raise APIError(400, "top_p < 1 is not supported; use temperature", "invalid_request_error")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or len(prompts) * req.n > 64:
        raise APIError(400, "give 1 to 64 prompts x n choices", "invalid_request_error")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stops = [s for s in stops if s]
    temperature = float(req.temperature or 0.0)
    opts = S.GenerationOptions(seed=req.seed, n=req.n)
    plans = [
        _plan(lambda p=p: T.plan_complete(w.tokenizer, p, req.max_tokens or 16, w.max_length))
        for p in prompts
    ]
    jobs = [j for plan in plans for j in _jobs(state, plan, opts, temperature=temperature)]
    results: list[Generation] = await _wait(state, request, _admit(state, jobs))
    choices = []
    completion_tokens = 0
    pairs = [(p, plan) for p, plan in zip(prompts, plans, strict=False) for _ in range(req.n)]
    for i, (g, (prompt, plan)) in enumerate(zip(results, pairs, strict=False)):
        toks, reason = T.finish_complete(plan, g.tokens, g.finish_reason == "eos")
        text = w.tokenizer.decode(toks)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        completion_tokens += len(toks)
        choices.append(
            S.OpenAIChoice(
                text=(prompt + text) if req.echo else text, index=i, finish_reason=reason
            )
        )
    prompt_tokens = sum(len(p.src) - 1 for p in plans)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.generated_tokens.inc(completion_tokens)
    body = S.OpenAICompletion(
        id=f"cmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=w.model_id,
        choices=choices,
        usage=S.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )
    if not req.stream:
        return body
    include_usage = bool((getattr(req, "stream_options", None) or {}).get("include_usage"))

    async def stream() -> AsyncIterator[bytes]:
        common = {
            "id": body.id,
            "object": "text_completion",
            "created": body.created,
            "model": body.model,
        }
        for c in body.choices:
            for text, reason in ((c.text, None), ("", c.finish_reason)):
                chunk = {
                    **common,
                    "choices": [
                        {"text": text, "index": c.index, "logprobs": None, "finish_reason": reason}
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        if include_usage:
            chunk = {**common, "choices": [], "usage": body.usage.model_dump()}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")
