"""The API's documentation: the OpenAPI schema (with this server's bounds), its response
descriptions, and the /docs page served from local files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from yan_serve.server import schemas as S
from yan_serve.server.errors import ERROR_TYPES, error_json
from yan_serve.server.settings import Settings

log = logging.getLogger("yan_serve.server")

DOCS_ASSETS = "/docs/assets"  # Swagger UI's files, served from the swagger-ui-bundle package
# request schemas whose max_tokens is a target length the checkpoint's context bounds
CONTEXT_BOUND = ("CompleteRequest", "QARequest", "OpenAICompletionRequest")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (all `ErrorResponse`)."""
    return {
        c: {"model": S.ErrorResponse, "description": ERROR_TYPES.get(c, "error")} for c in codes
    }


MODEL_ERRORS = error_responses(400, 401, 413, 422, 429, 503, 504)


def sse_doc(events: list[str], what: str) -> dict[int | str, dict[str, Any]]:
    """The 200 response of an endpoint that can stream: JSON, or server-sent `events`."""
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


SSE_DOC = sse_doc(
    ["preview", "result", "error"],
    "`preview` at each Euler time point (0: the initial noise), then `result` (or `error`)",
)
OPENAI_SSE_DOC = sse_doc(["message"], "OpenAI `text_completion` chunks, then `[DONE]`")


def context_limit(model_dir: str) -> int | None:
    """The checkpoint's context in positions, read from its config.json (YAN `max_length`,
    GPT-2 `n_positions`); None when it cannot be read (the server reports that elsewhere)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_length", "n_positions"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


def bounded_openapi(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema, with `steps` bounded by this server's --max-steps and the generated
    length (`max_tokens` of complete, QA and OpenAI completions) by the checkpoint's context
    (what the server would refuse otherwise)."""
    context = context_limit(settings.model)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            bounds = {"steps": settings.max_steps}
            for name, model in schema.get("components", {}).get("schemas", {}).items():
                limits = dict(bounds)
                if context is not None and name in CONTEXT_BOUND:
                    limits["max_tokens"] = context - 1  # the EOS takes a position
                for field, bound in limits.items():
                    prop = model.get("properties", {}).get(field)
                    for alt in (prop or {}).get("anyOf", [prop] if prop else []):
                        if alt.get("type") == "integer":
                            alt["maximum"] = min(bound, alt.get("maximum", bound))
        return app.openapi_schema

    return openapi


def install_docs(app: FastAPI) -> None:
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
