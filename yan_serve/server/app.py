"""The FastAPI application: endpoints, errors, auth, body limits, draining, streaming.

Every error is JSON `{"error": {"message", "type", "code"}}` (on /v1/completions OpenAI's shape,
with `param` and OpenAI's string `code` where one applies):
400 the input parses but cannot be served, 401 missing/wrong API key, 404 unknown path or model,
413 body too large, 422 schema violation, 429 queue full (Retry-After), 503 loading / draining /
out of memory / shutdown deadline, 504 request timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
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
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from yan_serve.engine import tasks as T
from yan_serve.engine.sampler import Generation
from yan_serve.server import schemas as S
from yan_serve.server.batcher import Batcher, Job, OutOfMemory, ShuttingDown
from yan_serve.server.metrics import Metrics
from yan_serve.server.settings import Settings
from yan_serve.server.worker import Scored

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
OPENAI_PATH = "/v1/completions"  # its errors take OpenAI's shape (`param`, string `code`)
DOCS_ASSETS = "/docs/assets"  # Swagger UI's files, served from the swagger-ui-bundle package


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        headers: dict | None = None,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers
        self.code, self.param = code, param


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
    status: int,
    message: str,
    type_: str | None = None,
    headers: dict | None = None,
    *,
    openai: bool = False,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The error response. `openai`: OpenAI's shape, `param` added and `code` the given string
    code (else the status)."""
    err: dict[str, Any] = {
        "message": message,
        "type": type_ or ERROR_TYPES.get(status, "error"),
        "code": (code or status) if openai else status,
    }
    if openai:
        err["param"] = param
    return JSONResponse({"error": err}, status_code=status, headers=headers)


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
    on_load_error: Callable[[str], None] | None = None  # the server: exit (never ready)
    draining: bool = False
    deadline: float | None = None  # perf_counter time when a drain gives up (the one deadline)
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
        openai = path == OPENAI_PATH
        if st.draining and path not in PROBES:
            return await error_json(
                503,
                "the server is shutting down",
                "unavailable",
                {"Retry-After": "1"},
                openai=openai,
            )(scope, receive, send)
        headers = dict(scope["headers"])
        key = st.settings.api_key
        if key and path.startswith(API_PREFIX):
            # Bytes against the key's UTF-8 bytes: a non-ASCII key matches what clients send.
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, key.encode("utf-8")):
                return await error_json(
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    headers={"WWW-Authenticate": "Bearer"},
                    openai=openai,
                )(scope, receive, send)
        limit = st.settings.max_body_bytes
        declared = headers.get(b"content-length", b"").strip()
        # len() first: int() of a huge digit string is refused (and slow) in Python
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            return await error_json(413, f"request body over {limit} bytes", openai=openai)(
                scope, receive, send
            )
        body = b""
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await error_json(413, f"request body over {limit} bytes", openai=openai)(
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
            state.load_error = " ".join(f"{type(e).__name__}: {e}".split())
            log.error("could not load the model from %s: %s", settings.model, state.load_error)
            if state.on_load_error is not None:
                state.on_load_error(state.load_error)

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
        # A signal's drain set the one deadline; without one (embedded use) wait the timeout.
        left = settings.shutdown_timeout
        if state.deadline is not None:
            left = max(0.0, state.deadline - time.perf_counter())
        if not await state.batcher.drain(left):
            state.batcher.abort()
        await state.batcher.stop()

    app = FastAPI(
        title="yan-serve",
        version="0.1.0",
        summary="Non-autoregressive YAN inference: infill, complete, QA, classify.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files, not a CDN
        redoc_url=None,
    )
    app.state.yan = state

    context = context_limit(settings.model)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with `steps` bounded by this server's --max-steps and the
        generated length (`max_tokens` of complete, QA and OpenAI completions) by the
        checkpoint's context (what the server would refuse otherwise)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            bounds = {"steps": settings.max_steps}
            for name, model in schema.get("components", {}).get("schemas", {}).items():
                limits = dict(bounds)
                if context is not None and name in _CONTEXT_BOUND:
                    limits["max_tokens"] = context
                for field, bound in limits.items():
                    prop = model.get("properties", {}).get(field)
                    for alt in (prop or {}).get("anyOf", [prop] if prop else []):
                        if alt.get("type") == "integer":
                            alt["maximum"] = min(bound, alt.get("maximum", bound))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Gate, state=state)
    _install_error_handlers(app, state)
    _install_docs(app)
    _install_routes(app, state)
    return app


def _install_docs(app: FastAPI) -> None:
    """/docs: the Swagger UI page with its JavaScript and CSS from the installed
    swagger-ui-bundle package, so it works offline (FastAPI's default loads them from a CDN).
    Without that package (a dependency, but e.g. a GPU image with only the server's minimal
    wheels) the API still serves and /docs answers 503 naming the package."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        log.warning("swagger-ui-bundle is not installed: /docs is unavailable (the API is not)")

        @app.get("/docs", include_in_schema=False)
        async def no_docs() -> JSONResponse:
            return error_json(503, "/docs needs the swagger-ui-bundle package (pip install "
                              "swagger-ui-bundle); /openapi.json is available")  # fmt: skip

        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


class _LazyWorker:
    """The batcher's view of the worker, which appears once loading finishes."""

    def __init__(self, state: State) -> None:
        self.state = state

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        return self.state.worker.run(jobs)


def _install_error_handlers(app: FastAPI, state: State) -> None:
    def openai(request: Request) -> bool:
        return request.url.path == OPENAI_PATH

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError) -> JSONResponse:
        return error_json(
            e.status, e.message, e.type, e.headers, openai=openai(request), code=e.code,
            param=e.param,
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts, params = [], []
        for err in e.errors()[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            params.append(loc[0] if loc else None)
            msg = err.get("msg", "invalid")
            if err.get("type") == "string_pattern_mismatch":  # say what the pattern means
                msg = S.PATTERN_MEANS.get((err.get("ctx") or {}).get("pattern"), msg)
            parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
        return error_json(
            422, "; ".join(parts) or "invalid request", openai=openai(request),
            param=params[0] if params else None,
        )  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_json(
            e.status_code, str(e.detail), headers=getattr(e, "headers", None),
            openai=openai(request),
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_json(
            500, "internal error; see the server log", "internal_error", openai=openai(request)
        )


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
        _check_span_budgets(req.text)
        plan = _plan(lambda: T.plan_infill(w.tokenizer, req.text, w.max_length, req.span_tokens))

        def finish(g: Generation) -> S.Candidate:
            text, fills = T.finish_infill(w.tokenizer, plan, g.full)
            conf = [g.full_confidence[a + i] for a, b in plan.fill_slots for i in range(b - a)]
            per_fill = T.fill_confidences(
                plan, g.full, g.full_confidence, set(w.tokenizer.special.ids())
            )
            mean = sum(per_fill) / len(per_fill)
            return _candidate(text, conf, req.return_confidence, fills=fills,
                              fill_confidence=per_fill, confidence=mean)  # fmt: skip

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
            scored = await _score_labels(state, request, req, plan)
            if not req.stream:
                return scored
            # scoring has no Euler-step previews: the stream is the one `result` event
            event = _sse("result", scored.model_dump(mode="json"))
            return StreamingResponse(
                iter([event]), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

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
        responses={**MODEL_ERRORS, **_responses(404), **OPENAI_SSE_DOC},
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


MAX_SPAN_TOKENS = 64  # T.plan_infill's default limit on a [MASK:n] budget


def _check_span_budgets(text: str) -> None:
    """400 for a `[MASK:n]` budget out of range before anything converts it: a budget of
    thousands of digits is past Python's int-conversion limit."""
    for m in T.MASK_PATTERN.finditer(text):
        digits = m.group(1)
        if digits is not None and (len(digits) > 4 or not 1 <= int(digits) <= MAX_SPAN_TOKENS):
            shown = digits if len(digits) <= 12 else f"{digits[:6]}... ({len(digits)} digits)"
            raise APIError(
                400,
                f"[MASK:{shown}]: a span budget must be between 1 and {MAX_SPAN_TOKENS}",
                "invalid_request_error",
            )


def _all(futures: Sequence[asyncio.Future]) -> asyncio.Future:
    """`asyncio.gather` whose outcome is always retrieved, so giving up on it (timeout, client
    gone, shutdown) logs no "exception was never retrieved"."""
    gathered = asyncio.gather(*futures)
    gathered.add_done_callback(lambda g: g.cancelled() or g.exception())
    return gathered


def _plan(make: Callable[[], T.Plan]) -> T.Plan:
    try:
        return make()
    except T.PlanError as e:
        raise APIError(400, str(e), "invalid_request_error") from None


def _candidate(
    text: str,
    conf: Sequence[float],
    with_conf: bool,
    n_tokens: int | None = None,
    confidence: float | None = None,
    **kw,
) -> S.Candidate:
    """A candidate; confidence is the mean decoder probability over its output positions
    unless the task defines its own (`confidence`: infill, per fill)."""
    if confidence is None:
        confidence = float(sum(conf) / len(conf)) if conf else 0.0
    c = S.Candidate(
        text=text, confidence=confidence, token_confidence=list(conf) if with_conf else None, **kw
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
    return seed if seed is not None else secrets.randbelow(S.SEED_MAX + 1)


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
            extra={
                "plan": plan,
                "protocol": protocol,
                "ignore_eos": ignore_eos,
                "allow_empty": bool(getattr(opts, "allow_empty", False)),
            },
        )
        for i in range(n or opts.n)
    ]


def _admit(state: State, jobs: list[Job], what: str = "n") -> list[asyncio.Future]:
    b = state.batcher
    if len(jobs) > b.max_queue:  # would be refused even by an empty queue: not a retry case
        raise APIError(
            400,
            f"this request needs {len(jobs)} model jobs ({what}); the server queues at most "
            f"{b.max_queue} (--max-queue)",
            "invalid_request_error",
        )
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
    gathered = _all(futures)

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
        except ShuttingDown as e:
            raise APIError(503, str(e), "unavailable", {"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error") from None
    for f in futures:
        f.cancel()
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
        gathered = _all(futures)
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
                    status = 503 if isinstance(e, (OutOfMemory, ShuttingDown)) else 400
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
    first: dict[tuple[int, ...], str] = {}
    for lab, t in zip(labels, targets, strict=True):
        if tuple(t) in first:  # the same candidate twice would split its probability
            raise APIError(
                400,
                f"labels {first[tuple(t)]!r} and {lab!r} are the same candidate; give each once",
                "invalid_request_error",
            )
        first[tuple(t)] = lab
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


# ------------------------------------------------------------------ /v1/completions
@dataclass
class _Prompt:
    text: str  # as echoed (a token-id prompt is decoded)
    ids: list[int]
    is_text: bool = True  # given as a string (not token ids)
    plan: T.Plan | None = None  # None when nothing is generated (max_tokens 0)


def _openai_prompts(w: Any, prompt: Any) -> list[_Prompt]:
    """The request's prompts as text and token ids (strings are encoded, ids are checked)."""
    tok = w.tokenizer
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]  # one prompt of token ids
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "the prompt list is empty", "invalid_request_error", param="prompt")
    out = []
    vocab = w.tokenizer.vocab_size
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise APIError(400, "the prompt is empty", "invalid_request_error", param="prompt")
            out.append(_Prompt(item, tok.encode(item)))
            continue
        bad = next((t for t in item if t >= vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"token id {bad} in the prompt is outside the vocabulary of {vocab}",
                "invalid_request_error",
                param="prompt",
            )
        out.append(_Prompt(tok.decode(item), list(item), is_text=False))
    return out


# request schemas whose max_tokens is a target length the checkpoint's context bounds
_CONTEXT_BOUND = ("CompleteRequest", "QARequest", "OpenAICompletionRequest")


def context_limit(model_dir: str) -> int | None:
    """The checkpoint's context in positions, read from its config.json (YAN `max_length`,
    GPT-2 `n_positions`); None when it cannot be read (the server reports that elsewhere)."""
    from pathlib import Path

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_length", "n_positions"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


def _context_error(message: str, param: str) -> APIError:
    return APIError(400, message, "invalid_request_error", code="context_length_exceeded",
                    param=param)  # fmt: skip


def _openai_plan(w: Any, p: _Prompt, max_tokens: int, suffix: list[int] | None) -> T.Plan | None:
    """Completion (source: prompt + <mask>; target: max_tokens + EOS) or, with a suffix,
    infilling (source: prompt <mask> suffix; target: prompt, max_tokens gap positions, suffix,
    EOS). 400 in OpenAI's words when it does not fit the model."""
    n = w.max_length
    head = f"This model's maximum context length is {n} tokens."
    extra = len(suffix) if suffix is not None else 0
    src_len = len(p.ids) + extra + 1
    if src_len > n:
        with_suffix = f" and the suffix {extra}" if suffix is not None else ""
        raise _context_error(
            f"{head} However, your prompt has {len(p.ids)} tokens{with_suffix}, {src_len} "
            "source positions with the <mask> for the completion. Please reduce the length of "
            "the prompt.",
            "prompt",
        )
    if max_tokens == 0:
        return None
    if suffix is None:
        plan = T.Plan("complete", [*p.ids, w.tokenizer.special.mask], max_tokens + 1)
    else:
        # as /v1/infill: a string prompt's trailing spaces go to the fill (byte-level BPE words
        # carry their leading space)
        head = w.tokenizer.encode(p.text.rstrip(" ")) if p.is_text else p.ids
        plan = T.infill_plan_from_pieces([head, suffix], [max_tokens], w.tokenizer.special.mask)
    if plan.tgt_len > n:
        around = " (with the prompt and suffix around them)" if suffix is not None else ""
        raise _context_error(
            f"{head} However, you requested {max_tokens} completion tokens, "
            f"{plan.tgt_len} output positions{around} with EOS. Please reduce max_tokens.",
            "max_tokens",
        )
    return plan


def _score_jobs(state: State, p: _Prompt, seed: int, opts: S.GenerationOptions, k: int):
    """Echo log-probabilities: token i of the prompt is scored as the first token of the
    completion of tokens 0..i-1 (source: prefix + <mask>; target: the rest of the prompt + EOS,
    so the model also knows how many tokens follow). One score job per token after the first."""
    steps = _steps(state, opts.steps)
    mask, eos = state.worker.tokenizer.special.mask, state.worker.tokenizer.special.eos
    return [
        Job(
            [*p.ids[:i], mask],
            len(p.ids) - i + 1,
            seed,
            steps,
            opts.routing,
            target=[*p.ids[i:], eos],
            extra={"top_logprobs": k},
        )
        for i in range(1, len(p.ids))
    ]


def _token_str(tok: Any, t: int) -> str:
    return tok.decode([t], skip_special=False)


def _top_dict(tok: Any, top: list[tuple[int, float]], actual: int, lp: float) -> dict[str, float]:
    """OpenAI's top_logprobs entry: the k most likely tokens, and always the actual one (with
    its own log-probability, so it equals the maximum exactly when it is the most likely)."""
    d = {_token_str(tok, t): v for t, v in top}
    d[_token_str(tok, actual)] = lp
    return d


def _echo_logprobs(tok: Any, p: _Prompt, scored: list[Any], k: int | None) -> list[tuple]:
    """(token, logprob, top, offset) for every prompt token; the first has no logprob."""
    rows: list[tuple] = []
    for i, t in enumerate(p.ids):
        offset = len(tok.decode(p.ids[:i]))
        if i == 0:
            rows.append((_token_str(tok, t), None, None, offset))
            continue
        r = scored[i - 1]
        lp = r.logprobs[0] if isinstance(r, Scored) else r[0]
        top = _top_dict(tok, r.top[0], t, lp) if isinstance(r, Scored) and k else None
        rows.append((_token_str(tok, t), lp, top, offset))
    return rows


def _generated(tok: Any, plan: T.Plan, g: Generation) -> tuple[list[int], list[float], str, bool]:
    """(tokens, their probabilities, finish_reason, ended at EOS) of one generated choice: the
    completion cut at EOS, or with a suffix the gap's tokens (special tokens dropped)."""
    if plan.fill_slots is None:
        toks, reason = T.finish_complete(plan, g.tokens, g.finish_reason == "eos")
        # the EOS is listed as a token only where it is within max_tokens (as OpenAI counts)
        at_eos = reason == "stop" and len(toks) < plan.tgt_len - 1
        return toks, g.confidence[: len(toks)], reason, at_eos
    a, b = plan.fill_slots[0]
    specials = set(tok.special.ids())
    kept = [(t, c) for t, c in zip(g.full[a:b], g.full_confidence[a:b], strict=True)
            if t not in specials]  # fmt: skip
    reason = "stop" if tok.special.eos in g.full[a:b] else "length"
    return [t for t, _ in kept], [c for _, c in kept], reason, False


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e4


async def _openai_completions(
    state: State, request: Request, req: S.OpenAICompletionRequest
) -> Any:
    w = _worker(state)
    tok = w.tokenizer
    if req.model is not None and req.model != w.model_id:
        raise APIError(
            404,
            f"The model `{req.model}` does not exist; this server serves `{w.model_id}` "
            "(GET /v1/models)",
            "invalid_request_error",
            code="model_not_found",
            param="model",
        )
    if req.suffix is not None and req.echo:
        raise APIError(400, "echo is not supported with suffix", "invalid_request_error",
                       param="echo")  # fmt: skip
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if req.suffix is not None and max_tokens == 0:
        raise APIError(400, "max_tokens must be >= 1 with suffix (the gap's length)",
                       "invalid_request_error", param="max_tokens")  # fmt: skip
    prompts = _openai_prompts(w, req.prompt)
    if len(prompts) * req.n > 64:
        raise APIError(400, "give 1 to 64 prompts x n choices", "invalid_request_error",
                       param="n")  # fmt: skip
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stops = [s for s in stops if s]
    temperature = float(req.temperature or 0.0)
    seed = req.seed
    if seed is None and temperature == 0:
        seed = S.OPENAI_GREEDY_SEED  # greedy without a seed: deterministic
    base = _seed(seed)
    opts = S.GenerationOptions(seed=base, n=req.n)
    suffix = tok.encode(req.suffix) if req.suffix is not None else None
    for p in prompts:
        p.plan = _openai_plan(w, p, max_tokens, suffix)
    gen = [[] if p.plan is None else _jobs(state, p.plan, opts, temperature=temperature)
           for p in prompts]  # fmt: skip
    k = req.logprobs
    scoring = req.echo and k is not None
    score = [_score_jobs(state, p, base, opts, k or 0) if scoring else [] for p in prompts]
    jobs = [j for js in gen for j in js] + [j for js in score for j in js]
    results: list[Any] = []
    if jobs:
        what = f"{len(prompts)} prompt(s) x n = {req.n}"
        if scoring:
            what += " + one per echoed prompt token for its log-probability"
        results = await _wait(state, request, _admit(state, jobs, what))
    it = iter(results)
    gen_res = [[next(it) for _ in js] for js in gen]
    score_res = [[next(it) for _ in js] for js in score]

    choices = []
    completion_tokens = 0
    for pi, p in enumerate(prompts):
        echo_rows = _echo_logprobs(tok, p, score_res[pi], k) if scoring else []
        for c in range(req.n):
            toks: list[int] = []
            conf: list[float] = []
            reason, at_eos = "length", False
            if p.plan is not None:
                toks, conf, reason, at_eos = _generated(tok, p.plan, gen_res[pi][c])
            text = tok.decode(toks)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text, reason, at_eos = text[:cut], "stop", False
            completion_tokens += len(toks)
            start = len(p.text) if req.echo else 0
            logprobs = None
            if k is not None:
                rows = list(echo_rows)
                for j, (t, q) in enumerate(zip(toks, conf, strict=True)):
                    off = len(tok.decode(toks[:j]))
                    if off >= len(text) and j > 0:
                        break  # cut by a stop string
                    lp = _log(q)
                    rows.append((_token_str(tok, t), lp, {_token_str(tok, t): lp} if k else None,
                                 start + off))  # fmt: skip
                if at_eos:  # the EOS that ended the text, as OpenAI lists it
                    g = gen_res[pi][c]
                    lp = _log(g.full_confidence[len(toks)])
                    eos = _token_str(tok, tok.special.eos)
                    rows.append((eos, lp, {eos: lp} if k else None, start + len(text)))
                logprobs = S.OpenAILogprobs(
                    tokens=[r[0] for r in rows],
                    token_logprobs=[r[1] for r in rows],
                    top_logprobs=[r[2] for r in rows] if k else None,
                    text_offset=[r[3] for r in rows],
                )
            choices.append(
                S.OpenAIChoice(
                    text=(p.text + text) if req.echo else text,
                    index=len(choices),
                    logprobs=logprobs,
                    finish_reason=reason,
                )
            )
    # what the model read: the prompt (and suffix), without the <mask>
    prompt_tokens = sum(len(p.plan.src) - 1 if p.plan else len(p.ids) for p in prompts)
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
    include_usage = req.stream_options is not None and req.stream_options.include_usage

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

    return StreamingResponse(stream(), media_type="text/event-stream")
