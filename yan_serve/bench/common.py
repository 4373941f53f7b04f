"""What every benchmark suite shares: timing, the run header, devices, flags and test models.

Timing. `time_ms` times a call with CUDA events (device time, launches included) after a few
warm-up calls; `wall_ms` times a host-synchronizing call end to end on CUDA; `cpu_time_ms` is the
CPU's wall-clock timer, which stops taking timed calls once they add up to `CPU_BUDGET_S`
seconds (after at least one). Each reports the median. `timer(device)` and `wall_timer(device)`
pick the kernel-level and the whole-call timer for a device.

Header. `run_header(device)` is the first fields of every table's header line: the device (and
on a CPU torch's intra-op thread count), date, commit and library versions; `print_header`
prints a header as `k=v` fields separated by two spaces.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from yan_serve.argtypes import output_file, positive_int
from yan_serve.device import resolve_device

if TYPE_CHECKING:
    from yan_serve.config import YANConfig
    from yan_serve.engine.sampler import GenerationRequest
    from yan_serve.model import YAN

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CPU_BUDGET_S = 5.0  # a CPU measurement stops taking timed calls once they add up to this
TRITON_ON_CPU = "n/a (interpreter)"
NO_COMPILE = "skipped (--no-compile)"
ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


# ----------------------------------------------------------------------------- timing
def _median_ms(once: Callable[[], float], iters: int, budget_s: float = math.inf) -> float:
    """Median of `once()` (one timed call, in ms) over `iters` calls, fewer (at least one) once
    they add up to `budget_s` seconds."""
    times: list[float] = []
    while len(times) < max(iters, 1) and sum(times) < 1e3 * budget_s:
        times.append(once())
    return statistics.median(times)


def _wall_once(fn: Callable[[], object], sync: bool = False) -> Callable[[], float]:
    """One call of `fn` timed with `time.perf_counter`, in ms (after a CUDA sync with `sync`)."""

    def once() -> float:
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    return once


def time_ms(
    fn: Callable[[], object], iters: int, warmup: int = 3, budget_s: float = math.inf
) -> float:
    """Median time of `fn` on the current CUDA stream (CUDA events), in milliseconds. With
    `budget_s`, a slow `fn` gets fewer warm-up and timed calls (at least one of each) once they
    add up to that many seconds each."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 > budget_s:
            break
    torch.cuda.synchronize()

    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    return _median_ms(once, iters, budget_s)


def wall_ms(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median wall time of a host-synchronizing call on CUDA (generate returns Python lists), in
    ms: end to end, so host-side launch overhead counts, which is what graphs remove."""
    for _ in range(warmup):
        fn()
    return _median_ms(_wall_once(fn, sync=True), iters)


def cpu_time_ms(
    fn: Callable[[], object], iters: int, warmup: int = 1, budget_s: float = CPU_BUDGET_S
) -> float:
    """Median wall time (`time.perf_counter`) of a CPU call in milliseconds, after `warmup`
    calls: `iters` timed calls, fewer (at least one) once they add up to `budget_s`."""
    for _ in range(warmup):
        fn()
    return _median_ms(_wall_once(fn), iters, budget_s)


def timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """The kernel-level timer: CUDA events on CUDA, wall clock on the CPU."""
    return time_ms if device == "cuda" else cpu_time_ms


def wall_timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """The whole-call timer (host work included): `wall_ms` on CUDA, wall clock on the CPU."""
    return wall_ms if device == "cuda" else cpu_time_ms


def graph_ms(fn: Callable[[], object], iters: int, reps: int = 10) -> float:
    """Median device time of `fn` replayed from a CUDA graph of `reps` back-to-back calls, in ms
    per call: the kernels' own time, without the Python launcher's host overhead (which a
    sample captured in a graph does not pay either)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_ms(graph.replay, iters) / reps


def copy_bandwidth(iters: int, device: str = "cuda") -> float:
    """Memory copy rate in bytes/s (read + write): a 1 GiB device-to-device copy on CUDA, a
    256 MiB copy on the CPU (past any cache)."""
    # filled once, so the timed copies meet no first-touch page faults on the CPU
    src = torch.ones(1 << (30 if device == "cuda" else 28), dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    ms = timer(device)(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(dtype: torch.dtype, iters: int, device: str = "cuda") -> float:
    """Dense matmul rate in flop/s: 8192^3 on CUDA (cuBLAS, default precision settings), 2048^3
    on the CPU (torch's CPU GEMM at its current thread count)."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(device)(lambda: a @ b, iters)
    return 2 * n**3 / (ms * 1e-3)


def time_compiled(fn: Callable[[], object], iters: int) -> tuple[float | None, float | None, str]:
    """(median ms, first call s, status) of a call through torch.compile on the CPU. Compile
    errors (no C compiler, an unsupported op) surface on the first call: they are returned as
    status "compile failed: <one line>", not raised."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # whatever inductor raises, the eager column still stands
        return None, None, "compile failed: " + one_line(exc)
    first = time.perf_counter() - t0
    return cpu_time_ms(fn, iters), first, "ok"


def or_oom(fn: Callable[[], T]) -> T | None:
    """`fn()`, or None when CUDA ran out of memory (its cache emptied for what comes next)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def one_line(exc: BaseException, limit: int = 110) -> str:
    """`Type: first line` of an exception. torch.compile errors end with the user code they
    stopped at ("from user code: File ..., line N, ..."): that file, line and code go first."""
    text = str(exc).strip()
    lines = text.splitlines()
    msg = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")
    at = re.search(r'from user code:\s+File "([^"]+)", line (\d+), in \S+\s+(.+)', text)
    if at:
        msg = f"{Path(at[1]).name}:{at[2]} `{at[3].strip()}`: {msg}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def surviving(rows: Iterator[T], failures: list[str] | None = None) -> Iterator[T]:
    """The rows a generator yields until one raises: the error is printed (and appended to
    `failures`, so that the command can exit non-zero), the rest skipped."""
    try:
        yield from rows
    except Exception as exc:
        traceback.print_exc()
        print(f"failed: {one_line(exc)}", flush=True)
        if failures is not None:
            failures.append(one_line(exc))


def failed_exit(command: str, failures: Sequence[str]) -> int:
    """The exit status of a run whose failed rows are `failures`: 0 when none, else 1 after
    one line on stderr saying how many (each was printed where it happened)."""
    if not failures:
        return 0
    print(f"yan-serve bench {command}: {len(failures)} measurement(s) failed", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- header
def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_header(device: str = "cuda") -> dict[str, str | int | None]:
    """Device, date, commit and versions: the first fields of every benchmark's header line
    (on the CPU also torch's intra-op thread count)."""
    if device == "cpu":
        where: dict[str, str | int | None] = {
            "device": _cpu_name(),
            "threads": torch.get_num_threads(),
        }
        triton = _version("triton")
    else:
        where = {"device": torch.cuda.get_device_properties(0).name}
        triton = importlib.metadata.version("triton")
    return {
        **where,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": triton,
        "cuda": torch.version.cuda,
    }


def print_header(header: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in header.items()), flush=True)


# ------------------------------------------------------------------------------ tables
def fmt(v: float | None, spec: str) -> str:
    """A cell, or "oom" where the measurement ran out of memory."""
    return "oom" if v is None else format(v, spec)


def compiled_cells(
    ms: float | None, first: float | None, eager: float, status: str, spec: str = "13.3f"
) -> str:
    """The compiled ms, speedup and 1st call s cells; where the compiled path did not run, a
    word (the reason is printed under the table)."""
    if ms is None or first is None:
        word = "skipped" if status == NO_COMPILE else "failed"
        return f"{word:>13}{'-':>9}{'-':>12}"
    return f"{ms:{spec}}{eager / ms:8.2f}x{first:12.2f}"


def write_json(path: str | None, runs: list[dict]) -> None:
    """One run: {"header", "rows"}; several (one per preset): a list of those."""
    if path:  # whole or not at all: a temporary file beside it, then renamed over it
        text = json.dumps(runs[0] if len(runs) == 1 else runs, indent=2) + "\n"
        tmp = Path(f"{path}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def finish(
    args: argparse.Namespace, header: dict, rows: list, legend: str, failures: Sequence[str] = ()
) -> int:
    """The end of a one-table command: the legend under the table, --json (the header and the
    rows, dataclasses) written, exit status 0 (1 with `failures`: see `failed_exit`)."""
    print(legend)
    write_json(args.json, [{"header": header, "rows": [asdict(r) for r in rows]}])
    return failed_exit(getattr(args, "command", "?"), failures)


# ----------------------------------------------------------------------------- devices
def bench_device(args: argparse.Namespace, command: str) -> str | None:
    """The device `--device` names, "cuda" or "cpu"; None, after one line on stderr, where the
    command cannot run: CUDA asked for and absent, or CUDA chosen without the triton package."""
    try:
        device = str(resolve_device(args.device))
    except ValueError as e:
        print(f"yan-serve bench {command}: {e}", file=sys.stderr)
        return None
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            print(f"yan-serve bench {command}: needs the triton package", file=sys.stderr)
            return None
    return device


def suite_parser(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    run: Callable[[argparse.Namespace], int],
    iters: tuple[int, int],
    dtypes: dict[str, torch.dtype] = DTYPES,
    dtype_help: str = "default: bf16 on CUDA, fp32 on CPU",
) -> argparse.ArgumentParser:
    """The parser of command `name` with the flags every suite takes: --device, --dtype (from
    `dtypes`), --iters (`iters`: its defaults on CUDA and on the CPU) and --json. The command
    runs as `run(args)`; the suite adds its own flags to the parser returned."""
    p = sub.add_parser(name, help=help)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when present, else CPU",
    )
    p.add_argument("--dtype", choices=sorted(dtypes), help=dtype_help)
    p.add_argument(
        "--iters",
        type=positive_int,
        help=f"timed repetitions, median reported (default: {iters[0]} CUDA, {iters[1]} CPU)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------- flags
def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", metavar="PATH", type=output_file, help="also write header and rows as JSON"
    )


def int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def choice_list(text: str, known: Sequence[str], what: str) -> list[str]:
    """Comma-separated names, each one of `known` (`what` names them in the errors)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what} names, got {text!r}")
    for name in names:
        if name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r}; choose from {', '.join(known)}"
            )
    return names


def preset_list(text: str) -> list[str]:
    from yan_serve.config import preset_names

    return choice_list(text, preset_names(), "preset")


# ------------------------------------------------------------------------------ models
def bench_model(name: str, lengths: list[int], device: str, dtype: torch.dtype) -> tuple[YAN, str]:
    """A preset with random weights (latency does not depend on the weights); its max_length
    is raised to the longest benchmarked length where needed (position table rows only)."""
    from yan_serve.config import YANConfig
    from yan_serve.model import YAN

    cfg = YANConfig.from_name(name)
    label = f"{name} (random weights)"
    if max(lengths) > cfg.max_length:
        cfg = YANConfig.from_name(name, max_length=max(lengths))
        label = f"{name} (random weights, max_length {cfg.max_length})"
    torch.manual_seed(0)
    with torch.device(device):
        model = YAN(cfg).to(dtype).eval()
    return model, label


def euler_steps(cfg: YANConfig, requested: int = 0) -> int:
    """The Euler time points a benchmark samples with: `requested`, or (0) the config's."""
    return requested or cfg.ode_steps


def random_requests(cfg: YANConfig, batch: int, length: int) -> list[GenerationRequest]:
    """`batch` random requests with source length = target length = `length`."""
    from yan_serve.engine.sampler import GenerationRequest

    g = torch.Generator().manual_seed(batch * 100003 + length)
    return [
        GenerationRequest(
            torch.randint(4, cfg.vocab_size, (length,), generator=g).tolist(), length, seed=i
        )
        for i in range(batch)
    ]
