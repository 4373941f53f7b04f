"""The application's state, and what every route asks of it: the worker once it is ready, and
the Euler time points a request runs with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from yan_serve.engine.requests import Worker
from yan_serve.server.batcher import Batcher
from yan_serve.server.errors import APIError, bad_request
from yan_serve.server.metrics import Metrics
from yan_serve.server.settings import Settings


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    worker: Worker | None = None
    batcher: Batcher | None = None
    ready: bool = False
    load_error: str | None = None
    on_load_error: Callable[[str], None] | None = None  # the server: exit (never ready)
    draining: bool = False
    deadline: float | None = None  # perf_counter time when a drain gives up (the one deadline)
    in_flight: int = 0

    def serving_worker(self) -> Worker:
        """The loaded worker; 503 while it loads or when loading failed."""
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "unavailable")
        if not self.ready or self.worker is None:
            raise APIError(
                503,
                "the model is loading; retry when /ready says so",
                "unavailable",
                {"Retry-After": "2"},
            )
        return self.worker

    @property
    def serving_batcher(self) -> Batcher:
        """The batcher (started with the app, before any request)."""
        assert self.batcher is not None, "the batcher starts with the app"
        return self.batcher


def default_steps(settings: Settings, worker: Worker) -> int:
    """Euler time points T when a request gives none: --default-steps, else the checkpoint's."""
    return settings.default_steps or worker.default_steps


def resolve_steps(state: State, steps: int | None) -> int:
    """A request's Euler time points T: its own or the default; 400 outside 1..--max-steps."""
    s = steps if steps is not None else default_steps(state.settings, state.serving_worker())
    if not 1 <= s <= state.settings.max_steps:
        raise bad_request(f"steps must be between 1 and {state.settings.max_steps}, got {s}")
    return s
