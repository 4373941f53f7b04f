"""Benchmarks, apart from the tests: `python -m yan_serve.bench <command> [--device DEVICE]`.

`kernels` times each fused op at the paper's shapes (d = 512, K = 6 experts, V = 128258).
On CUDA: the Triton kernel (yan_kernels) against its torch eager reference (`*_ref`), and per
shape eager and Triton time, the Triton kernel's achieved GB/s and TFLOP/s, and its roofline
floor, i.e. the larger of (minimal bytes / measured copy bandwidth) and (flops / measured dense
matmul rate). On CPU: the same reference eager against the same reference under
`torch.compile` (the CPU's compiled path); GB/s, TFLOP/s and the floor are computed the same
way, from a CPU copy and a CPU GEMM. Triton runs on a CPU only in its interpreter, which is not
a performance path: that column reads "n/a (interpreter)". The header records device, date,
commit and library versions.

`sampler` times one whole greedy sample (`generate`, host work included) of presets with random
weights at batch x length shapes (source length = target length). On CUDA: eager torch ops, the
fused Triton kernels launched eagerly, and the graph-captured sampler (yan_serve.engine.graphs),
with the capture's time and memory and the share of tokens where the graph agrees with the fused
run. On CPU there are no CUDA graphs and Triton is only interpreted: the reference ops run
eagerly and against a copy of the model whose encoder and trunk blocks and decoder run under
`torch.compile`, with the share of tokens where the two agree.

`scan` times the Mamba-1 selective scan at Bt x L x Di x N shapes: the sequential oracle
(`yan_kernels.chunked_scan.selective_scan_sequential`), `selective_scan_chunked` with its two chunk
solvers ("loop", the CPU path; "doubling", the CUDA training path), each forward (no_grad) and
forward + backward, and, on CUDA, the fused forward-only paths of `yan_kernels.ops.selective_scan`
(the Triton kernel, and mamba-ssm's kernel when it imports). Per row: median ms, speedup over
the oracle, GB/s of minimal traffic and its share of the measured copy bandwidth, and the max
abs error against the oracle in fp32 (of y, and of the input grads for forward + backward).
On a CPU the fused rows read "n/a (interpreter)" (Triton) and "n/a (not installed)" or
"n/a (needs CUDA)" (mamba-ssm).

`--device auto` (the default) takes CUDA when present, else the CPU; `--device cuda` without
CUDA (or without triton) prints one line and exits with status 2. CPU timings are wall-clock
medians (`time.perf_counter`) after one warm-up call, stopping early (after at least one timed
call) once a measurement's timed calls pass `CPU_BUDGET_S` seconds.

New commands are a `_add_<name>(subparsers)` function registered in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.metadata
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from yan_serve.device import resolve_device

if TYPE_CHECKING:
    from yan_serve.config import YANConfig
    from yan_serve.engine.sampler import Generation, GenerationRequest
    from yan_serve.model import YAN

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CPU_BUDGET_S = 5.0  # a CPU measurement stops taking timed calls once they add up to this
TRITON_ON_CPU = "n/a (interpreter)"
GRAPH_ON_CPU = "n/a on CPU"
NO_COMPILE = "skipped (--no-compile)"


@dataclass
class Row:
    op: str
    shape: str
    eager_ms: float | None  # None: the eager reference ran out of memory
    triton_ms: float
    bytes: int  # minimal traffic: inputs read once, outputs written once
    flops: int
    floor_ms: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.triton_ms / 1e6

    @property
    def tflops(self) -> float:
        return self.flops / self.triton_ms / 1e9


@dataclass
class CpuRow:
    op: str
    shape: str
    eager_ms: float  # the torch reference, eager
    compiled_ms: float | None  # the reference under torch.compile (None: see `compiled`)
    first_call_s: float | None  # the compiled path's first call at this shape (compilation)
    compiled: str  # "ok", NO_COMPILE or "compile failed: <one line>"
    bytes: int  # minimal traffic, as in `Row`
    flops: int
    floor_ms: float

    @property
    def fast_ms(self) -> float:
        """The CPU's fast path: compiled where it ran, else eager."""
        return self.eager_ms if self.compiled_ms is None else self.compiled_ms

    @property
    def gbps(self) -> float:
        return self.bytes / self.fast_ms / 1e6

    @property
    def tflops(self) -> float:
        return self.flops / self.fast_ms / 1e9


# ----------------------------------------------------------------------------- measurement
def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median wall time of `fn` on the current CUDA stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    ms = _timer(device)(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(dtype: torch.dtype, iters: int, device: str = "cuda") -> float:
    """Dense matmul rate in flop/s: 8192^3 on CUDA (cuBLAS, default precision settings), 2048^3
    on the CPU (torch's CPU GEMM at its current thread count)."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _timer(device)(lambda: a @ b, iters)
    return 2 * n**3 / (ms * 1e-3)


def cpu_time_ms(
    fn: Callable[[], object], iters: int, warmup: int = 1, budget_s: float = CPU_BUDGET_S
) -> float:
    """Median wall time (`time.perf_counter`) of a CPU call in milliseconds, after `warmup`
    calls: `iters` timed calls, fewer (at least one) once they add up to `budget_s`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(iters, 1) and sum(times) < 1e3 * budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    return time_ms if device == "cuda" else cpu_time_ms


def _one_line(exc: BaseException, limit: int = 110) -> str:
    """`Type: first line` of an exception. torch.compile errors end with the user code they
    stopped at ("from user code: File ..., line N, ..."): that file, line and code go first."""
    text = str(exc).strip()
    lines = text.splitlines()
    msg = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")
    at = re.search(r'from user code:\s+File "([^"]+)", line (\d+), in \S+\s+(.+)', text)
    if at:
        msg = f"{Path(at[1]).name}:{at[2]} `{at[3].strip()}`: {msg}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _time_compiled(fn: Callable[[], object], iters: int) -> tuple[float | None, float | None, str]:
    """(median ms, first call s, status) of a call through torch.compile on the CPU. Compile
    errors (no C compiler, an unsupported op) surface on the first call: they are returned as
    status "compile failed: <one line>", not raised."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # whatever inductor raises, the eager column still stands
        return None, None, "compile failed: " + _one_line(exc)
    first = time.perf_counter() - t0
    return cpu_time_ms(fn, iters), first, "ok"


def _eager_ms(fn: Callable[[], object], iters: int) -> float | None:
    try:
        return time_ms(fn, iters)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


# ------------------------------------------------------------------------------ kernels
@dataclass
class _Case:
    """One shape of one op: the arguments every path takes, and its minimal cost."""

    op: str
    shape: str
    args: tuple
    bytes: int
    flops: int


def _routed_cases(
    dtype: torch.dtype, device: str, ns: list[int], d: int = 512, K: int = 6
) -> Iterator[_Case]:
    H = 4 * d
    elt = torch.finfo(dtype).bits // 8
    w1 = torch.randn(K, d, H, device=device, dtype=dtype) / d**0.5
    b1 = torch.randn(K, H, device=device, dtype=dtype) * 0.1
    w2 = torch.randn(K, H, d, device=device, dtype=dtype) / H**0.5
    b2 = torch.randn(K, d, device=device, dtype=dtype) * 0.1
    for n in ns:
        h = torch.randn(n, d, device=device, dtype=dtype)
        z = torch.randn(n, d, device=device, dtype=dtype)
        e = torch.randint(0, K, (n,), device=device)
        nbytes = elt * (3 * n * d + K * (2 * d * H + H + d)) + 8 * n
        flops = 2 * 2 * n * d * H
        yield _Case(
            "routed_expert_euler",
            f"N={n} d={d} K={K}",
            (h, e, w1, b1, w2, b2, z, 0.5),
            nbytes,
            flops,
        )


def _decoder_cases(
    dtype: torch.dtype,
    device: str,
    ns: list[int],
    sample_ns: list[int],
    d: int = 512,
    V: int = 128258,
) -> Iterator[_Case]:
    """Greedy rows at `ns`, temperature-sampling rows (`+sample`) at `sample_ns`."""
    elt = torch.finfo(dtype).bits // 8
    w = torch.randn(V, d, device=device, dtype=dtype) / d**0.5
    b = torch.randn(V, device=device, dtype=dtype) * 0.1
    for n in dict.fromkeys([*ns, *sample_ns]):
        x = torch.randn(n, d, device=device, dtype=dtype)
        seed = torch.arange(n, device=device, dtype=torch.int64)
        nbytes = elt * (n * d + V * d + V) + 12 * n
        flops = 2 * n * V * d
        for sample in (False, True):
            if n not in (sample_ns if sample else ns):
                continue
            extra = (0.8, seed) if sample else ()
            yield _Case(
                "decoder_argmax" + ("+sample" if sample else ""),
                f"N={n} d={d} V={V}",
                (x, w, b, *extra),
                nbytes,
                flops,
            )


def _gpu_row(c: _Case, ref: Callable, kernel: Callable, iters: int, bw: float, rate: float) -> Row:
    """Eager reference (host-timed with events, launches included) vs the kernel's launches
    replayed from a CUDA graph (device time: how a captured sample runs it)."""
    return Row(
        c.op,
        c.shape,
        _eager_ms(lambda: ref(*c.args), iters),
        graph_ms(lambda: kernel(*c.args), iters),
        c.bytes,
        c.flops,
        1e3 * max(c.bytes / bw, c.flops / rate),
    )


def _sweep(
    dtype: torch.dtype,
    iters: int,
    bw: float,
    rate: float,
    d: int,
    K: int,
    V: int,
    which: str = "all",
) -> list[dict]:
    """Launch configurations of both kernels at the large shapes, graph-timed: the data the
    GPU defaults in the kernel files are chosen from."""
    from yan_kernels import decoder_argmax as dm
    from yan_kernels import routed_expert as rm

    out = []
    print(f"{'sweep':<26}{'shape':<26}{'config':<40}{'ms':>9}{'% floor':>9}")
    print("routed up / down: that projection's configuration swept, the other at its default;")
    print("config: (block_m, block_n|v, block_k, warps, stages, tma); % floor: of the whole op")
    B, Bd = rm.Blocks, dm.Blocks
    up = rm.GPU_LARGE  # the other projection's configuration while one is swept
    routed_up = [
        B(128, 256, 64, 8, 3, False),
        B(128, 256, 64, 8, 3, True),
        B(128, 256, 64, 8, 4, True),
        B(128, 128, 64, 4, 3, True),  # two programs per SM: one's epilogue under the other's MMA
        B(128, 128, 64, 8, 3, True),
        B(128, 128, 64, 4, 4, False),
    ]
    routed_down = [
        B(128, 256, 64, 8, 3, False),
        B(128, 256, 64, 8, 3, True),
        B(128, 128, 64, 4, 3, True),
        B(128, 128, 128, 8, 3, True),
        B(128, 256, 128, 8, 2, True),
        B(128, 64, 128, 4, 3, True),
    ]
    decoder = [
        Bd(128, 256, 64, 8, 3, False),
        Bd(128, 256, 64, 8, 3, True),
        Bd(128, 256, 64, 8, 4, True),
        Bd(128, 256, 128, 8, 2, True),
        Bd(128, 128, 64, 4, 3, True),  # two programs per SM
        Bd(128, 128, 64, 8, 3, True),
        Bd(256, 128, 64, 8, 3, True),
        Bd(64, 256, 64, 4, 3, True),
    ]
    routed_fn = rm.routed_expert_euler

    def up_only(*args, blocks):
        return routed_fn(*args, blocks=blocks, down_blocks=rm.GPU_LARGE_DOWN)

    def down_only(*args, blocks):
        return routed_fn(*args, blocks=up._replace(block_m=blocks.block_m), down_blocks=blocks)

    routed_cases = list(_routed_cases(dtype, "cuda", [65536], d, K))
    plans = []
    if which in ("all", "routed", "up"):
        plans += [(c, up_only, routed_up, "up") for c in routed_cases]
    if which in ("all", "routed", "down"):
        plans += [(c, down_only, routed_down, "down") for c in routed_cases]
    if which in ("all", "decoder"):
        plans += [
            (c, dm.decoder_argmax, decoder, "")
            for c in _decoder_cases(dtype, "cuda", [8192, 65536], [], d, V)
        ]
    for c, fn, configs, part in plans:
        floor = 1e3 * max(c.bytes / bw, c.flops / rate)
        op = f"{c.op} {part}".strip()
        for cfg in configs:
            try:
                ms = graph_ms(
                    lambda c=c, cfg=cfg, fn=fn: fn(*c.args, blocks=cfg), max(3, iters // 4)
                )
            except Exception as exc:  # a configuration that does not fit (shared memory)
                print(f"{op:<26}{c.shape:<26}{tuple(cfg)!s:<40}  failed: {_one_line(exc, 60)}")
                continue
            print(
                f"{op:<26}{c.shape:<26}{tuple(cfg)!s:<40}{ms:9.3f}{100 * floor / ms:8.0f}%",
                flush=True,
            )
            out.append(
                {"op": op, "shape": c.shape, "config": list(cfg), "ms": ms, "floor_ms": floor}
            )
        torch.cuda.empty_cache()
    return out


def _bench_routed(
    dtype: torch.dtype, iters: int, bw: float, rate: float, ns: list[int], d: int, K: int
) -> Iterator[Row]:
    from yan_kernels.routed_expert import routed_expert_euler, routed_expert_euler_ref

    for c in _routed_cases(dtype, "cuda", ns, d, K):
        yield _gpu_row(c, routed_expert_euler_ref, routed_expert_euler, iters, bw, rate)


def _bench_decoder(
    dtype: torch.dtype,
    iters: int,
    bw: float,
    rate: float,
    ns: list[int],
    sample_ns: list[int],
    d: int,
    V: int,
) -> Iterator[Row]:
    from yan_kernels.decoder_argmax import decoder_argmax, decoder_argmax_ref

    for c in _decoder_cases(dtype, "cuda", ns, sample_ns, d, V):
        yield _gpu_row(c, decoder_argmax_ref, decoder_argmax, iters, bw, rate)
        torch.cuda.empty_cache()


def _cpu_rows(
    cases: Iterator[_Case], ref: Callable, iters: int, bw: float, rate: float, compile_: bool
) -> Iterator[CpuRow]:
    """The reference eager and under torch.compile (one compiled function for all shapes).
    `fullgraph=True`: a reference that graph-breaks would otherwise run eagerly again under the
    compiled label (dynamo skips a frame whose loop breaks); here it reports why instead."""
    compiled: Callable | None = None
    failure = None if compile_ else NO_COMPILE  # once failed, later shapes report the same
    if compile_:
        try:
            compiled = torch.compile(ref, fullgraph=True)
        except Exception as exc:
            failure = "compile failed: " + _one_line(exc)
    for c in cases:
        eager = cpu_time_ms(lambda c=c: ref(*c.args), iters)
        ms = first = None
        status = failure
        if failure is None and compiled is not None:
            ms, first, status = _time_compiled(lambda c=c: compiled(*c.args), iters)
            if ms is None:
                failure = status
        assert status is not None
        floor = 1e3 * max(c.bytes / bw, c.flops / rate)
        yield CpuRow(c.op, c.shape, eager, ms, first, status, c.bytes, c.flops, floor)


def _missing_gpu_stack(command: str) -> int | None:
    """Exit code 2 with one readable line when CUDA or triton is missing, else None."""
    if not torch.cuda.is_available():
        print(f"yan-serve bench {command}: needs a CUDA device (none found)", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"yan-serve bench {command}: needs the triton package", file=sys.stderr)
        return 2
    return None


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


def _run_header(device: str = "cuda") -> dict[str, str | int | None]:
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


def _fmt(v: float | None, spec: str) -> str:
    return "oom" if v is None else format(v, spec)


def _write_json(path: str | None, runs: list[dict]) -> None:
    """One run: {"header", "rows"}; several (one per preset): a list of those."""
    if path:
        Path(path).write_text(json.dumps(runs[0] if len(runs) == 1 else runs, indent=2) + "\n")


def _kernels_header(device: str, dtype: str, bw: float, rate: float) -> dict:
    """The `kernels` table's header (printed, and returned for --json): the run header plus the
    measured copy bandwidth and matmul rate (3 decimals on a CPU, whose rate is << 1 TFLOP/s)."""
    header = {
        **_run_header(device),
        "python": platform.python_version(),
        "dtype": dtype,
        "copy_GBps": round(bw / 1e9, 1),
        "matmul_TFLOPs": round(rate / 1e12, 1 if device == "cuda" else 3),
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    return header


def run_kernels(args: argparse.Namespace) -> int:
    if str(resolve_device(args.device)) == "cpu":
        return _run_kernels_cpu(args)
    if (missing := _missing_gpu_stack("kernels")) is not None:
        return missing
    dtype = _DTYPES[args.dtype or "bf16"]
    iters = args.iters or 20
    torch.manual_seed(0)
    bw = copy_bandwidth(iters)
    rate = matmul_rate(dtype, iters)
    header = _kernels_header("cuda", args.dtype or "bf16", bw, rate)
    small = args.quick
    rows: list[Row] = []
    print(
        f"{'op':<22}{'shape':<26}{'eager ms':>10}{'triton ms':>11}{'speedup':>9}"
        f"{'GB/s':>9}{'TFLOP/s':>9}{'floor ms':>10}{'% floor':>9}"
    )
    routed_ns = args.routed_n or ([1024, 8192] if small else [1024, 8192, 65536])
    decoder_ns = args.decoder_n or ([64, 1024] if small else [64, 1024, 8192, 65536])
    sample_ns = args.sample_n or decoder_ns
    d, K, V = args.d_model, args.experts, args.vocab
    gens = [
        _bench_routed(dtype, iters, bw, rate, routed_ns, d, K),
        _bench_decoder(dtype, iters, bw, rate, decoder_ns, sample_ns, d, V),
    ]
    for gen in gens:
        for r in _surviving(gen):
            rows.append(r)
            speed = None if r.eager_ms is None else r.eager_ms / r.triton_ms
            print(
                f"{r.op:<22}{r.shape:<26}{_fmt(r.eager_ms, '10.3f')}{r.triton_ms:11.3f}"
                f"{_fmt(speed, '8.2f')}x{r.gbps:9.0f}{r.tflops:9.1f}{r.floor_ms:10.3f}"
                f"{100 * r.floor_ms / r.triton_ms:8.0f}%",
                flush=True,
            )
    print(
        "eager: the torch reference, launches included. triton: the kernel's launches replayed\n"
        "from a CUDA graph (device time). floor: max(bytes / copy bandwidth, FLOPs / GEMM rate)."
    )
    sweep = _sweep(dtype, iters, bw, rate, d, K, V, args.sweep) if args.sweep else []
    _write_json(args.json, [{"header": header, "rows": [asdict(r) for r in rows], "sweep": sweep}])
    return 0


def _surviving(rows: Iterator[Row]) -> Iterator[Row]:
    """The rows a generator yields until one raises: the error is printed, the rest skipped."""
    try:
        yield from rows
    except Exception as exc:
        traceback.print_exc()
        print(f"failed: {_one_line(exc)}", flush=True)


def _compiled_cells(
    ms: float | None, first: float | None, eager: float, status: str, spec: str = "13.3f"
) -> str:
    """The compiled ms, speedup and 1st call s cells; where the compiled path did not run, a
    word (the reason is printed under the table)."""
    if ms is None or first is None:
        word = "skipped" if status == NO_COMPILE else "failed"
        return f"{word:>13}{'-':>9}{'-':>12}"
    return f"{ms:{spec}}{eager / ms:8.2f}x{first:12.2f}"


CPU_KERNEL_COLUMNS = (
    f"{'op':<22}{'shape':<26}{'eager ms':>10}{'compiled ms':>13}{'speedup':>9}"
    f"{'1st call s':>12}{'triton':>19}{'GB/s':>9}{'TFLOP/s':>9}{'floor ms':>10}{'% floor':>9}"
)


def _run_kernels_cpu(args: argparse.Namespace) -> int:
    """`kernels` on the CPU: reference eager vs reference under torch.compile."""
    from yan_kernels.decoder_argmax import decoder_argmax_ref
    from yan_kernels.routed_expert import routed_expert_euler_ref

    dtype = _DTYPES[args.dtype or "fp32"]
    iters = args.iters or 3
    torch.manual_seed(0)
    bw = copy_bandwidth(iters, "cpu")
    rate = matmul_rate(dtype, iters, "cpu")
    header = _kernels_header("cpu", args.dtype or "fp32", bw, rate)
    routed_ns = args.routed_n or ([256, 1024] if args.quick else [256, 1024, 4096])
    decoder_ns = args.decoder_n or ([64] if args.quick else [64, 256])
    # The eager reference draws its Gumbel noise with a Philox in int64 torch ops over [N, V]
    # (~9 s a call at N = 64 on one core), so by default only the smallest N samples.
    sample_ns = args.sample_n or [min(decoder_ns)]
    print(CPU_KERNEL_COLUMNS)
    rows: list[CpuRow] = []
    gens = [
        _cpu_rows(
            _routed_cases(dtype, "cpu", routed_ns, args.d_model, args.experts),
            routed_expert_euler_ref, iters, bw, rate, not args.no_compile,
        ),
        _cpu_rows(
            _decoder_cases(dtype, "cpu", decoder_ns, sample_ns, args.d_model, args.vocab),
            decoder_argmax_ref, iters, bw, rate, not args.no_compile,
        ),
    ]  # fmt: skip
    for gen in gens:
        for r in _surviving(gen):
            rows.append(r)
            cells = _compiled_cells(r.compiled_ms, r.first_call_s, r.eager_ms, r.compiled)
            print(
                f"{r.op:<22}{r.shape:<26}{r.eager_ms:10.3f}{cells}"
                f"{TRITON_ON_CPU:>19}{r.gbps:9.1f}{r.tflops:9.3f}{r.floor_ms:10.3f}"
                f"{100 * r.floor_ms / r.fast_ms:8.0f}%"
            )
    failed: dict[str, list[str]] = {}  # reason -> the ops it stopped, each named once
    for r in rows:
        if r.compiled.startswith("compile failed") and r.op not in failed.get(r.compiled, []):
            failed.setdefault(r.compiled, []).append(r.op)
    for status, ops in failed.items():
        print(f"{', '.join(ops)}: {status}")
    print(
        "compiled: the same *_ref under torch.compile(fullgraph=True) (inductor); 1st call s: its\n"
        "first call at the shape (compilation, shorter when inductor's cache has it). GB/s,\n"
        "TFLOP/s, % floor: the compiled time where it ran, else eager. triton: the CPU runs\n"
        "Triton kernels only in its interpreter, not timed. Medians of up to"
        f" {iters} calls (fewer past {CPU_BUDGET_S} s)."
    )
    _write_json(args.json, [{"header": header, "rows": [asdict(r) for r in rows]}])
    return 0


def _add_kernels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kernels", help="fused ops: Triton vs torch eager (CUDA) or compiled vs eager (CPU)"
    )
    _add_device(p)
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--iters", type=int, help="timed repetitions, median reported (default: 20 CUDA, 3 CPU)"
    )
    p.add_argument("--quick", action="store_true", help="skip the largest shapes")
    p.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        choices=("all", "routed", "up", "down", "decoder"),
        help="CUDA: also time launch configurations (all, or one kernel / projection)",
    )
    p.add_argument("--d-model", type=int, default=512, help="hidden size d")
    p.add_argument("--experts", type=int, default=6, help="routed experts K")
    p.add_argument("--vocab", type=int, default=128258, help="decoder vocabulary V")
    p.add_argument(
        "--routed-n",
        type=_int_list,
        help="routed-expert tokens (CUDA 1024,8192,65536; CPU 256,1024,4096)",
    )
    p.add_argument(
        "--decoder-n", type=_int_list, help="decoder rows (CUDA 64,1024,8192,65536; CPU 64,256)"
    )
    p.add_argument(
        "--sample-n",
        type=_int_list,
        help="decoder rows with sampling (CUDA: the --decoder-n; CPU: the smallest of them)",
    )
    p.add_argument("--no-compile", action="store_true", help="CPU: skip the torch.compile path")
    p.add_argument("--json", metavar="PATH", help="also write header and rows as JSON")
    p.set_defaults(func=run_kernels)


# ------------------------------------------------------------------------------ sampler
@dataclass
class SamplerRow:
    batch: int
    length: int  # source length = target length
    eager_ms: float | None  # the model's modules, reference ops (None: out of memory)
    fused_ms: float | None  # the fused engine (Triton kernels), eager launches
    graph_ms: float | None  # the whole sample replayed from a CUDA graph
    floor_ms: float  # max(FLOPs / measured GEMM rate, weight bytes / measured bandwidth)
    launches: int | None  # kernels per sample of the fused engine (torch.profiler)
    capture_s: float | None  # warm-up + capture of that one graph
    graph_mib: float | None  # the capture's graph pool: growth of reserved device memory
    same_tokens: float | None  # fraction of tokens where graph == fused


def sample_cost(cfg: YANConfig, batch: int, length: int, steps: int) -> tuple[float, float]:
    """(FLOPs, weights read) of one greedy sample with source = target = `length`: the encoder
    once, T - 1 trunk passes with the routed expert, the cross-attention keys/values once, the
    decoder and lm_head once. Attention counts QK^T and AV (4 L d per query). The second figure
    counts parameters each pass must read once (times the element size: the bytes floor)."""
    d, dff, V, K = cfg.d_model, cfg.d_ffn, cfg.vocab_size, cfg.moe_n_experts
    n_cross = len(cfg.cross_att_idx)
    tok = batch * length
    enc = cfg.encoder_n_trf_blocks * (8 * d * d + 4 * d * dff + 4 * length * d)
    trunk = cfg.n_trf_blocks * (8 * d * d + 4 * d * dff + 4 * length * d)
    trunk += n_cross * (4 * d * d + 4 * length * d) + 4 * d * dff  # cross q/out, routed expert
    dec = cfg.decoder_n_resi_blocks * 4 * d * dff + 2 * d * V
    flops = tok * (enc + (steps - 1) * trunk + dec + n_cross * 4 * d * d + 6 * d * cfg.gate_dim)
    enc_w = cfg.encoder_n_trf_blocks * (4 * d * d + 2 * d * dff)
    trunk_w = cfg.n_trf_blocks * (4 * d * d + 2 * d * dff) + n_cross * 4 * d * d
    expert_w = K * 2 * d * dff
    dec_w = d * V + cfg.decoder_n_resi_blocks * 2 * d * dff
    params = enc_w + (steps - 1) * (trunk_w + expert_w) + dec_w
    return float(flops), float(params)


def _bench_sampler_shape(
    model: YAN,
    batch: int,
    length: int,
    steps: int,
    iters: int,
    rate: float,
    bw: float,
    attention: str = "auto",
    profile: int = 0,
) -> SamplerRow:
    from yan_kernels import ops

    from yan_serve.engine.graphs import GraphSampler, Ladder
    from yan_serve.engine.launches import kernel_counts, kernel_times
    from yan_serve.engine.sampler import Sampler

    reqs = _requests(model.config, batch, length)
    modules = Sampler(model, fused=False)
    fused = Sampler(model, fused=True)
    fused.engine.attention = attention
    graphs = GraphSampler(fused)

    with ops.force("ref"):
        eager = _or_oom(lambda: _wall_ms(lambda: modules.generate(reqs, steps, "argmax"), iters))
    with ops.force("triton"):
        fused_ms = _or_oom(lambda: _wall_ms(lambda: fused.generate(reqs, steps, "argmax"), iters))
        fused_out = _or_oom(lambda: fused.generate(reqs, steps, "argmax"))
        launches = None
        if fused_out is not None:  # one profiled sample: its launches (and breakdown)
            times = kernel_times(lambda: fused.generate(reqs, steps, "argmax"))
            launches = sum(kernel_counts(times).values())
            if profile:
                _print_profile(times, profile, f"{batch}x{length}")
        ladder = Ladder(
            batch_sizes=(batch,), tgt_lengths=(length,), max_tokens=None, steps=steps,
            routings=("argmax",),
        )  # fmt: skip
        rep = _or_oom(lambda: graphs.capture(ladder))
        graph = same = None
        if rep is not None and rep.graphs == 1:
            graph = _wall_ms(lambda: graphs.generate(reqs, steps, "argmax"), iters)
            if fused_out is not None:
                same = _same_tokens(graphs.generate(reqs, steps, "argmax"), fused_out)
    flops, params = sample_cost(model.config, batch, length, steps)
    elt = next(model.parameters()).element_size()
    floor = max(flops / rate, params * elt / bw) * 1e3  # rate in FLOP/s, bw in bytes/s
    return SamplerRow(
        batch, length, eager, fused_ms, graph, floor, launches,
        None if rep is None else rep.seconds,
        # the pool, not free-memory deltas: those also count what the caching allocator
        # released meanwhile (they read negative)
        None if rep is None else rep.pool_bytes / 2**20,
        same,
    )  # fmt: skip


def _print_profile(times: dict[str, tuple[int, float]], top: int, label: str) -> None:
    """One sample's kernels by device time: the busiest `top` names, then the rest."""
    total = sum(us for _, us in times.values())
    n = sum(c for c, _ in times.values())
    print(f"  profile {label}: {total / 1e3:.3f} ms of device time in {n} kernels", flush=True)
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
    for name, (count, us) in ranked[:top]:
        print(f"  {us / 1e3:9.3f} ms {100 * us / total:5.1f}% {count:5d}x  {name[:90]}")
    rest = ranked[top:]
    if rest:
        us = sum(v[1] for _, v in rest)
        cnt = sum(v[0] for _, v in rest)
        print(f"  {us / 1e3:9.3f} ms {100 * us / total:5.1f}% {cnt:5d}x  ({len(rest)} others)")


@dataclass
class CpuSamplerRow:
    batch: int
    length: int  # source length = target length
    eager_ms: float  # reference torch ops, eager
    compiled_ms: float | None  # blocks and decoder under torch.compile (None: see `compiled`)
    first_call_s: float | None  # the compiled model's first call at this shape (compilation)
    compiled: str  # "ok", NO_COMPILE or "compile failed: <one line>"
    same_tokens: float | None  # fraction of tokens where compiled == eager
    ops_modules: int = 0  # kernel-launching ops per sample, the modules (the launch proxy)
    ops_fused: int = 0  # the same for the fused engine (each fused kernel counted as on a GPU)


def _wall_ms(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median wall time of a host-synchronizing call (generate returns Python lists), in ms:
    end to end, so host-side launch overhead counts, which is what graphs remove."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _or_oom(fn: Callable[[], object]) -> object | None:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _requests(cfg: YANConfig, batch: int, length: int) -> list[GenerationRequest]:
    """`batch` random requests with source length = target length = `length`."""
    from yan_serve.engine.sampler import GenerationRequest

    g = torch.Generator().manual_seed(batch * 100003 + length)
    return [
        GenerationRequest(
            torch.randint(4, cfg.vocab_size, (length,), generator=g).tolist(), length, seed=i
        )
        for i in range(batch)
    ]


def _same_tokens(a: list[Generation], b: list[Generation]) -> float:
    """Fraction of positions (every row's full target) where two generations agree."""
    pairs = [
        (x, y) for ga, gb in zip(a, b, strict=True) for x, y in zip(ga.full, gb.full, strict=True)
    ]
    return sum(x == y for x, y in pairs) / len(pairs)


def _compiled_copy(model: YAN) -> YAN:
    """A copy of `model` whose encoder and trunk blocks and decoder run under torch.compile
    (dynamic shapes: one compilation serves most shapes). Mamba mixers stay eager: their scan
    steps position by position in Python, which compilation would unroll (minutes per length).
    The routed experts and the gate stay eager too (token grouping by `nonzero`)."""
    from yan_serve.model.mamba import Mamba

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, Mamba):
            m.forward = torch.compiler.disable(m.forward)
    for blk in [*twin.encoder.trf_blocks, *twin.flow.trf_blocks]:
        blk.compile(dynamic=True)
    twin.decoder.compile(dynamic=True)
    return twin


def _bench_sampler_shape_cpu(
    model: YAN,
    twin: YAN | None,
    batch: int,
    length: int,
    steps: int,
    iters: int,
    failure: str | None,
) -> CpuSamplerRow:
    """Eager reference vs the compiled twin (None: no compiled run; `failure` says why)."""
    from yan_kernels import ops

    from yan_serve.engine.sampler import Sampler

    reqs = _requests(model.config, batch, length)
    out: dict[str, list[Generation]] = {}

    def run(name: str, m: YAN) -> Callable[[], None]:
        sampler = Sampler(m)

        def call() -> None:
            out[name] = sampler.generate(reqs, steps, "argmax")

        return call

    with ops.force("ref"):  # never the Triton interpreter, whatever TRITON_INTERPRET says
        eager = cpu_time_ms(run("eager", model), iters)
        ms = first = same = None
        status = failure
        if twin is not None and failure is None:
            ms, first, status = _time_compiled(run("compiled", twin), iters)
            if ms is not None:
                same = _same_tokens(out["compiled"], out["eager"])
    assert status is not None
    return CpuSamplerRow(
        batch, length, eager, ms, first, status, same, *_dispatch_counts(model, reqs, steps)
    )


def _dispatch_counts(model: YAN, reqs: list[GenerationRequest], steps: int) -> tuple[int, int]:
    """Launch proxy per sample: (the modules, the fused engine), reference ops on the CPU."""
    from yan_kernels import ops

    from yan_serve.engine.launches import count_dispatched
    from yan_serve.engine.sampler import Sampler

    out = []
    with ops.force("ref"):
        for fused in (False, True):
            s = Sampler(model, fused=fused)
            s.generate(reqs[:1], steps, "argmax")  # the engine's constants are built once
            out.append(
                sum(count_dispatched(lambda s=s: s.generate(reqs, steps, "argmax")).values())
            )
    return out[0], out[1]


def _bench_model(name: str, lengths: list[int], device: str, dtype: torch.dtype) -> tuple[YAN, str]:
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


def _sampler_gpu(name: str, args: argparse.Namespace) -> dict:
    dtype_name = args.dtype or "bf16"
    batches = args.batches or [1, 8, 64]
    lengths = args.lengths or [128, 512, 1024]
    iters = args.iters or 10
    model, label = _bench_model(name, lengths, "cuda", _DTYPES[dtype_name])
    cfg = model.config
    steps = args.steps or cfg.ode_steps
    bw = copy_bandwidth(10)
    rate = matmul_rate(_DTYPES[dtype_name], 10)
    header = {
        **_run_header(),
        "model": label,
        "dtype": dtype_name,
        "steps": steps,
        "routing": "argmax",
        "decode": "greedy",
        "attention": args.attention,
        "copy_GBps": round(bw / 1e9, 1),
        "matmul_TFLOPs": round(rate / 1e12, 1),
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(
        f"{'batch':>6}{'length':>8}{'eager ms':>10}{'fused ms':>10}{'graph ms':>10}"
        f"{'floor ms':>10}{'% floor':>9}{'launches':>10}{'graph/eager':>12}{'capture s':>11}"
        f"{'graph MiB':>11}{'same tok':>10}"
    )
    rows = []
    for length in lengths:
        for batch in batches:
            try:
                r = _bench_sampler_shape(model, batch, length, steps, iters, rate, bw,
                                         args.attention, args.profile)  # fmt: skip
            except Exception as exc:  # one broken shape must not hide the others' figures
                traceback.print_exc()
                print(f"{batch:>6}{length:>8}  failed: {_one_line(exc)}", flush=True)
                continue
            finally:
                torch.cuda.empty_cache()  # the shape's graph and buffers go with its sampler
            rows.append(r)
            vs_e = None if r.eager_ms is None or r.graph_ms is None else r.eager_ms / r.graph_ms
            pct = None if r.graph_ms is None else 100 * r.floor_ms / r.graph_ms
            print(
                f"{r.batch:>6}{r.length:>8}{_fmt(r.eager_ms, '10.2f')}{_fmt(r.fused_ms, '10.2f')}"
                f"{_fmt(r.graph_ms, '10.2f')}{r.floor_ms:10.3f}{_fmt(pct, '8.1f')}%"
                f"{_fmt(r.launches, '10d')}{_fmt(vs_e, '11.2f')}x"
                f"{_fmt(r.capture_s, '11.2f')}{_fmt(r.graph_mib, '11.0f')}"
                f"{_fmt(None if r.same_tokens is None else 100 * r.same_tokens, '9.2f')}%",
                flush=True,
            )
    print(
        "eager: Sampler.generate on the model's modules (reference ops). fused: the fused engine\n"
        "(packed weights, Triton kernels), eager launches. graph: the same replayed from a CUDA\n"
        "graph; every time is the wall time of a whole generate call (host work included).\n"
        "floor: max(FLOPs / matmul rate, weight bytes / copy bandwidth), both measured here.\n"
        "launches: GPU kernels per sample of the fused engine (torch.profiler). graph MiB: the\n"
        "capture's memory pool (growth of reserved device memory)."
    )
    return {"header": header, "rows": [asdict(r) for r in rows]}


CPU_SAMPLER_COLUMNS = (
    f"{'batch':>6}{'length':>8}{'eager ms':>10}{'compiled ms':>13}{'speedup':>9}"
    f"{'1st call s':>12}{'same tok':>10}{'fused':>19}{'graph':>12}{'ops mod':>9}{'ops fused':>10}"
)


def _sampler_cpu(name: str, args: argparse.Namespace) -> dict:
    dtype_name = args.dtype or "fp32"
    batches = args.batches or [1, 8]
    lengths = args.lengths or [128, 512]
    iters = args.iters or 3
    model, label = _bench_model(name, lengths, "cpu", _DTYPES[dtype_name])
    steps = args.steps or model.config.ode_steps
    twin, failure = None, NO_COMPILE if args.no_compile else None
    if not args.no_compile:
        torch.compiler.reset()  # a fresh compile cache per preset (blocks share code objects)
        try:
            twin = _compiled_copy(model)
        except Exception as exc:
            failure = "compile failed: " + _one_line(exc)
    header = {
        **_run_header("cpu"),
        "model": label,
        "dtype": dtype_name,
        "steps": steps,
        "routing": "argmax",
        "decode": "greedy",
        "attention": args.attention,
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(CPU_SAMPLER_COLUMNS)
    rows = []
    for length in lengths:
        for batch in batches:
            r = _bench_sampler_shape_cpu(model, twin, batch, length, steps, iters, failure)
            if r.compiled_ms is None and r.compiled != NO_COMPILE:
                failure = r.compiled  # one failure is enough: later shapes report it
            rows.append(r)
            cells = _compiled_cells(r.compiled_ms, r.first_call_s, r.eager_ms, r.compiled, "13.2f")
            same = "-" if r.same_tokens is None else f"{100 * r.same_tokens:.2f}%"
            print(
                f"{r.batch:>6}{r.length:>8}{r.eager_ms:10.2f}{cells}"
                f"{same:>10}{TRITON_ON_CPU:>19}{GRAPH_ON_CPU:>12}{r.ops_modules:9d}"
                f"{r.ops_fused:10d}"
            )
    if failure is not None and failure != NO_COMPILE:
        print(failure)
    print(
        "eager: Sampler.generate with the reference ops (the CPU serving path). compiled: the\n"
        "same with encoder/trunk blocks and decoder under torch.compile(dynamic=True); routed\n"
        "experts, gate and Mamba mixers stay eager. 1st call s: its first call at the shape\n"
        "(compilation). same tok: compiled == eager. fused / graph: Triton runs on a CPU only in\n"
        f"its interpreter, and CUDA graphs need CUDA. Medians of up to {iters} calls (fewer past"
        f" {CPU_BUDGET_S} s).\nops mod / ops fused: operators per sample that would launch a GPU"
        " kernel (the CPU proxy\nfor launches), the modules vs the fused engine, whose fused"
        " calls count as their Triton launches."
    )
    return {"header": header, "rows": [asdict(r) for r in rows]}


def run_sampler(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    if device == "cuda" and (missing := _missing_gpu_stack("sampler")) is not None:
        return missing
    presets = args.presets or (["yan-paper"] if device == "cuda" else ["yan-tiny"])
    run = _sampler_gpu if device == "cuda" else _sampler_cpu
    runs = []
    for i, name in enumerate(presets):
        if i:
            print()
        runs.append(run(name, args))
    _write_json(args.json, runs)
    return 0


# --------------------------------------------------------------------------------- scan
SCAN_DTYPES = {**_DTYPES, "fp16": torch.float16}
SCAN_CHUNK = 64  # selective_scan_chunked's default chunk, the one the model runs
SCAN_TORCH_PATHS = ("ref", "chunked-loop", "chunked-doubling")  # differentiable: fwd and fwd+bwd
SCAN_FUSED_PATHS = ("triton", "mamba_ssm")  # yan_kernels.ops.selective_scan's fused paths: fwd
SCAN_MODES = ("fwd", "fwd+bwd")
NOT_INSTALLED = "n/a (not installed)"
NEEDS_CUDA = "n/a (needs CUDA)"
SCAN_COLUMNS = (
    f"{'path':<18}{'mode':<9}{'shape':<16}{'ms':>10}{'speedup':>9}{'GB/s':>9}{'% copy':>8}"
    f"{'max err':>10}"
)

Shape = tuple[int, int, int, int]  # Bt, L, Di, N


@dataclass
class ScanRow:
    path: str  # "ref", "chunked-loop", "chunked-doubling", "triton" or "mamba_ssm"
    mode: str  # "fwd" (under no_grad) or "fwd+bwd" (y, then the grads of (y * w).sum())
    shape: str  # BtxLxDixN
    ms: float | None  # median; None: not timed (`status` says why)
    status: str  # "ok", "oom", TRITON_ON_CPU, NOT_INSTALLED or NEEDS_CUDA
    speedup: float | None  # the ref row's ms / ms, same shape and mode
    bytes: int  # minimal traffic in the input dtype (see `_scan_bytes`)
    gbps: float | None
    copy_pct: float | None  # gbps as a share of the measured copy bandwidth, in %
    max_err: float | None  # max |out - oracle| in fp32: y, and for fwd+bwd also the grads


def _scan_bytes(shape: Shape, elt: int, mode: str, gate: bool) -> int:
    """Minimal traffic: fwd reads u, delta, B, C (and z when the gate is fused) and writes y;
    fwd+bwd then reads u, delta, B, C and dy again and writes their four grads. A [Di, N] and
    D [Di] are left out (negligible)."""
    bt, length, di, n = shape
    act = 2 * bt * length * di + 2 * bt * length * n  # u, delta, B, C
    y = bt * length * di
    if mode == "fwd":
        return elt * (act + y + (y if gate else 0))
    return elt * (3 * act + 2 * y)


def _scan_inputs(shape: Shape, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Mamba-like inputs: delta = softplus(x - 2) (about 0.1, as after dt_proj's bias), A the
    S4D-real init -[1..N] per channel and D = 1 (both fp32, as the model keeps them), u, B, C,
    the gate z and the loss weights w standard normal, all activations in `dtype`."""
    bt, length, di, n = shape
    torch.manual_seed(0)

    def act(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device).to(dtype)

    u, B, C = act(bt, length, di), act(bt, length, n), act(bt, length, n)
    delta = torch.nn.functional.softplus(torch.randn(bt, length, di, device=device) - 2).to(dtype)
    A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(di, 1)
    D = torch.ones(di, device=device)
    return {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D,
            "z": act(bt, length, di), "w": act(bt, length, di)}  # fmt: skip


def _scan_fn(path: str) -> Callable:
    """(u, delta, A, B, C, D[, z]) -> y for one path; the fused ones import on first use."""
    from yan_kernels.chunked_scan import selective_scan_chunked, selective_scan_sequential

    if path == "ref":
        return selective_scan_sequential
    if path in ("chunked-loop", "chunked-doubling"):
        inner = path.split("-")[1]
        return lambda *a: selective_scan_chunked(*a, chunk=SCAN_CHUNK, inner=inner)
    from yan_kernels import selective_scan as kernels

    return kernels.selective_scan if path == "triton" else kernels.selective_scan_mamba_ssm


def _scan_call(path: str, mode: str, x: dict[str, torch.Tensor]) -> Callable[[], tuple]:
    """The timed call, which also returns what the check compares: (y,) for fwd, (y, grad u,
    grad delta, grad A, grad B, grad C) for fwd+bwd. Fused paths take and apply the gate z."""
    fn = _scan_fn(path)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    if path in SCAN_FUSED_PATHS:
        args = (*args, x["z"])
    if mode == "fwd":

        def fwd() -> tuple:
            with torch.no_grad():
                return (fn(*args),)

        return fwd
    leaves = [t.detach().requires_grad_() for t in args[:5]]

    def fwd_bwd() -> tuple:
        y = fn(*leaves, *args[5:])
        grads = torch.autograd.grad((y * x["w"]).sum(), leaves)
        return (y.detach(), *grads)

    return fwd_bwd


def _fused_unavailable(path: str, device: str) -> str | None:
    """Why a fused path cannot be timed here, or None when it can."""
    if path == "triton":
        return None if device == "cuda" else TRITON_ON_CPU
    from yan_kernels import ops

    if not ops.mamba_ssm_available():
        return NOT_INSTALLED
    return None if device == "cuda" else NEEDS_CUDA


def _scan_oracle(x: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """`selective_scan_sequential` in fp32 on the same input values: y per mode, fused-gated y."""
    x32 = {k: v.float() for k, v in x.items()}
    oracle = {mode: _scan_call("ref", mode, x32)() for mode in SCAN_MODES}
    gated = (oracle["fwd"][0] * torch.nn.functional.silu(x32["z"]),)
    return {**oracle, "gated": gated}


def _max_err(out: tuple, want: tuple) -> float:
    return max((a.float() - b).abs().max().item() for a, b in zip(out, want, strict=True))


def _scan_cell(
    path: str, mode: str, x: dict, oracle: dict, iters: int, device: str
) -> tuple[float | None, str, float | None]:
    """(median ms, status, max err) of one path and mode; on CUDA an OOM gives (None, "oom")."""
    try:
        call = _scan_call(path, mode, x)
        want = oracle["gated" if path in SCAN_FUSED_PATHS else mode]
        err = _max_err(call(), want)
        return _timer(device)(call, iters), "ok", err
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "oom", None


def _scan_rows(
    shapes: list[Shape], dtype: torch.dtype, device: str, iters: int, bw: float
) -> Iterator[ScanRow]:
    """Per shape, per path, per mode; the fused paths forward only (they have no backward)."""
    elt = torch.finfo(dtype).bits // 8
    for shape in shapes:
        label = "x".join(map(str, shape))
        x = _scan_inputs(shape, dtype, device)
        oracle = _scan_oracle(x)
        ref_ms: dict[str, float | None] = {}
        for path in (*SCAN_TORCH_PATHS, *SCAN_FUSED_PATHS):
            fused = path in SCAN_FUSED_PATHS
            for mode in SCAN_MODES[:1] if fused else SCAN_MODES:
                nbytes = _scan_bytes(shape, elt, mode, gate=fused)
                reason = _fused_unavailable(path, device) if fused else None
                if reason is not None:
                    yield ScanRow(path, mode, label, None, reason, None, nbytes, None, None, None)
                    continue
                ms, status, err = _scan_cell(path, mode, x, oracle, iters, device)
                if path == "ref":
                    ref_ms[mode] = ms
                base = ref_ms.get(mode)
                speed = None if ms is None or base is None else base / ms
                gbps = None if ms is None else nbytes / ms / 1e6
                pct = None if gbps is None else 100 * gbps * 1e9 / bw
                yield ScanRow(path, mode, label, ms, status, speed, nbytes, gbps, pct, err)
        del x, oracle
        if device == "cuda":
            torch.cuda.empty_cache()


def _scan_line(r: ScanRow) -> str:
    start = f"{r.path:<18}{r.mode:<9}{r.shape:<16}"
    if r.status not in ("ok", "oom"):
        return f"{start}  {r.status}"
    speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"  # "-": this or the ref row oom
    gbps = "-" if r.gbps is None else f"{r.gbps:.2f}"
    pct = "-" if r.copy_pct is None else f"{r.copy_pct:.1f}%"
    err = "-" if r.max_err is None else f"{r.max_err:.1e}"
    return f"{start}{_fmt(r.ms, '10.3f')}{speed:>9}{gbps:>9}{pct:>8}{err:>10}"


def run_scan(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    if device == "cuda" and (missing := _missing_gpu_stack("scan")) is not None:
        return missing
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    iters = args.iters or (20 if device == "cuda" else 10)
    shapes = args.shapes or (
        [(8, 1024, 1024, 16), (64, 256, 1024, 16)]
        if device == "cuda"
        else [(16, 128, 256, 16), (1, 512, 256, 16)]
    )
    bw = copy_bandwidth(iters, device)
    header = {
        **_run_header(device),
        "python": platform.python_version(),
        "dtype": dtype_name,
        "chunk": SCAN_CHUNK,
        "copy_GBps": round(bw / 1e9, 1),
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(SCAN_COLUMNS)
    rows = []
    for r in _scan_rows(shapes, SCAN_DTYPES[dtype_name], device, iters, bw):
        rows.append(r)
        print(_scan_line(r), flush=True)
    timing = (
        f"medians of {iters} calls (CUDA events)"
        if device == "cuda"
        else f"wall-clock medians of up to {iters} calls (fewer past {CPU_BUDGET_S} s)"
    )
    print(
        "shape: Bt x L x Di x N. ref: selective_scan_sequential, the oracle. chunked-loop /\n"
        f"chunked-doubling: selective_scan_chunked(chunk={SCAN_CHUNK}, inner=loop|doubling)."
        " triton /\nmamba_ssm: the fused paths of yan_kernels.ops.selective_scan (D skip and"
        " silu(z) gate\nfused; forward only). fwd: under no_grad; fwd+bwd: y, then the grads of"
        " (y * w).sum()\nwrt u, delta, A, B, C. speedup: ref ms / ms at the same shape and"
        f" mode.\nms: {timing}.\nGB/s: minimal bytes in the input dtype / ms (fwd: read u,"
        " delta, B, C (+ z fused),\nwrite y; fwd+bwd: also read them and dy again, write their"
        " grads). % copy: share of\ncopy_GBps. max err: max |out - oracle| in fp32 over y"
        " (fwd+bwd: and the five grads);\noracle: selective_scan_sequential in fp32 on the same"
        " inputs (fused: times silu(z)).\ntriton and mamba_ssm need CUDA: a CPU runs Triton only in"
        " its interpreter (not timed)."
    )
    _write_json(args.json, [{"header": header, "rows": [asdict(r) for r in rows]}])
    return 0


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _preset_list(text: str) -> list[str]:
    from yan_serve.config import preset_names

    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated preset names, got {text!r}")
    for name in names:
        if name not in preset_names():
            known = ", ".join(preset_names())
            raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose from {known}")
    return names


def _shape_list(text: str) -> list[tuple[int, int, int, int]]:
    """`16x128x256x16,1x512x256x16` -> [(Bt, L, Di, N), ...], each a positive integer."""
    shapes = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        dims = item.lower().split("x")
        if len(dims) != 4 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated BtxLxDixN shapes of positive integers"
                f" (e.g. 16x128x256x16), got {item!r}"
            )
        shapes.append((int(dims[0]), int(dims[1]), int(dims[2]), int(dims[3])))
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected comma-separated BtxLxDixN shapes, got {text!r}")
    return shapes


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when present, else CPU",
    )


def _add_sampler(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sampler",
        help="whole-sample latency: eager vs fused vs CUDA graph (CUDA), eager vs compiled (CPU)",
    )
    _add_device(p)
    p.add_argument(
        "--preset",
        "--model",
        dest="presets",
        type=_preset_list,
        help="preset(s), random weights, comma-separated: one table each"
        " (default: yan-paper on CUDA, yan-tiny on CPU; e.g. yan-tiny,yan-mamba-tiny)",
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=0, help="Euler time points (0: the preset's)")
    p.add_argument("--batches", type=_int_list, help="e.g. 1,8,64 (default; CPU: 1,8)")
    p.add_argument(
        "--lengths",
        type=_int_list,
        help="source = target, e.g. 128,512,1024 (default; CPU: 128,512)",
    )
    p.add_argument(
        "--iters", type=int, help="timed repetitions, median reported (default: 10 CUDA, 3 CPU)"
    )
    p.add_argument("--no-compile", action="store_true", help="CPU: skip the torch.compile path")
    p.add_argument(
        "--attention",
        choices=("auto", "sdpa", "flash", "cudnn"),
        default="auto",
        help="CUDA: the fused engine's attention (default auto: SDPA, which picks cuDNN"
        " attention on an H100; see FusedEngine)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="K",
        help="CUDA: after each row, the K kernels with the most device time per sample",
    )
    p.add_argument("--json", metavar="PATH", help="also write header and rows as JSON")
    p.set_defaults(func=run_sampler)


def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="Mamba selective scan: oracle vs chunked (loop, doubling) vs fused, fwd and fwd+bwd",
    )
    _add_device(p)
    p.add_argument(
        "--dtype",
        choices=sorted(SCAN_DTYPES),
        help="activations u, delta, B, C, z (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--shapes",
        type=_shape_list,
        help="BtxLxDixN, comma-separated (default CUDA 8x1024x1024x16,64x256x1024x16;"
        " CPU 16x128x256x16,1x512x256x16)",
    )
    p.add_argument(
        "--iters", type=int, help="timed repetitions, median reported (default: 20 CUDA, 10 CPU)"
    )
    p.add_argument("--json", metavar="PATH", help="also write header and rows as JSON")
    p.set_defaults(func=run_scan)


def _add_versus(sub: argparse._SubParsersAction) -> None:
    from yan_serve.bench_versus import add_versus  # YAN vs the matched AR: its own module

    add_versus(sub)


COMMANDS = [_add_kernels, _add_sampler, _add_scan, _add_versus]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m yan_serve.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as e:
        print(f"yan-serve bench {args.command}: {e}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
