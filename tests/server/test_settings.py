"""Server settings from flags and YAN_SERVE_* environment variables."""

from __future__ import annotations

import pytest

from yan_serve.server.settings import Settings, build_parser, default_model_dir, parse_settings


def test_flags_env_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_settings([])
    assert s.model == default_model_dir() and s.port == 8000 and s.api_key is None
    monkeypatch.setenv("YAN_SERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("YAN_SERVE_API_KEY", "k")
    s = parse_settings(["--port", "9001"])
    assert (s.max_batch_size, s.api_key, s.port) == (7, "k", 9001)
    assert parse_settings(["--max-batch-size", "3"]).max_batch_size == 3  # flag beats env


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(Settings.__dataclass_fields__)


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "tpu"],
        ["--max-queue", "0"],
        ["--log-level", "loud"],
        ["--linears", "cutlass"],
        ["--ar-step", "jit"],
    ],
)
def test_bad_settings_raise_readable_errors(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=argv[0].lstrip("-").split("-")[0]):
        parse_settings(argv)


def test_kernel_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_settings([])
    assert (s.linears, s.ar_step) == ("cublas", "torch")
    monkeypatch.setenv("YAN_SERVE_AR_STEP", "triton")
    s = parse_settings(["--linears", "fused"])
    assert (s.linears, s.ar_step) == ("fused", "triton")


def test_kernel_choices_reach_the_workers() -> None:
    """`--linears` reaches YAN's fused engine, `--ar-step` the AR worker's decode runner."""
    from pathlib import Path

    from yan_serve.server.loader import load_worker

    yan = load_worker(default_model_dir(), "cpu", linears="fused", ar_step="triton")
    assert yan.sampler.linears == "fused"
    ar_dir = Path(default_model_dir()).parent / "ar-tiny-kjv"
    ar = load_worker(ar_dir, "cpu", linears="fused", ar_step="triton")
    assert ar.step == "triton"


def test_bad_number_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YAN_SERVE_MAX_QUEUE", "lots")
    with pytest.raises(ValueError, match="YAN_SERVE_MAX_QUEUE"):
        parse_settings([])


def _serve(*argv: str):
    """`python -m yan_serve` with the shipped YAN checkpoint, its exit code and stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "yan_serve", "--model", default_model_dir(), "--device", "cpu",
         *argv], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_a_busy_port_exits_2_with_one_line_before_loading() -> None:
    """Bound before the model starts loading: one line and exit 2, not uvicorn's log lines and
    an abort of the loader thread at interpreter exit (rc 134)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = _serve("--port", str(port))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"yan-serve: error: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use"
    ]


@pytest.mark.parametrize(
    # the resolver's wording for a name that is no address varies by system: not checked
    "host, reason",
    [("999.1.1.1", ""), ("8.8.8.8", "Errno 99")],
)
def test_a_host_it_cannot_listen_on_exits_2_with_one_line(host: str, reason: str) -> None:
    p = _serve("--host", host, "--port", "8765")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"yan-serve: error: cannot listen on {host}:8765"
    )
    assert reason in lines[0]


def test_bind_sockets_listens_where_uvicorn_would() -> None:
    """One socket per address the host resolves to (SO_REUSEADDR, as asyncio's create_server
    sets it); nothing left open when one cannot be bound."""
    import socket

    from yan_serve.server.main import bind_sockets

    (sock,) = bind_sockets("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        sock.listen()
        with pytest.raises(OSError, match="Address already in use"):
            bind_sockets("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(socket.gaierror):
        bind_sockets("999.1.1.1", 0)


def test_the_server_pins_glibcs_mmap_threshold_unless_the_operator_did(monkeypatch) -> None:
    """A fixed threshold keeps a long-running CPU server's heap from fragmenting (docs/server.md,
    "Memory"); an operator's MALLOC_MMAP_THRESHOLD_ is left alone."""
    import sys

    from yan_serve.server.main import pin_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if not sys.platform.startswith("linux"):
        assert pin_mmap_threshold() is False
        return
    assert pin_mmap_threshold() is True  # mallopt accepted it (glibc)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert pin_mmap_threshold() is False
