"""The FastAPI application: `create_app` assembles the state, the worker's background load, the
batcher's lifespan, the `Gate` middleware, the error handlers, the docs and the routes.

Errors are JSON throughout (`yan_serve.server.errors` lists the statuses); the task endpoints
are one table (`yan_serve.server.endpoints`); /v1/completions is OpenAI's API
(`yan_serve.server.openai_compat`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from yan_serve.engine.requests import EngineRequest, Result, Worker
from yan_serve.server.batcher import Batcher
from yan_serve.server.docs import bounded_openapi, install_docs
from yan_serve.server.errors import install_error_handlers
from yan_serve.server.metrics import Metrics
from yan_serve.server.middleware import Gate
from yan_serve.server.routes import install_routes
from yan_serve.server.settings import Settings
from yan_serve.server.state import State, default_steps

log = logging.getLogger("yan_serve.server")

WorkerFactory = Callable[[Settings], Worker]


def create_app(
    settings: Settings,
    worker_factory: WorkerFactory | None = None,
    load_in_background: bool = True,
) -> FastAPI:
    """The app. The worker (model) loads in a background thread after start-up so /health
    answers at once and /ready says when the model is usable."""
    from yan_serve.server.loader import load_worker

    factory = worker_factory or (lambda s: load_worker(s.model, s.device, s.linears, s.ar_step))
    state = State(settings, Metrics())

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
            threading.Thread(target=_load, args=(state, factory), name="yan-load",
                             daemon=True).start()  # fmt: skip
        else:
            _load(state, factory)
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
        docs_url=None,  # served by install_docs from local files, not a CDN
        redoc_url=None,
    )
    app.state.yan = state
    app.openapi = bounded_openapi(app, settings)  # type: ignore[method-assign]
    app.add_middleware(Gate, state=state)
    install_error_handlers(app)
    install_docs(app)
    install_routes(app, state)
    return app


def _load(state: State, factory: WorkerFactory) -> None:
    """Load and warm up the worker; on failure record why (/ready says it) and tell the
    server (`on_load_error`), which exits."""
    settings = state.settings
    try:
        if settings.threads > 0:
            import torch

            torch.set_num_threads(settings.threads)
        t0 = time.perf_counter()
        worker = factory(settings)
        warm = worker.warmup(default_steps(settings, worker))
        state.worker = worker
        state.ready = True
        state.metrics.ready.set(1)
        log.info(
            "model %s ready on %s in %.1f s (warm-up %.1f s)",
            worker.model_id,
            worker.device,
            time.perf_counter() - t0,
            warm,
        )
    except Exception as e:
        state.load_error = " ".join(f"{type(e).__name__}: {e}".split())
        log.error("could not load the model from %s: %s", settings.model, state.load_error)
        if state.on_load_error is not None:
            state.on_load_error(state.load_error)


class _LazyWorker:
    """The batcher's view of the worker, which appears once loading finishes."""

    def __init__(self, state: State) -> None:
        self.state = state

    def run(self, requests: Sequence[EngineRequest]) -> list[Result]:
        return self.state.serving_worker().run(requests)
