"""Benchmarks, apart from the tests: `python -m yan_serve.bench <command>`.

`kernels` times each fused Triton kernel (yan_kernels) against its torch eager reference at the
paper's shapes (d = 512, K = 6 experts, V = 128258) and prints, per shape: eager and Triton
time, the Triton kernel's achieved GB/s and TFLOP/s, and its roofline floor, i.e. the larger of
(minimal bytes / measured copy bandwidth) and (flops / measured dense matmul rate). The header
records device, date, commit and library versions. It needs a CUDA device: without one it
prints one line and exits with status 2.

`sampler` times one whole greedy sample (`generate`, host work included) of a preset with random
weights at batch x length shapes (source length = target length): eager torch ops, the fused
Triton kernels launched eagerly, and the graph-captured sampler (yan_serve.engine.graphs), with
the capture's time and memory and the share of tokens where the graph agrees with the fused run.
It needs a CUDA device as well.

New commands are a `_add_<name>(subparsers)` function registered in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def copy_bandwidth(iters: int) -> float:
    """Device-to-device copy rate in bytes/s (read + write) over a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(dtype: torch.dtype, iters: int) -> float:
    """Dense matmul rate in flop/s at 8192^3 (cuBLAS, default precision settings)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b, iters)
    return 2 * n**3 / (ms * 1e-3)


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
def _bench_routed(dtype: torch.dtype, iters: int, bw: float, rate: float, ns: list[int]):
    from yan_kernels.routed_expert import routed_expert_euler, routed_expert_euler_ref

    d, K = 512, 6
    H = 4 * d
    elt = torch.finfo(dtype).bits // 8
    w1 = torch.randn(K, d, H, device="cuda", dtype=dtype) / d**0.5
    b1 = torch.randn(K, H, device="cuda", dtype=dtype) * 0.1
    w2 = torch.randn(K, H, d, device="cuda", dtype=dtype) / H**0.5
    b2 = torch.randn(K, d, device="cuda", dtype=dtype) * 0.1
    for n in ns:
        h = torch.randn(n, d, device="cuda", dtype=dtype)
        z = torch.randn(n, d, device="cuda", dtype=dtype)
        e = torch.randint(0, K, (n,), device="cuda")
        args = (h, e, w1, b1, w2, b2, z, 0.5)
        nbytes = elt * (3 * n * d + K * (2 * d * H + H + d)) + 8 * n
        flops = 2 * 2 * n * d * H
        yield Row(
            "routed_expert_euler",
            f"N={n} d={d} K={K}",
            _eager_ms(lambda a=args: routed_expert_euler_ref(*a), iters),
            time_ms(lambda a=args: routed_expert_euler(*a), iters),
            nbytes,
            flops,
            1e3 * max(nbytes / bw, flops / rate),
        )


def _bench_decoder(dtype: torch.dtype, iters: int, bw: float, rate: float, ns: list[int]):
    from yan_kernels.decoder_argmax import decoder_argmax, decoder_argmax_ref

    d, V = 512, 128258
    elt = torch.finfo(dtype).bits // 8
    w = torch.randn(V, d, device="cuda", dtype=dtype) / d**0.5
    b = torch.randn(V, device="cuda", dtype=dtype) * 0.1
    for n in ns:
        x = torch.randn(n, d, device="cuda", dtype=dtype)
        seed = torch.arange(n, device="cuda", dtype=torch.int64)
        nbytes = elt * (n * d + V * d + V) + 12 * n
        flops = 2 * n * V * d
        for sample in (False, True):
            extra = (0.8, seed) if sample else ()
            yield Row(
                "decoder_argmax" + ("+sample" if sample else ""),
                f"N={n} d={d} V={V}",
                _eager_ms(lambda e=extra, x=x: decoder_argmax_ref(x, w, b, *e), iters),
                time_ms(lambda e=extra, x=x: decoder_argmax(x, w, b, *e), iters),
                nbytes,
                flops,
                1e3 * max(nbytes / bw, flops / rate),
            )
            torch.cuda.empty_cache()


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


def _run_header() -> dict[str, str | None]:
    """Device, date, commit and versions: the first fields of every benchmark's header line."""
    return {
        "device": torch.cuda.get_device_properties(0).name,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "cuda": torch.version.cuda,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "oom" if v is None else format(v, spec)


def run_kernels(args: argparse.Namespace) -> int:
    if (missing := _missing_gpu_stack("kernels")) is not None:
        return missing
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(0)
    bw = copy_bandwidth(args.iters)
    rate = matmul_rate(dtype, args.iters)
    header = {
        **_run_header(),
        "python": platform.python_version(),
        "dtype": args.dtype,
        "copy_GBps": round(bw / 1e9, 1),
        "matmul_TFLOPs": round(rate / 1e12, 1),
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    small = args.quick
    rows: list[Row] = []
    print(
        f"{'op':<22}{'shape':<26}{'eager ms':>10}{'triton ms':>11}{'speedup':>9}"
        f"{'GB/s':>9}{'TFLOP/s':>9}{'floor ms':>10}{'% floor':>9}"
    )
    gens = [
        _bench_routed(dtype, args.iters, bw, rate, [1024, 8192] if small else [1024, 8192, 65536]),
        _bench_decoder(
            dtype, args.iters, bw, rate, [64, 1024] if small else [64, 1024, 8192, 65536]
        ),
    ]
    for gen in gens:
        for r in gen:
            rows.append(r)
            speed = None if r.eager_ms is None else r.eager_ms / r.triton_ms
            print(
                f"{r.op:<22}{r.shape:<26}{_fmt(r.eager_ms, '10.3f')}{r.triton_ms:11.3f}"
                f"{_fmt(speed, '8.2f')}x{r.gbps:9.0f}{r.tflops:9.1f}{r.floor_ms:10.3f}"
                f"{100 * r.floor_ms / r.triton_ms:8.0f}%"
            )
    if args.json:
        out = {"header": header, "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _add_kernels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="fused Triton kernels vs torch eager, with rooflines")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (median reported)")
    p.add_argument("--quick", action="store_true", help="skip the largest shapes")
    p.add_argument("--json", metavar="PATH", help="also write header and rows as JSON")
    p.set_defaults(func=run_kernels)


# ------------------------------------------------------------------------------ sampler
@dataclass
class SamplerRow:
    batch: int
    length: int  # source length = target length
    eager_ms: float | None  # reference torch ops (None: out of memory)
    fused_ms: float | None  # Triton kernels, eager launches
    graph_ms: float | None  # the whole sample replayed from a CUDA graph
    capture_s: float | None  # warm-up + capture of that one graph
    graph_mib: float | None  # device memory the capture took
    same_tokens: float | None  # fraction of tokens where graph == fused


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


def _bench_sampler_shape(model, batch: int, length: int, steps: int, iters: int) -> SamplerRow:
    from yan_kernels import ops

    from yan_serve.engine.graphs import GraphSampler, Ladder
    from yan_serve.engine.sampler import GenerationRequest, Sampler

    cfg = model.config
    g = torch.Generator().manual_seed(batch * 100003 + length)
    reqs = [
        GenerationRequest(
            torch.randint(4, cfg.vocab_size, (length,), generator=g).tolist(), length, seed=i
        )
        for i in range(batch)
    ]
    sampler = Sampler(model)
    graphs = GraphSampler(sampler)

    def eager_run() -> object:
        return sampler.generate(reqs, steps, "argmax")

    def graph_run() -> object:
        return graphs.generate(reqs, steps, "argmax")

    with ops.force("ref"):
        eager = _or_oom(lambda: _wall_ms(eager_run, iters))
    with ops.force("triton"):
        fused = _or_oom(lambda: _wall_ms(eager_run, iters))
        fused_out = _or_oom(eager_run)
        ladder = Ladder(
            batch_sizes=(batch,), tgt_lengths=(length,), max_tokens=None, steps=steps,
            routings=("argmax",),
        )  # fmt: skip
        rep = _or_oom(lambda: graphs.capture(ladder))
    graph = same = None
    if rep is not None and rep.graphs == 1:
        graph = _wall_ms(graph_run, iters)
        if fused_out is not None:
            pairs = [
                (a, b)
                for x, y in zip(graph_run(), fused_out, strict=True)
                for a, b in zip(x.full, y.full, strict=True)
            ]
            same = sum(a == b for a, b in pairs) / len(pairs)
    return SamplerRow(
        batch, length, eager, fused, graph,
        None if rep is None else rep.seconds,
        None if rep is None else rep.device_bytes / 2**20,
        same,
    )  # fmt: skip


def run_sampler(args: argparse.Namespace) -> int:
    if (missing := _missing_gpu_stack("sampler")) is not None:
        return missing
    from yan_serve.config import YANConfig
    from yan_serve.model import YAN

    dtype = _DTYPES[args.dtype]
    cfg = YANConfig.from_name(args.model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = YAN(cfg).to(dtype).eval()
    steps = args.steps or cfg.ode_steps
    header = {
        **_run_header(),
        "model": f"{args.model} (random weights)",
        "dtype": args.dtype,
        "steps": steps,
        "routing": "argmax",
        "decode": "greedy",
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(
        f"{'batch':>6}{'length':>8}{'eager ms':>10}{'fused ms':>10}{'graph ms':>10}"
        f"{'graph/eager':>12}{'graph/fused':>12}{'capture s':>11}{'graph MiB':>11}{'same tok':>10}"
    )
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            r = _bench_sampler_shape(model, batch, length, steps, args.iters)
            torch.cuda.empty_cache()  # the shape's graph and buffers are gone with its sampler
            rows.append(r)
            vs_e = None if r.eager_ms is None or r.graph_ms is None else r.eager_ms / r.graph_ms
            vs_f = None if r.fused_ms is None or r.graph_ms is None else r.fused_ms / r.graph_ms
            print(
                f"{r.batch:>6}{r.length:>8}{_fmt(r.eager_ms, '10.2f')}{_fmt(r.fused_ms, '10.2f')}"
                f"{_fmt(r.graph_ms, '10.2f')}{_fmt(vs_e, '11.2f')}x{_fmt(vs_f, '11.2f')}x"
                f"{_fmt(r.capture_s, '11.2f')}{_fmt(r.graph_mib, '11.0f')}"
                f"{_fmt(None if r.same_tokens is None else 100 * r.same_tokens, '9.2f')}%"
            )
    if args.json:
        out = {"header": header, "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
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


def _add_sampler(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sampler", help="whole-sample latency: eager torch vs fused kernels vs CUDA graph"
    )
    p.add_argument("--model", default="yan-paper", help="preset name (random weights)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=0, help="Euler time points (0: the preset's)")
    p.add_argument("--batches", type=_int_list, default=[1, 8, 64], help="e.g. 1,8,64")
    p.add_argument("--lengths", type=_int_list, default=[128, 512, 1024], help="source = target")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write header and rows as JSON")
    p.set_defaults(func=run_sampler)


COMMANDS = [_add_kernels, _add_sampler]


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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
