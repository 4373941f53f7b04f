"""Every route: the probes, /v1/models, the task endpoints (one per `endpoints.TASKS` row) and
the OpenAI-compatible /v1/completions."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from yan_serve.server import schemas as S
from yan_serve.server.docs import MODEL_ERRORS, OPENAI_SSE_DOC, SSE_DOC, error_responses
from yan_serve.server.endpoints import TASKS, Task, serve_task
from yan_serve.server.errors import OPENAI_PATH, error_json
from yan_serve.server.openai_compat import completions
from yan_serve.server.state import State


def install_routes(app: FastAPI, state: State) -> None:
    # Probes answer HEAD too (load balancers and uptime checkers send it), as a route of its
    # own outside the OpenAPI schema: one route for both methods gives the schema two
    # operations with one operationId, which OpenAPI forbids.
    @app.get("/health", response_model=S.Health, tags=["probes"])
    async def health() -> S.Health:
        """Liveness: the process serves HTTP."""
        return S.Health(status="ok")

    @app.get("/ready", response_model=S.Health, responses=error_responses(503), tags=["probes"])
    async def ready() -> Any:
        """Readiness: 200 once weights are loaded and warmed up, 503 before and while draining."""
        if state.draining:
            return error_json(503, "the server is shutting down")
        if state.load_error:
            return error_json(503, f"the model failed to load: {state.load_error}")
        if not state.ready:
            return error_json(503, "the model is loading")
        return S.Health(status="ready")

    for path, probe in (("/health", health), ("/ready", ready)):
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

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
        "/v1/models",
        response_model=S.ModelList,
        responses=error_responses(401, 503),
        tags=["models"],
    )
    async def models() -> S.ModelList:
        w = state.serving_worker()
        return S.ModelList(data=[S.ModelCard(id=w.model_id, created=w.created)])

    for task in TASKS:
        app.add_api_route(
            f"/v1/{task.name}",
            _task_endpoint(state, task),
            methods=["POST"],
            name=task.name,
            description=task.doc,
            response_model=task.response,
            responses={**MODEL_ERRORS, **SSE_DOC},
            tags=["yan"],
        )

    @app.post(
        OPENAI_PATH,
        response_model=S.OpenAICompletion,
        responses={**MODEL_ERRORS, **error_responses(404), **OPENAI_SSE_DOC},
        tags=["openai"],
        name="completions",
    )
    async def completions_route(req: S.OpenAICompletionRequest, request: Request) -> Any:
        """OpenAI-compatible text completion mapped onto YAN completion. Greedy unless
        `temperature > 0`; `stop` strings cut the text; streaming sends each choice's text in
        one chunk (a non-autoregressive model has the whole text at once)."""
        return await completions(state, request, req)


def _task_endpoint(state: State, task: Task):
    """The route function of one task: its body is the task's request schema."""

    async def endpoint(req, request: Request) -> Any:
        return await serve_task(state, request, task, req)

    # FastAPI reads the body's schema from the annotation, which differs per task
    endpoint.__annotations__ = {"req": task.request, "request": Request, "return": Any}
    return endpoint
