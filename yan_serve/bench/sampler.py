"""`python -m yan_serve.bench sampler`: one whole greedy sample, host work included.

Presets with random weights are timed at batch x length shapes (source length = target length)
through `generate`. On CUDA: eager torch ops, the fused Triton kernels launched eagerly, and the
graph-captured sampler (yan_serve.engine.graphs), with the capture's time and memory and the
share of tokens where the graph agrees with the fused run. On CPU there are no CUDA graphs and
Triton is only interpreted: the reference ops run eagerly and against a copy of the model whose
encoder and trunk blocks and decoder run under `torch.compile`, with the share of tokens where
the two agree. One table per preset.
"""

from __future__ import annotations

import argparse
import copy
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from yan_kernels import pdl

from yan_serve.argtypes import count_int
from yan_serve.bench.common import (
    CPU_BUDGET_S,
    DTYPES,
    NO_COMPILE,
    TRITON_ON_CPU,
    bench_device,
    bench_model,
    compiled_cells,
    copy_bandwidth,
    cpu_time_ms,
    euler_steps,
    failed_exit,
    fmt,
    int_list,
    matmul_rate,
    one_line,
    or_oom,
    preset_list,
    print_header,
    random_requests,
    run_header,
    suite_parser,
    time_compiled,
    wall_ms,
    write_json,
)
from yan_serve.engine.fused import ATTENTION_BACKENDS, LINEAR_MODES

if TYPE_CHECKING:
    from yan_serve.config import YANConfig
    from yan_serve.engine.sampler import Generation, GenerationRequest
    from yan_serve.model import YAN

HELP = "whole-sample latency: eager vs fused vs CUDA graph (CUDA), eager vs compiled (CPU)"
GRAPH_ON_CPU = "n/a on CPU"
# Per device: the default dtype, batch sizes, lengths, timed calls and preset.
DEFAULTS = {
    "cuda": ("bf16", [1, 8, 64], [128, 512, 1024], 10, "yan-paper"),
    "cpu": ("fp32", [1, 8], [128, 512], 3, "yan-tiny"),
}
GPU_SAMPLER_COLUMNS = (
    f"{'batch':>6}{'length':>8}{'eager ms':>10}{'fused ms':>10}{'graph ms':>10}"
    f"{'floor ms':>10}{'% floor':>9}{'launches':>10}{'graph/eager':>12}{'capture s':>11}"
    f"{'graph MiB':>11}{'same tok':>10}"
)
CPU_SAMPLER_COLUMNS = (
    f"{'batch':>6}{'length':>8}{'eager ms':>10}{'compiled ms':>13}{'speedup':>9}"
    f"{'1st call s':>12}{'same tok':>10}{'fused':>19}{'graph':>12}{'ops mod':>9}{'ops fused':>10}"
    f"{'ops graph':>10}"
)


def _compare_width(mode: str) -> int:
    return max(10, len(mode) + 5)


def _compare_columns(modes: list[str]) -> str:
    return "".join(f"{m + ' ms':>{_compare_width(m)}}" for m in modes)


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
    # --compare: the graph ms with the engine's linear layers in each other mode, same run
    compare_ms: dict[str, float | None] = field(default_factory=dict)

    def line(self) -> str:
        g = self.graph_ms
        vs_e = None if self.eager_ms is None or g is None else self.eager_ms / g
        pct = None if g is None else 100 * self.floor_ms / g
        same = None if self.same_tokens is None else 100 * self.same_tokens
        return (
            f"{self.batch:>6}{self.length:>8}{fmt(self.eager_ms, '10.2f')}"
            f"{fmt(self.fused_ms, '10.2f')}{fmt(g, '10.2f')}{self.floor_ms:10.3f}"
            f"{fmt(pct, '8.1f')}%{fmt(self.launches, '10d')}{fmt(vs_e, '11.2f')}x"
            f"{fmt(self.capture_s, '11.2f')}{fmt(self.graph_mib, '11.0f')}{fmt(same, '9.2f')}%"
            + "".join(f"{fmt(ms, '.2f'):>{_compare_width(m)}}" for m, ms in self.compare_ms.items())
        )


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
    ops_graph: int = 0  # the same for the captured function a CUDA graph would replay

    def line(self) -> str:
        cells = compiled_cells(
            self.compiled_ms, self.first_call_s, self.eager_ms, self.compiled, "13.2f"
        )
        same = "-" if self.same_tokens is None else f"{100 * self.same_tokens:.2f}%"
        return (
            f"{self.batch:>6}{self.length:>8}{self.eager_ms:10.2f}{cells}"
            f"{same:>10}{TRITON_ON_CPU:>19}{GRAPH_ON_CPU:>12}{self.ops_modules:9d}"
            f"{self.ops_fused:10d}{self.ops_graph:10d}"
        )


def sample_cost(cfg: YANConfig, batch: int, length: int, steps: int) -> tuple[float, float]:
    """(FLOPs, weights read) of one greedy sample with source = target = `length`: the encoder
    once, T - 1 trunk passes with the routed expert, the cross-attention keys/values once, the
    decoder and lm_head once. Attention counts QK^T and AV (4 L d per query). The second figure
    counts parameters each pass must read once (times the element size: the bytes floor): a
    cross-attention block's query and output projections every pass, its packed key/value
    projection once per sample, as the fused engine runs it."""
    d, dff, V, K = cfg.d_model, cfg.d_ffn, cfg.vocab_size, cfg.moe_n_experts
    n_cross = len(cfg.cross_att_idx)
    tok = batch * length
    enc = cfg.encoder_n_trf_blocks * (8 * d * d + 4 * d * dff + 4 * length * d)
    trunk = cfg.n_trf_blocks * (8 * d * d + 4 * d * dff + 4 * length * d)
    trunk += n_cross * (4 * d * d + 4 * length * d) + 4 * d * dff  # cross q/out, routed expert
    dec = cfg.decoder_n_resi_blocks * 4 * d * dff + 2 * d * V
    flops = tok * (enc + (steps - 1) * trunk + dec + n_cross * 4 * d * d + 6 * d * cfg.gate_dim)
    enc_w = cfg.encoder_n_trf_blocks * (4 * d * d + 2 * d * dff)
    trunk_w = cfg.n_trf_blocks * (4 * d * d + 2 * d * dff) + n_cross * 2 * d * d
    expert_w = K * 2 * d * dff
    dec_w = d * V + cfg.decoder_n_resi_blocks * 2 * d * dff
    params = enc_w + (steps - 1) * (trunk_w + expert_w) + dec_w + n_cross * 2 * d * d
    return float(flops), float(params)


def _same_tokens(a: list[Generation], b: list[Generation]) -> float:
    """Fraction of positions (every row's full target) where two generations agree."""
    pairs = [
        (x, y) for ga, gb in zip(a, b, strict=True) for x, y in zip(ga.full, gb.full, strict=True)
    ]
    return sum(x == y for x, y in pairs) / len(pairs)


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


class _GpuTable:
    """CUDA rows: the modules (reference ops), the fused engine launched eagerly, and the fused
    engine replayed from a CUDA graph, against the bytes / FLOPs floor measured here."""

    columns = GPU_SAMPLER_COLUMNS

    def __init__(self, model: YAN, steps: int, iters: int, args: argparse.Namespace) -> None:
        self.model, self.steps, self.iters = model, steps, iters
        self.attention, self.profile = args.attention, args.profile
        self.linears = args.linears
        own = (args.linears, args.attention)
        self.compare = [m for m in args.compare
                        if m.endswith("+pdl") or split_mode(m, args.attention) != own]  # fmt: skip
        self.columns = GPU_SAMPLER_COLUMNS + _compare_columns(self.compare)
        dtype = next(model.parameters()).dtype
        self.bw = copy_bandwidth(10)
        self.rate = matmul_rate(dtype, 10)
        self.header = {
            "copy_GBps": round(self.bw / 1e9, 1),
            "matmul_TFLOPs": round(self.rate / 1e12, 1),
        }

    def row(self, batch: int, length: int) -> SamplerRow | None:
        """The shape's row; None (after a `failed` line) where it raised."""
        try:
            return self._measure(batch, length)
        except Exception as exc:  # one broken shape must not hide the others' figures
            traceback.print_exc()
            print(f"{batch:>6}{length:>8}  failed: {one_line(exc)}", flush=True)
            return None
        finally:
            torch.cuda.empty_cache()  # the shape's graph and buffers go with its sampler

    def _measure(self, batch: int, length: int) -> SamplerRow:
        from yan_kernels import ops

        from yan_serve.engine.graphs import GraphSampler, Ladder
        from yan_serve.engine.launches import kernel_counts, kernel_times
        from yan_serve.engine.sampler import Sampler

        model, steps, iters = self.model, self.steps, self.iters
        reqs = random_requests(model.config, batch, length)
        modules = Sampler(model, fused=False)
        fused = Sampler(model, fused=True)
        fused.engine.attention = self.attention
        fused.engine.linears = self.linears
        graphs = GraphSampler(fused)

        with ops.force("ref"):
            eager = or_oom(lambda: wall_ms(lambda: modules.generate(reqs, steps, "argmax"), iters))
        with ops.force("triton"):
            fused_ms = or_oom(lambda: wall_ms(lambda: fused.generate(reqs, steps, "argmax"), iters))
            fused_out = or_oom(lambda: fused.generate(reqs, steps, "argmax"))
            launches = None
            if fused_out is not None:  # one profiled sample: its launches (and breakdown)
                times = kernel_times(lambda: fused.generate(reqs, steps, "argmax"))
                launches = sum(kernel_counts(times).values())
                if self.profile:
                    _print_profile(times, self.profile, f"{batch}x{length}")
            ladder = Ladder(
                batch_sizes=(batch,), tgt_lengths=(length,), max_tokens=None, steps=steps,
                routings=("argmax",),
            )  # fmt: skip
            rep = or_oom(lambda: graphs.capture(ladder))
            graph = same = None
            if rep is not None and rep.graphs == 1:
                graph = wall_ms(lambda: graphs.generate(reqs, steps, "argmax"), iters)
                if fused_out is not None:
                    same = _same_tokens(graphs.generate(reqs, steps, "argmax"), fused_out)
            compare: dict[str, float | None] = {}
            for mode in self.compare:
                del graphs  # the last graph's pool, before the next capture
                torch.cuda.empty_cache()
                fused.engine.linears, fused.engine.attention = split_mode(mode, self.attention)
                graphs = g = GraphSampler(fused)
                compare[mode] = None
                with pdl.use(mode.endswith("+pdl")):
                    r2 = or_oom(lambda g=g: g.capture(ladder))
                if r2 is not None and r2.graphs == 1:
                    compare[mode] = wall_ms(lambda g=g: g.generate(reqs, steps, "argmax"), iters)
        flops, params = sample_cost(model.config, batch, length, steps)
        elt = next(model.parameters()).element_size()
        floor = max(flops / self.rate, params * elt / self.bw) * 1e3  # FLOP/s, bytes/s
        return SamplerRow(
            batch, length, eager, fused_ms, graph, floor, launches,
            None if rep is None else rep.seconds,
            # the pool, not free-memory deltas: those also count what the caching allocator
            # released meanwhile (they read negative)
            None if rep is None else rep.pool_bytes / 2**20,
            same, compare,
        )  # fmt: skip

    def notes(self) -> None:
        print(
            "eager: Sampler.generate on the model's modules (reference ops). fused: the fused"
            " engine\n(packed weights, Triton kernels), eager launches. graph: the same replayed"
            " from a CUDA\ngraph; every time is the wall time of a whole generate call (host work"
            " included).\nfloor: max(FLOPs / matmul rate, weight bytes / copy bandwidth), both"
            " measured here.\nlaunches: GPU kernels per sample of the fused engine"
            " (torch.profiler). graph MiB: the\ncapture's memory pool (growth of reserved device"
            " memory)."
            + f"\nlinears: {self.linears} (FusedEngine's `linears`)."
            + (
                "\n<mode> ms: graph ms with the engine's linear layers in that mode (and the"
                " attention after\na slash), same run."
                if self.compare
                else ""
            )
        )


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


def _dispatch_counts(
    model: YAN, reqs: list[GenerationRequest], steps: int, linears: str
) -> tuple[int, int, int]:
    """Launch proxy per sample: (the modules' `generate`, the fused engine's with its linear
    layers in mode `linears`, and the function a CUDA graph of this batch's shape captures:
    what a GPU replays), reference ops on the CPU."""
    from yan_kernels import ops

    from yan_serve.engine.graphs import EagerReplay, GraphSampler, Ladder
    from yan_serve.engine.launches import count_dispatched
    from yan_serve.engine.sampler import Sampler

    out = []
    with ops.force("ref"):
        for fused in (False, True):
            s = Sampler(model, fused=fused, linears=linears)
            s.generate(reqs[:1], steps, "argmax")  # the engine's constants are built once
            out.append(
                sum(count_dispatched(lambda s=s: s.generate(reqs, steps, "argmax")).values())
            )
        graphs = GraphSampler(Sampler(model, fused=True, linears=linears), capturer=EagerReplay)
        L = max(r.tgt_len for r in reqs)
        Lx = max(len(r.src) for r in reqs)
        graphs.capture(Ladder(batch_sizes=(len(reqs),), tgt_lengths=(L,), src_lengths=(Lx,),
                              max_tokens=None, steps=steps, routings=("argmax",)))  # fmt: skip
        (entry,) = graphs._entries[(steps, "argmax")]
        out.append(sum(count_dispatched(entry.graph.replay).values()))
    return out[0], out[1], out[2]


class _CpuTable:
    """CPU rows: the reference ops eager vs a copy of the model under torch.compile (none with
    --no-compile; after a compile failure, later shapes report it without compiling again)."""

    columns = CPU_SAMPLER_COLUMNS

    def __init__(self, model: YAN, steps: int, iters: int, args: argparse.Namespace) -> None:
        self.model, self.steps, self.iters = model, steps, iters
        self.header: dict = {}  # nothing measured beyond the run header
        self.linears = args.linears
        self.twin: YAN | None = None
        self.failure: str | None = NO_COMPILE if args.no_compile else None
        if not args.no_compile:
            torch.compiler.reset()  # a fresh compile cache per preset (blocks share code objects)
            try:
                self.twin = _compiled_copy(model)
            except Exception as exc:
                self.failure = "compile failed: " + one_line(exc)

    def row(self, batch: int, length: int) -> CpuSamplerRow:
        """Eager reference vs the compiled twin (none where `failure` says why)."""
        from yan_kernels import ops

        from yan_serve.engine.sampler import Sampler

        model, steps, iters = self.model, self.steps, self.iters
        reqs = random_requests(model.config, batch, length)
        out: dict[str, list[Generation]] = {}

        def run(name: str, m: YAN) -> Callable[[], None]:
            sampler = Sampler(m)

            def call() -> None:
                out[name] = sampler.generate(reqs, steps, "argmax")

            return call

        with ops.force("ref"):  # never the Triton interpreter, whatever TRITON_INTERPRET says
            eager = cpu_time_ms(run("eager", model), iters)
            ms = first = same = None
            status = self.failure
            if self.twin is not None and self.failure is None:
                ms, first, status = time_compiled(run("compiled", self.twin), iters)
                if ms is not None:
                    same = _same_tokens(out["compiled"], out["eager"])
                else:
                    self.failure = status  # one failure is enough: later shapes report it
        assert status is not None
        return CpuSamplerRow(
            batch,
            length,
            eager,
            ms,
            first,
            status,
            same,
            *_dispatch_counts(model, reqs, steps, self.linears),
        )

    def notes(self) -> None:
        if self.failure is not None and self.failure != NO_COMPILE:
            print(self.failure)
        print(
            "eager: Sampler.generate with the reference ops (the CPU serving path). compiled: the"
            "\nsame with encoder/trunk blocks and decoder under torch.compile(dynamic=True);"
            " routed\nexperts, gate and Mamba mixers stay eager. 1st call s: its first call at"
            " the shape\n(compilation). same tok: compiled == eager. fused / graph: Triton runs"
            " on a CPU only in\nits interpreter, and CUDA graphs need CUDA. Medians of up to"
            f" {self.iters} calls (fewer past {CPU_BUDGET_S} s).\nops mod / ops fused: operators"
            " per sample that would launch a GPU kernel (the CPU proxy\nfor launches), the"
            " modules vs the fused engine, whose fused calls count as their Triton launches\n"
            f"(linears: {self.linears}); ops graph: the same for the function a CUDA graph of the"
            " shape\ncaptures (what a GPU replays: no host-side preparation)."
        )


def _sampler_table(
    name: str, args: argparse.Namespace, device: str, failures: list[str] | None = None
) -> dict:
    """One preset's header, table and notes on `device`; returns {"header", "rows"}. The
    devices differ only in what a row measures and how it prints (`_GpuTable`, `_CpuTable`).
    A shape whose row failed is appended to `failures`."""
    dtype_name, batches, lengths, iters, _ = DEFAULTS[device]
    dtype_name = args.dtype or dtype_name
    batches = args.batches or batches
    lengths = args.lengths or lengths
    iters = args.iters or iters
    model, label = bench_model(name, lengths, device, DTYPES[dtype_name])
    steps = euler_steps(model.config, args.steps)
    table = (_GpuTable if device == "cuda" else _CpuTable)(model, steps, iters, args)
    header = {
        **run_header(device),
        "model": label,
        "dtype": dtype_name,
        "steps": steps,
        "routing": "argmax",
        "decode": "greedy",
        "attention": args.attention,
        "linears": args.linears,
        "compare": ",".join(args.compare),
        **table.header,
    }
    print_header(header)
    print(table.columns)
    rows = []
    for length in lengths:
        for batch in batches:
            r = table.row(batch, length)
            if r is not None:
                rows.append(r)
                print(r.line(), flush=True)
            elif failures is not None:
                failures.append(f"{name} {batch}x{length}")
    table.notes()
    return {"header": header, "rows": [asdict(r) for r in rows]}


def run_sampler(args: argparse.Namespace) -> int:
    if (device := bench_device(args, "sampler")) is None:
        return 2
    runs = []
    failures: list[str] = []
    for i, name in enumerate(args.presets or [DEFAULTS[device][-1]]):
        if i:
            print()
        runs.append(_sampler_table(name, args, device, failures))
    write_json(args.json, runs)
    return failed_exit("sampler", failures)


def split_mode(mode: str, attention: str) -> tuple[str, str]:
    """A `--compare` mode, `LINEARS` or `LINEARS/ATTENTION`, either optionally `+pdl` (its
    graph captured with programmatic dependent launch, `yan_kernels.pdl`) -> (linears,
    attention), the attention defaulting to the run's."""
    linears, _, attn = mode.removesuffix("+pdl").partition("/")
    return linears, attn or attention


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    pairs = {m: split_mode(m, "auto") for m in modes}
    bad = [m for m, (lin, att) in pairs.items() if lin not in LINEAR_MODES
           or att not in ATTENTION_BACKENDS]  # fmt: skip
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(LINEAR_MODES)}, each"
            f" optionally /{'|'.join(ATTENTION_BACKENDS)}, then optionally +pdl"
        )
    return list(dict.fromkeys(modes))


def add_sampler(sub: argparse._SubParsersAction) -> None:
    p = suite_parser(sub, "sampler", HELP, run_sampler, (DEFAULTS["cuda"][3], DEFAULTS["cpu"][3]))
    p.add_argument(
        "--preset",
        "--model",
        dest="presets",
        type=preset_list,
        help="preset(s), random weights, comma-separated: one table each"
        " (default: yan-paper on CUDA, yan-tiny on CPU; e.g. yan-tiny,yan-mamba-tiny)",
    )
    p.add_argument("--steps", type=count_int, default=0, help="Euler time points (0: the preset's)")
    p.add_argument("--batches", type=int_list, help="e.g. 1,8,64 (default; CPU: 1,8)")
    p.add_argument(
        "--lengths",
        type=int_list,
        help="source = target, e.g. 128,512,1024 (default; CPU: 128,512)",
    )
    p.add_argument("--no-compile", action="store_true", help="CPU: skip the torch.compile path")
    p.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="CUDA: the fused engine's attention (default auto: SDPA, which picks cuDNN"
        " attention on an H100; see FusedEngine)",
    )
    p.add_argument(
        "--linears",
        choices=LINEAR_MODES,
        default="cublas",
        help="the fused engine's linear layers: cuBLAS (default); `gelu`: the FFN up-projection"
        " with its exact GELU in one Triton GEMM; `fused`: every norm, GELU and residual in the"
        " Triton GEMM beside it (see FusedEngine)",
    )
    p.add_argument(
        "--compare",
        type=_modes,
        default=[],
        metavar="MODES",
        help="CUDA: also time each graph with the linear layers in these modes, comma-separated"
        " (a column `<mode> ms` each, from the same run), each optionally with another"
        " attention after a slash and +pdl (programmatic dependent launch, sm_90+) after that,"
        " e.g. gelu,fused,fused/triton,fused/triton+pdl",
    )
    p.add_argument(
        "--profile",
        type=count_int,
        default=0,
        metavar="K",
        help="CUDA: after each row, the K kernels with the most device time per sample",
    )
