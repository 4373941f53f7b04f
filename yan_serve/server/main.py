"""`yan-serve` / `python -m yan_serve`: run the HTTP server under uvicorn.

SIGTERM (or Ctrl-C) starts a drain: /ready turns 503 and new requests get 503 at once, queued and
running work finishes (at most --shutdown-timeout seconds), then the server exits with code 0.
A second signal exits without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from types import FrameType

import uvicorn

from yan_serve.server.settings import Settings, parse_settings

log = logging.getLogger("yan_serve.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals, so uvicorn does not re-raise it after a clean exit.
        if self.state.draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self.state.draining
            return
        log.info(
            "signal %s: draining (new requests get 503), up to %.0f s",
            signal.Signals(sig).name,
            self.shutdown_timeout,
        )
        self.state.draining = True
        self.state.metrics.ready.set(0)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.perf_counter() + self.shutdown_timeout
        b = self.state.batcher
        while time.perf_counter() < deadline:
            # Our own accounting counts requests answered by the draining gate too; those take
            # microseconds, so "in flight" settles at 0 once real work is done.
            if (b is None or b.idle) and self.state.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("shutdown timeout: %d requests still in flight", self.state.in_flight)
        self.should_exit = True


def serve(settings: Settings) -> int:
    from yan_serve.server.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)),
        access_log=False,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.yan, settings.shutdown_timeout)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValueError as e:
        print(f"yan-serve: error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    if not (Path(settings.model) / "config.json").is_file():
        print(
            f"yan-serve: error: {settings.model} is not a checkpoint directory (no config.json)",
            file=sys.stderr,
        )
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
