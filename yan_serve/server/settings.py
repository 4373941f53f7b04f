"""Server settings: command-line flags, each also read from a `YAN_SERVE_*` environment variable
(flag > environment > default)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "YAN_SERVE_"


def default_model_dir() -> str:
    """The checkpoint shipped in `weights/` (repository checkout or installed image)."""
    here = Path(__file__).resolve().parents[2] / "weights" / "yan-small-kjv"
    return str(here)


@dataclass
class Settings:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 256
    request_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    api_key: str | None = None
    log_level: str = "info"
    max_body_bytes: int = 1 << 20
    max_steps: int = 16
    default_steps: int = 0  # Euler time points T; 0: the checkpoint's ode_steps
    threads: int = 0  # torch intra-op threads (0: torch's default)
    linears: str = "cublas"  # YAN's fused engine: how its linear layers run (CUDA)
    ar_step: str = "torch"  # the AR baseline's decode step body (CUDA)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = default_model_dir()
        problems = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("max_batch_size", "max_queue", "max_steps", "max_body_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_wait_ms", "request_timeout", "shutdown_timeout"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                problems.append(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        for name in ("threads", "default_steps"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (0: the default)")
        from yan_serve.ar.fused import STEPS
        from yan_serve.engine.fused import LINEAR_MODES

        if self.linears not in LINEAR_MODES:
            problems.append(f"--linears must be one of {', '.join(LINEAR_MODES)}, got "
                            f"{self.linears!r}")  # fmt: skip
        if self.ar_step not in STEPS:
            problems.append(f"--ar-step must be one of {', '.join(STEPS)}, got {self.ar_step!r}")
        if self.default_steps > self.max_steps:
            problems.append(
                f"--default-steps {self.default_steps} is above --max-steps {self.max_steps}"
            )
        if self.api_key is not None and (
            not self.api_key.isprintable() or self.api_key != self.api_key.strip()
        ):
            problems.append("--api-key must be printable, without leading or trailing spaces")
        if not 0 < self.port < 65536 and self.port != 0:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            problems.append("--log-level must be critical/error/warning/info/debug")
        if problems:
            raise ValueError("; ".join(problems))
        self.log_level = self.log_level.lower()


HELP = {
    "model": "checkpoint directory (default: the shipped weights/yan-small-kjv)",
    "host": "bind address",
    "port": "TCP port",
    "device": "auto | cpu | cuda | cuda:N",
    "max_batch_size": "most requests the batcher runs together",
    "max_wait_ms": "gather window on an idle worker: how long the oldest queued request may wait"
    " for batch-mates (0: a free worker runs at once; under load batches form while it runs)",
    "max_queue": "queued requests beyond which new ones get 429",
    "request_timeout": "seconds before a request gets 504 and its work is dropped (0: no timeout)",
    "shutdown_timeout": "seconds SIGTERM waits for in-flight work before exiting",
    "api_key": "require `Authorization: Bearer KEY` on the API endpoints",
    "log_level": "critical | error | warning | info | debug",
    "max_body_bytes": "largest request body accepted (413 beyond)",
    "max_steps": "largest `steps` (Euler time points T) a request may ask for",
    "default_steps": "Euler time points T on [0, 1] when a request gives none; T - 1 Euler steps"
    " are taken (0: the checkpoint's)",
    "threads": "torch intra-op threads on CPU (0: torch's default)",
    "linears": "YAN on CUDA: the fused engine's linear layers: cublas (cuBLAS GEMMs, fused"
    " residual + norm), gelu (the FFN's GELU in a Triton GEMM) or fused (every norm, GELU and"
    " residual in the Triton GEMM beside it)",
    "ar_step": "an AR checkpoint on CUDA: the decode step captured in CUDA graphs: torch (eager"
    " ops), compile (torch.compile) or triton (fused-linear GEMMs, one-kernel attention and"
    " greedy end)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one readable line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="yan-serve",
        description="Serve a YAN checkpoint over HTTP. Every flag can also be set with the "
        f"environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}MAX_BATCH_SIZE=64).",
    )
    defaults = Settings.__dataclass_fields__
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = os.environ.get(ENV_PREFIX + f.name.upper())
        default = defaults[f.name].default
        # Values stay strings here; parse_settings converts them and names the bad one.
        p.add_argument(
            flag,
            default=env if env is not None else default,
            help=f"{HELP[f.name]} [env {ENV_PREFIX}{f.name.upper()}]",
        )
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags and environment; raises ValueError with a readable message."""
    args = build_parser().parse_args(argv)
    values = {}
    for f in fields(Settings):
        v = getattr(args, f.name)
        default = Settings.__dataclass_fields__[f.name].default
        if isinstance(v, str) and isinstance(default, (int, float)):
            try:
                v = type(default)(v)
            except ValueError:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(
                    f"{flag} / {ENV_PREFIX}{f.name.upper()} = {v!r} is not "
                    f"{'an integer' if isinstance(default, int) else 'a number'}"
                ) from None
        values[f.name] = v
    if values["api_key"] == "":
        values["api_key"] = None
    return Settings(**values)
