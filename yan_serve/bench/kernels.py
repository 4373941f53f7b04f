"""`python -m yan_serve.bench kernels`: each fused op at the paper's shapes.

The ops are the routed expert's Euler step, the decoder's argmax, the FFN up-projection with
its exact GELU (`linear_gelu`, d -> 4d), the QKV projection with the LayerNorm before it in its
prologue (`norm_linear`, d -> 3d) and the FFN down-projection with the residual add in its
epilogue (`linear_residual`, 4d -> d), at d = 512, K = 6 experts, V = 128258. On CUDA: the
Triton kernel (yan_kernels) against its torch eager reference (`*_ref`), and per shape eager and
Triton time, the Triton kernel's achieved GB/s and TFLOP/s, and its roofline floor, i.e. the
larger of (minimal bytes / measured copy bandwidth) and (flops / measured dense matmul rate). On
CPU: the same reference eager against the same reference under `torch.compile` (the CPU's
compiled path); GB/s, TFLOP/s and the floor are computed the same way, from a CPU copy and a CPU
GEMM. Triton runs on a CPU only in its interpreter, which is not a performance path: that column
reads "n/a (interpreter)". The header records device, date, commit and library versions.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from yan_serve.argtypes import positive_int
from yan_serve.bench.common import (
    CPU_BUDGET_S,
    DTYPES,
    NO_COMPILE,
    TRITON_ON_CPU,
    bench_device,
    compiled_cells,
    copy_bandwidth,
    cpu_time_ms,
    failed_exit,
    fmt,
    graph_ms,
    int_list,
    matmul_rate,
    one_line,
    or_oom,
    print_header,
    run_header,
    suite_parser,
    surviving,
    time_compiled,
    time_ms,
    write_json,
)

HELP = "fused ops: Triton vs torch eager (CUDA) or compiled vs eager (CPU)"
GPU_KERNEL_COLUMNS = (
    f"{'op':<22}{'shape':<26}{'eager ms':>10}{'triton ms':>11}{'speedup':>9}"
    f"{'GB/s':>9}{'TFLOP/s':>9}{'floor ms':>10}{'% floor':>9}"
)
CPU_KERNEL_COLUMNS = (
    f"{'op':<22}{'shape':<26}{'eager ms':>10}{'compiled ms':>13}{'speedup':>9}"
    f"{'1st call s':>12}{'triton':>19}{'GB/s':>9}{'TFLOP/s':>9}{'floor ms':>10}{'% floor':>9}"
)
# Per device: the default dtype and timed calls, and the routed-expert tokens and decoder rows,
# each as (all shapes, --quick).
DEFAULTS = {
    "cuda": ("bf16", 20, ([1024, 8192, 65536], [1024, 8192]),
             ([64, 1024, 8192, 65536], [64, 1024])),
    "cpu": ("fp32", 3, ([256, 1024, 4096], [256, 1024]), ([64, 256], [64])),
}  # fmt: skip
EAGER_BUDGET_S = 2.0  # CUDA: seconds of warm-up, and of timed calls, per eager reference row
# rows of the linear ops (linear_gelu, norm_linear, linear_residual) per device, as (all shapes,
# --quick): a 1 x 128 sample's tokens up to 64 x 1024
GELU_ROWS = {"cuda": ([128, 1024, 8192, 65536], [128, 1024]), "cpu": ([256, 1024], [256])}
# The launch configurations `--sweep` times, as (block_m, block_n | block_v, block_k, warps,
# stages, tma). (128, 128, 64, 4, 3, True) runs two programs per SM: one's epilogue under the
# other's MMA.
_SWEEP_FIRST = [(128, 256, 64, 8, 3, False), (128, 256, 64, 8, 3, True)]
SWEEP_ROUTED_UP = [*_SWEEP_FIRST, (128, 256, 64, 8, 4, True), (128, 128, 64, 4, 3, True),
                   (128, 128, 64, 8, 3, True), (128, 128, 64, 4, 4, False)]  # fmt: skip
SWEEP_ROUTED_DOWN = [*_SWEEP_FIRST, (128, 128, 64, 4, 3, True), (128, 128, 128, 8, 3, True),
                     (128, 256, 128, 8, 2, True), (128, 64, 128, 4, 3, True)]  # fmt: skip
SWEEP_DECODER = [*_SWEEP_FIRST, (128, 256, 64, 8, 4, True), (128, 256, 128, 8, 2, True),
                 (128, 128, 64, 4, 3, True), (128, 128, 64, 8, 3, True),
                 (256, 128, 64, 8, 3, True), (64, 256, 64, 4, 3, True)]  # fmt: skip


class _Throughput:
    """GB/s and TFLOP/s of a row's minimal traffic and FLOPs, at its fast path's time."""

    bytes: int
    flops: int

    @property
    def fast_ms(self) -> float:
        raise NotImplementedError

    @property
    def gbps(self) -> float:
        return self.bytes / self.fast_ms / 1e6

    @property
    def tflops(self) -> float:
        return self.flops / self.fast_ms / 1e9


@dataclass
class Row(_Throughput):
    op: str
    shape: str
    eager_ms: float | None  # None: the eager reference ran out of memory
    triton_ms: float
    bytes: int  # minimal traffic: inputs read once, outputs written once
    flops: int
    floor_ms: float

    @property
    def fast_ms(self) -> float:
        """The kernel's time: the path the GPU serves with."""
        return self.triton_ms

    def line(self) -> str:
        speed = None if self.eager_ms is None else self.eager_ms / self.triton_ms
        return (
            f"{self.op:<22}{self.shape:<26}{fmt(self.eager_ms, '10.3f')}{self.triton_ms:11.3f}"
            f"{fmt(speed, '8.2f')}x{self.gbps:9.0f}{self.tflops:9.1f}{self.floor_ms:10.3f}"
            f"{100 * self.floor_ms / self.triton_ms:8.0f}%"
        )


@dataclass
class CpuRow(_Throughput):
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

    def line(self) -> str:
        cells = compiled_cells(self.compiled_ms, self.first_call_s, self.eager_ms, self.compiled)
        return (
            f"{self.op:<22}{self.shape:<26}{self.eager_ms:10.3f}{cells}"
            f"{TRITON_ON_CPU:>19}{self.gbps:9.1f}{self.tflops:9.3f}{self.floor_ms:10.3f}"
            f"{100 * self.floor_ms / self.fast_ms:8.0f}%"
        )


@dataclass
class _Case:
    """One shape of one op: the arguments every path takes, and its minimal cost."""

    op: str
    shape: str
    args: tuple
    bytes: int
    flops: int

    def floor_ms(self, bw: float, rate: float) -> float:
        """max(bytes / copy bandwidth, FLOPs / matmul rate), in ms."""
        return 1e3 * max(self.bytes / bw, self.flops / rate)


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


def _linear_gelu_cases(dtype: torch.dtype, device: str, ns: list[int], d: int = 512):
    """The FFN's first layer, gelu(x @ W.T + b) with W [4d, d], at `ns` token rows."""
    F = 4 * d
    elt = torch.finfo(dtype).bits // 8
    w = torch.randn(F, d, device=device, dtype=dtype) / d**0.5
    b = torch.randn(F, device=device, dtype=dtype) * 0.1
    for n in ns:
        x = torch.randn(n, d, device=device, dtype=dtype)
        nbytes = elt * (n * d + F * d + F + n * F)
        yield _Case("linear_gelu", f"N={n} d={d} F={F}", (x, w, b), nbytes, 2 * n * d * F)


_LN_EPS = 1e-5


def norm_linear(x, w, b, scale, shift):
    """The Triton kernel: LayerNorm(x) * scale + shift, then x @ w.T + b, one launch."""
    from yan_kernels.fused_linear import fused_linear

    return fused_linear(x, w, b, norm=(scale, shift, _LN_EPS))


def norm_linear_ref(x, w, b, scale, shift):
    from yan_kernels.fused_linear import fused_linear_ref

    return fused_linear_ref(x, w, b, norm=(scale, shift, _LN_EPS))


def linear_residual(x, w, b, res):
    """The Triton kernel: res + x @ w.T + b, one launch."""
    from yan_kernels.fused_linear import fused_linear

    return fused_linear(x, w, b, residual=res)


def linear_residual_ref(x, w, b, res):
    from yan_kernels.fused_linear import fused_linear_ref

    return fused_linear_ref(x, w, b, residual=res)


def _norm_linear_cases(dtype: torch.dtype, device: str, ns: list[int], d: int = 512):
    """The QKV projection after its norm: W [3d, d], at `ns` token rows."""
    elt = torch.finfo(dtype).bits // 8
    w = torch.randn(3 * d, d, device=device, dtype=dtype) / d**0.5
    b = torch.randn(3 * d, device=device, dtype=dtype) * 0.1
    scale = torch.rand(d, device=device, dtype=dtype) + 0.5
    shift = torch.randn(d, device=device, dtype=dtype) * 0.1
    for n in ns:
        x = torch.randn(n, d, device=device, dtype=dtype)
        nbytes = elt * (n * d + 3 * d * d + 5 * d + 3 * n * d)
        yield _Case("norm_linear", f"N={n} d={d} F={3 * d}", (x, w, b, scale, shift), nbytes,
                    2 * n * d * 3 * d)  # fmt: skip


def _linear_residual_cases(dtype: torch.dtype, device: str, ns: list[int], d: int = 512):
    """The FFN's second layer into the residual stream, res + x @ W.T + b with W [d, 4d]."""
    F = 4 * d
    elt = torch.finfo(dtype).bits // 8
    w = torch.randn(d, F, device=device, dtype=dtype) / F**0.5
    b = torch.randn(d, device=device, dtype=dtype) * 0.1
    for n in ns:
        x = torch.randn(n, F, device=device, dtype=dtype)
        res = torch.randn(n, d, device=device, dtype=dtype)
        nbytes = elt * (n * F + F * d + d + 2 * n * d)
        yield _Case("linear_residual", f"N={n} d={d} F={F}", (x, w, b, res), nbytes, 2 * n * d * F)


def _gpu_rows(
    cases: Iterator[_Case], ref: Callable, kernel: Callable, iters: int, bw: float, rate: float
) -> Iterator[Row]:
    """Eager reference (host-timed with events, launches included) vs the kernel's launches
    replayed from a CUDA graph (device time: how a captured sample runs it)."""
    for c in cases:
        # the sampled decoder's reference takes ~1 s a call at N = 8192: a budget per row
        eager = or_oom(lambda c=c: time_ms(lambda: ref(*c.args), iters, budget_s=EAGER_BUDGET_S))
        triton = graph_ms(lambda c=c: kernel(*c.args), iters)
        yield Row(c.op, c.shape, eager, triton, c.bytes, c.flops, c.floor_ms(bw, rate))
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
            failure = "compile failed: " + one_line(exc)
    for c in cases:
        eager = cpu_time_ms(lambda c=c: ref(*c.args), iters)
        ms = first = None
        status = failure
        if failure is None and compiled is not None:
            ms, first, status = time_compiled(lambda c=c: compiled(*c.args), iters)
            if ms is None:
                failure = status
        assert status is not None
        floor = c.floor_ms(bw, rate)
        yield CpuRow(c.op, c.shape, eager, ms, first, status, c.bytes, c.flops, floor)


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
    from yan_kernels import fused_linear as lg
    from yan_kernels import routed_expert as rm

    out = []
    print(f"{'sweep':<26}{'shape':<26}{'config':<40}{'ms':>9}{'% floor':>9}")
    print("routed up / down: that projection's configuration swept, the other at its default;")
    print("config: (block_m, block_n|v, block_k, warps, stages, tma); linear_gelu: (block_m,")
    print("block_n, block_k, group_m, warps, stages); % floor: of the whole op")
    up = rm.GPU_LARGE  # the other projection's configuration while one is swept
    routed_fn = rm.routed_expert_euler

    def up_only(*args, blocks):
        return routed_fn(*args, blocks=blocks, down_blocks=rm.GPU_LARGE_DOWN)

    def down_only(*args, blocks):
        return routed_fn(*args, blocks=up._replace(block_m=blocks.block_m), down_blocks=blocks)

    routed_up = [rm.Blocks(*c) for c in SWEEP_ROUTED_UP]
    routed_down = [rm.Blocks(*c) for c in SWEEP_ROUTED_DOWN]
    decoder = [dm.Blocks(*c) for c in SWEEP_DECODER]
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
    if which in ("all", "gelu"):

        def gelu_with(*args, blocks):
            return lg.linear_gelu(*args, config=blocks)

        plans += [
            (c, gelu_with, list(lg.SWEEP), "")
            for c in _linear_gelu_cases(dtype, "cuda", [128, 1024, 65536], d)
        ]
    for c, fn, configs, part in plans:
        floor = c.floor_ms(bw, rate)
        op = f"{c.op} {part}".strip()
        for cfg in configs:
            try:
                ms = graph_ms(
                    lambda c=c, cfg=cfg, fn=fn: fn(*c.args, blocks=cfg), max(3, iters // 4)
                )
            except Exception as exc:  # a configuration that does not fit (shared memory)
                print(f"{op:<26}{c.shape:<26}{tuple(cfg)!s:<40}  failed: {one_line(exc, 60)}")
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


def _kernels_header(device: str, dtype: str, bw: float, rate: float) -> dict:
    """The `kernels` table's header (printed, and returned for --json): the run header plus the
    measured copy bandwidth and matmul rate (3 decimals on a CPU, whose rate is << 1 TFLOP/s)."""
    header = {
        **run_header(device),
        "python": platform.python_version(),
        "dtype": dtype,
        "copy_GBps": round(bw / 1e9, 1),
        "matmul_TFLOPs": round(rate / 1e12, 1 if device == "cuda" else 3),
    }
    print_header(header)
    return header


def _cpu_notes(rows: list[CpuRow], iters: int) -> None:
    """Under the CPU table: each compile failure once, with the ops it stopped; the legend."""
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


def run_kernels(args: argparse.Namespace) -> int:
    """CUDA: the Triton kernels vs their eager references; CPU: the references eager vs
    under torch.compile. The same shapes, bandwidth and matmul measurements on both."""
    if (device := bench_device(args, "kernels")) is None:
        return 2
    from yan_kernels.decoder_argmax import decoder_argmax, decoder_argmax_ref
    from yan_kernels.fused_linear import linear_gelu, linear_gelu_ref
    from yan_kernels.routed_expert import routed_expert_euler, routed_expert_euler_ref

    cuda = device == "cuda"
    default_dtype, default_iters, routed, decoder = DEFAULTS[device]
    dtype_name = args.dtype or default_dtype
    dtype = DTYPES[dtype_name]
    iters = args.iters or default_iters
    torch.manual_seed(0)
    bw = copy_bandwidth(iters, device)
    rate = matmul_rate(dtype, iters, device)
    header = _kernels_header(device, dtype_name, bw, rate)
    routed_ns = args.routed_n or routed[args.quick]
    decoder_ns = args.decoder_n or decoder[args.quick]
    # On a CPU the eager reference draws its Gumbel noise with a Philox in int64 torch ops over
    # [N, V] (~9 s a call at N = 64 on one core), so by default only the smallest N samples.
    # On CUDA the sampled rows stop at N = 1024 by default: the server samples in torch, and
    # the reference's Philox takes seconds a call beyond.
    sample_ns = args.sample_n or ([n for n in decoder_ns if n <= 1024] if cuda
                                  else [min(decoder_ns)])  # fmt: skip
    d, K, V = args.d_model, args.experts, args.vocab
    linear_ns = args.gelu_n or GELU_ROWS[device][args.quick]
    print(GPU_KERNEL_COLUMNS if cuda else CPU_KERNEL_COLUMNS)
    plans = [
        (_routed_cases(dtype, device, routed_ns, d, K), routed_expert_euler_ref,
         routed_expert_euler),
        (_decoder_cases(dtype, device, decoder_ns, sample_ns, d, V), decoder_argmax_ref,
         decoder_argmax),
        (_linear_gelu_cases(dtype, device, linear_ns, d), linear_gelu_ref, linear_gelu),
        (_norm_linear_cases(dtype, device, linear_ns, d), norm_linear_ref, norm_linear),
        (_linear_residual_cases(dtype, device, linear_ns, d), linear_residual_ref,
         linear_residual),
    ]  # fmt: skip
    rows: list = []
    failures: list[str] = []
    for cases, ref, kernel in plans:
        gen = (
            _gpu_rows(cases, ref, kernel, iters, bw, rate)
            if cuda
            else _cpu_rows(cases, ref, iters, bw, rate, not args.no_compile)
        )
        for r in surviving(gen, failures):
            rows.append(r)
            print(r.line(), flush=True)
    run = {"header": header, "rows": [asdict(r) for r in rows]}
    if cuda:
        print(
            "eager: the torch reference, launches included. triton: the kernel's launches"
            " replayed\nfrom a CUDA graph (device time). floor: max(bytes / copy bandwidth,"
            " FLOPs / GEMM rate)."
        )
        run["sweep"] = _sweep(dtype, iters, bw, rate, d, K, V, args.sweep) if args.sweep else []
    else:
        _cpu_notes(rows, iters)
    write_json(args.json, [run])
    return failed_exit("kernels", failures)


def add_kernels(sub: argparse._SubParsersAction) -> None:
    p = suite_parser(sub, "kernels", HELP, run_kernels, (DEFAULTS["cuda"][1], DEFAULTS["cpu"][1]))
    p.add_argument("--quick", action="store_true", help="skip the largest shapes")
    p.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        choices=("all", "routed", "up", "down", "decoder", "gelu"),
        help="CUDA: also time launch configurations (all, or one kernel / projection)",
    )
    p.add_argument("--d-model", type=positive_int, default=512, help="hidden size d")
    p.add_argument("--experts", type=positive_int, default=6, help="routed experts K")
    p.add_argument("--vocab", type=positive_int, default=128258, help="decoder vocabulary V")
    for flag, what in (
        ("--routed-n", "routed-expert tokens (CUDA 1024,8192,65536; CPU 256,1024,4096)"),
        ("--decoder-n", "decoder rows (CUDA 64,1024,8192,65536; CPU 64,256)"),
        (
            "--sample-n",
            "decoder rows with sampling (CUDA: the --decoder-n up to 1024; CPU: the smallest)",
        ),
        (
            "--gelu-n",
            "rows of linear_gelu, norm_linear and linear_residual (CUDA 128,1024,8192,65536;"
            " CPU 256,1024)",
        ),
    ):
        p.add_argument(flag, type=int_list, help=what)
    p.add_argument("--no-compile", action="store_true", help="CPU: skip the torch.compile path")
