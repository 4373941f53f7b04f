"""`yan-serve` / `python -m yan_serve`: run the HTTP server under uvicorn.

Before serving, the checkpoint is checked without reading its weights (config.json types and
keys, model.safetensors' header, tokenizer.json, labels.json, the device): a problem exits with
code 2 and one line naming the file and the field. So does an address it cannot listen on
(a port in use, a host that is not this machine's): the listening sockets are bound before the
model starts loading, and handed to uvicorn. If loading still fails later (in the background,
while /health already answers), the server logs one line and exits with code 1.

SIGTERM (or Ctrl-C) starts a drain: /ready turns 503 and new requests get 503 at once, queued and
running work finishes until one deadline (--shutdown-timeout seconds after the signal); work
still unfinished then is answered 503 (JSON) and the server exits with code 0, without waiting
for a batch still on the model (its results are discarded). A second signal exits without
waiting.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn

from yan_serve.server.settings import Settings, parse_settings

log = logging.getLogger("yan_serve.server")

# After the shutdown deadline: how long the requests failed with 503 get to be written.
WRITE_GRACE_S = 1.0


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
        self.state.deadline = time.perf_counter() + self.shutdown_timeout
        self.state.metrics.ready.set(0)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        """Wait for in-flight work until the one shutdown deadline; then fail what is left
        (503 JSON to its requests), give them a moment to be written, and exit."""
        deadline = self.state.deadline
        b = self.state.batcher
        while time.perf_counter() < deadline:
            # Our own accounting counts requests answered by the draining gate too; those take
            # microseconds, so "in flight" settles at 0 once real work is done.
            if (b is None or b.idle) and self.state.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        else:
            failed = b.abort() if b is not None else 0
            log.warning(
                "shutdown timeout: %d requests in flight; %d unfinished jobs fail (503)",
                self.state.in_flight,
                failed,
            )
            # The failed requests answer at once; a running batch is not waited for.
            grace = time.perf_counter() + WRITE_GRACE_S
            while self.state.in_flight and time.perf_counter() < grace:
                await asyncio.sleep(0.02)
        # uvicorn then waits for open connections (a streaming response still being written)
        # only as long as the deadline leaves.
        self.config.timeout_graceful_shutdown = max(WRITE_GRACE_S, deadline - time.perf_counter())
        self.should_exit = True


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """The sockets `loop.create_server(host=host, port=port)` would listen on (what uvicorn
    does with a host and port), bound now: one per address `host` resolves to, SO_REUSEADDR
    set, IPv6 ones IPv6-only; an address family the machine lacks is skipped. Raises OSError
    (socket.gaierror for a host that does not resolve) when they cannot all be bound, after
    closing those that were."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)  # fmt: skip
    socks: list[socket.socket] = []
    try:
        for af, kind, proto, _, addr in dict.fromkeys(infos):
            try:
                sock = socket.socket(af, kind, proto)
            except OSError:  # a family/protocol this machine does not have
                continue
            socks.append(sock)
            if sys.platform != "win32":  # asyncio's default: restart without TIME_WAIT trouble
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL and len(infos) > 1:  # family not enabled
                    socks.pop().close()
                    continue
                raise
        if not socks:
            raise OSError(errno.EADDRNOTAVAIL, "no address to bind")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# glibc's mallopt parameter for the size from which an allocation gets its own mapping
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (True when set). glibc raises the threshold each time
    a mapped block is freed, up to 32 MiB, so tensors of the sizes a server's ever-changing
    batch shapes need end up carved from the heap, which then fragments: a CPU server's RSS grew
    from 530 to 850 MiB over 4,200 mixed requests and kept growing; pinned at 1 MiB it went from
    545 to 643 MiB with the same latency (64 KiB cost a third more per request). Not on other C
    libraries, and not where the operator set MALLOC_MMAP_THRESHOLD_ (glibc read it already)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Run the server until it exits, on `sockets` (bound here from --host and --port when
    None: see `bind_sockets`)."""
    from yan_serve.server.app import create_app

    if sockets is None:
        sockets = bind_sockets(settings.host, settings.port)

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    pin_mmap_threshold()
    # uvicorn announces its address only for sockets it binds itself
    where = ", ".join(
        f"http://{_where(*sock.getsockname()[:2])}"
        for sock in sockets
        if sock.family != socket.AF_UNIX
    )
    log.info("listening on %s; /ready turns 200 once %s is loaded", where, settings.model)
    app = create_app(settings)
    state = app.state.yan
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)),
        access_log=False,
        lifespan="on",
    )
    server = DrainingServer(config, state, settings.shutdown_timeout)

    def on_load_error(message: str) -> None:  # loader thread: never ready, so stop
        server.should_exit = True

    state.on_load_error = on_load_error
    server.run(sockets=sockets)
    if state.load_error:
        return 1
    code = 0 if server.started else 1
    if state.batcher is not None and state.batcher.model_busy:
        # Past the shutdown deadline with a batch still on the model: its results were
        # discarded. The interpreter's exit would join the model thread (wait for the batch)
        # and tear torch down under it, so end the process here.
        log.warning("exiting with a model batch still running (its results are discarded)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValueError as e:
        print(f"yan-serve: error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    from yan_serve.server.loader import check_checkpoint

    if not (Path(settings.model) / "config.json").is_file():
        print(
            f"yan-serve: error: {settings.model} is not a checkpoint directory (no config.json)",
            file=sys.stderr,
        )
        return 2
    try:
        check_checkpoint(settings.model, settings.device)
    except (ValueError, OSError) as e:
        print(f"yan-serve: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    try:  # before the model starts loading: a busy port must not leave a loader thread behind
        sockets = bind_sockets(settings.host, settings.port)
    except OSError as e:
        where = _where(settings.host, settings.port)
        print(f"yan-serve: error: cannot listen on {where}: {e}", file=sys.stderr)
        return 2
    return serve(settings, sockets)


if __name__ == "__main__":
    sys.exit(main())
