"""`Gate`, the pure-ASGI middleware in front of every route: request metrics, in-flight
accounting, draining, the API key and the body-size limit."""

from __future__ import annotations

import hmac
import time

from yan_serve.server.errors import OPENAI_PATH, error_json
from yan_serve.server.state import State

PROBES = ("/health", "/ready", "/metrics")
KNOWN_PATHS = (
    *PROBES,
    "/v1/models",
    "/v1/infill",
    "/v1/complete",
    "/v1/qa",
    "/v1/classify",
    OPENAI_PATH,
    "/docs",
    "/openapi.json",
)
API_PREFIX = "/v1/"
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


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
            # A status of its own only for a client gone mid-upload: nothing was sent to it.
            status = await self._handle(scope, receive, send) or status
        finally:
            path = scope["path"]
            endpoint = path if path in KNOWN_PATHS else "other"
            self.state.metrics.requests.labels(endpoint, str(status)).inc()
            if path.startswith(API_PREFIX):
                self.state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _handle(self, scope, receive, send) -> int | None:
        """Answer the request; returns the status to count when no response could be sent."""
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
            if msg["type"] == "http.disconnect":  # gone while uploading: a disconnect, no 500
                st.metrics.rejected.labels("disconnect").inc()
                return CLIENT_CLOSED
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
