"""Errors: every one is JSON `{"error": {"message", "type", "code"}}`.

On /v1/completions it takes OpenAI's shape, with `param` and OpenAI's string `code` where one
applies. 400: the input parses but cannot be served; 401: missing or wrong API key; 404: unknown
path or model; 413: body too large; 422: schema violation; 429: queue full (Retry-After); 500: a
server fault, with `INTERNAL_ERROR` as its whole message (the traceback goes to the log); 503:
loading, draining, out of memory or past the shutdown deadline; 504: request timeout.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yan_serve.server import schemas as S

log = logging.getLogger("yan_serve.server")

OPENAI_PATH = "/v1/completions"  # its errors take OpenAI's shape (`param`, string `code`)
INTERNAL_ERROR = "internal error; see the server log"  # a 500's whole message: no internals

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


class APIError(Exception):
    """An error answered as `error_json`; raised anywhere below a route."""

    def __init__(self, status: int, message: str, type_: str, headers: dict | None = None, *,
                 code: str | None = None, param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers
        self.code, self.param = code, param


def bad_request(message: str, param: str | None = None) -> APIError:
    """400: the input parses but cannot be served."""
    return APIError(400, message, "invalid_request_error", param=param)


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


def install_error_handlers(app: FastAPI) -> None:
    """Every exception a route raises, answered as `error_json` (a 500 only for a bug)."""

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
            e.status_code, str(e.detail), headers=e.headers,
            openai=openai(request),
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_json(500, INTERNAL_ERROR, "internal_error", openai=openai(request))
