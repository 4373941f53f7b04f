"""Real servers for the HTTP tests: `python -m yan_serve` under uvicorn on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
# The small checkpoint the HTTP tests serve (CI speed); the README's examples run on the server's
# own default (tests/server/test_readme_examples.py).
CHECKPOINT = ROOT / "weights" / "yan-tiny-kjv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `yan-serve` subprocess on a free loopback port; `url` once /ready says 200."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, model: str | Path = CHECKPOINT
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "yan_serve",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--port",
            str(self.port),
            "--threads",
            "1",
            "--log-level",
            "warning",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready in time")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess("--max-wait-ms", "20").wait_ready()
    yield s
    s.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def assert_completions_ignore_batching(url: str) -> None:
    """12 seeded completions sent together (some of them sharing a batch) equal the same 12 sent
    one by one (text for text)."""
    import asyncio

    names = ["Moses", "Noah", "Abram", "me"] * 3
    reqs = [{"prompt": f"And God said unto {w}", "max_tokens": 8, "seed": i, "ignore_eos": True}
            for i, w in enumerate(names)]  # fmt: skip

    async def together():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/complete", json=r) for r in reqs))

    def shared_batches() -> float:
        """Batches that held more than one job so far (the batch-size histogram's count above
        its le="1.0" bucket)."""
        text = httpx.get(url + "/metrics").text
        rows = dict(re.findall(r'^yan:batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.M))
        return float(rows["+Inf"]) - float(rows["1.0"])

    before = shared_batches()
    batched = asyncio.run(together())
    assert shared_batches() > before, "the concurrent requests never shared a batch"
    with httpx.Client(base_url=url, timeout=120) as c:
        alone = [c.post("/v1/complete", json=r) for r in reqs]
    assert all(r.status_code == 200 for r in [*batched, *alone])
    assert [r.json()["text"] for r in batched] == [r.json()["text"] for r in alone]
