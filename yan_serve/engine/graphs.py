"""The whole fixed-step sample captured in CUDA graphs, for a ladder of padded shapes.

One graph holds a complete greedy sample at one shape `(batch, tgt_len, src_len)` and one
`(steps, routing)`: each request's noise (drawn on the device from its seed), the encoder, the
T - 1 trunk passes with routed experts and Euler updates, and the decoder's argmax. A graph
reads one static input buffer and writes one static output buffer, so a batch costs the host

1. `Sampler.validate` on the real requests (the eager sampler's checks and errors);
2. packing them into a pinned host buffer at the cheapest captured shape that holds the batch
   (`pack_inputs`: source ids, source and target lengths, seeds; extra rows are harmless padding,
   one source token and one target position, thrown away), and one host-to-device copy;
3. a replay, one device-to-host copy of (tokens, probabilities, experts), and the read-back.

Rows with `temperature > 0` take the graph's final latent and token uniforms and are decoded
outside it by `Sampler.decode` (top-k stays in torch). Previews and step callbacks, `steps` or
`routing` not captured, and batches that no captured shape holds run the eager
`Sampler.generate` unchanged.

Why results equal the eager sampler: the graph runs the same code (`Sampler.draw`,
`Sampler.solve`, the greedy decode) on the same per-request draws; padding only adds rows and
masked positions, which never feed a real position. What padding does change is the shape of
every matmul, so values can differ from an unpadded eager batch in the last float bits, exactly
as they do between two eager batches of different composition (see `Sampler`'s batch-independence
test); a token can only flip on a decoder near-tie.

Graph memory: all graphs share one memory pool (they never run concurrently) and, within one
`capture` call, one set of flat input/output buffers, of which each shape uses a prefix. Shapes
are captured largest first so smaller graphs reuse the pool's blocks.

Off CUDA (and in the CPU tests) the same class runs with `EagerReplay` in place of CUDA graphs:
"capture" keeps the function and "replay" calls it, so the packing, the static buffers and the
read-back are exercised exactly as on the GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from yan_kernels import ops

from yan_serve.engine.sampler import (
    Generation,
    GenerationRequest,
    Noise,
    PreparedBatch,
    Sampler,
    assemble,
)
from yan_serve.flow.solver import Routing

log = logging.getLogger("yan_serve.graphs")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
SMALLEST_BUCKET = 16


# --------------------------------------------------------------------------- shapes (pure)
@dataclass(frozen=True, order=True)
class GraphShape:
    """A padded batch shape: `batch` rows, `tgt_len` target and `src_len` source positions."""

    batch: int
    tgt_len: int
    src_len: int

    @property
    def cost(self) -> int:
        """Padded token count, the quantity the smallest fitting shape minimizes."""
        return self.batch * (self.tgt_len + self.src_len)


def length_buckets(max_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_length`, then `max_length` itself
    (`length_bucket`'s classes, clamped to what the model accepts)."""
    if max_length < 1 or smallest < 1:
        raise ValueError("max_length and smallest must be >= 1")
    out = []
    b = smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


@dataclass(frozen=True)
class Ladder:
    """Which shapes to capture: every (batch size, target bucket, source bucket) triple with
    `batch * max(tgt, src) <= max_tokens`, for one `steps` and each routing.

    Larger shapes are compute-bound, so a graph saves little there while costing capture time and
    memory; they run eagerly. None means: buckets 16, 32, ... up to the model's `max_length`
    (targets), the target buckets (sources), no token limit, the model's `ode_steps`."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    tgt_lengths: tuple[int, ...] | None = None
    src_lengths: tuple[int, ...] | None = None
    max_tokens: int | None = 8192
    steps: int | None = None
    routings: tuple[Routing, ...] = ("argmax", "sample")

    def shapes(self, max_length: int) -> list[GraphShape]:
        """The ladder's shapes for a model of `max_length`, largest first (capture order)."""
        tgt = self.tgt_lengths or length_buckets(max_length)
        src = self.src_lengths or tgt
        for name, vals in (("batch size", self.batch_sizes), ("length", (*tgt, *src))):
            if any(v < 1 for v in vals):
                raise ValueError(f"every {name} in the ladder must be >= 1")
        too_long = [v for v in (*tgt, *src) if v > max_length]
        if too_long:
            raise ValueError(f"ladder length {too_long[0]} exceeds the model's max_length")
        for r in self.routings:
            if r not in ("argmax", "sample"):
                raise ValueError(f"routing must be 'sample' or 'argmax', got {r!r}")
        out = {
            GraphShape(b, ly, lx)
            for b in self.batch_sizes
            for ly in tgt
            for lx in src
            if self.max_tokens is None or b * max(ly, lx) <= self.max_tokens
        }
        return sorted(out, key=lambda s: (s.cost, s), reverse=True)


def pick_shape(
    shapes: Sequence[GraphShape], n: int, tgt_len: int, src_len: int
) -> GraphShape | None:
    """The cheapest shape holding `n` rows of up to `tgt_len` / `src_len` positions (ties: the
    fewest rows, then the shortest target), or None when none does."""
    fits = [s for s in shapes if s.batch >= n and s.tgt_len >= tgt_len and s.src_len >= src_len]
    return min(fits, key=lambda s: (s.cost, s), default=None)


def packed_size(shape: GraphShape) -> int:
    """int64 elements of a shape's packed input: source ids, then source lengths, target
    lengths and seeds (one per row each)."""
    return shape.batch * shape.src_len + 3 * shape.batch


def pack_inputs(
    requests: Sequence[GenerationRequest], shape: GraphShape, pad_token_id: int, out: Tensor
) -> Tensor:
    """Write the requests into `out` (a CPU int64 tensor of at least `packed_size(shape)`
    elements; every one of those is overwritten) and return that prefix. Rows past the requests
    are padding: one `pad_token_id` source token, one target position, seed 0."""
    n = len(requests)
    B, Lx = shape.batch, shape.src_len
    if n > B or any(len(r.src) > Lx or r.tgt_len > shape.tgt_len for r in requests):
        raise ValueError(f"a batch of {n} does not fit {shape}")
    flat = out[: packed_size(shape)].numpy()
    src = flat[: B * Lx].reshape(B, Lx)
    src.fill(pad_token_id)
    meta = flat[B * Lx :].reshape(3, B)
    meta[:2].fill(1)
    meta[2].fill(0)
    for i, r in enumerate(requests):
        src[i, : len(r.src)] = r.src
    meta[0, :n] = [len(r.src) for r in requests]
    meta[1, :n] = [r.tgt_len for r in requests]
    meta[2, :n] = [int(r.seed) for r in requests]
    return out[: packed_size(shape)]


def unpack_inputs(
    packed: Tensor,
    shape: GraphShape,
    dtype: torch.dtype = torch.float32,
    idle: tuple[Tensor, Tensor] | None = None,
) -> PreparedBatch:
    """The device side of `pack_inputs` (graph-capturable): packed int64 -> a greedy batch, its
    masks and their additive key biases (in `dtype`, the model's) from the lengths in one
    launch (`ops.length_masks`). `idle`: zero temperature [>= B] and top-k [>= B] buffers
    made beforehand (a greedy batch reads neither), else made here."""
    B, Lx, Ly = shape.batch, shape.src_len, shape.tgt_len
    src = packed[: B * Lx].view(B, Lx)
    src_len, tgt_len, seed = packed[B * Lx :].view(3, B)
    src_mask, tgt_mask, src_bias, tgt_bias = ops.length_masks(src_len, tgt_len, Lx, Ly, dtype)
    if idle is None:
        zeros = torch.zeros(B, device=packed.device)
        idle = (zeros, zeros.long())
    return PreparedBatch(src, src_mask, tgt_mask, seed, idle[0][:B], idle[1][:B], src_bias,
                         tgt_bias, tgt_len)  # fmt: skip


# ------------------------------------------------------------------------------- replays
class Replayable(Protocol):
    def replay(self) -> None: ...


Capturer = Callable[[Callable[[], None]], Replayable]


class EagerReplay:
    """The CPU stand-in for a CUDA graph: keeps the function, runs it on every replay."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class CudaGraphCapturer:
    """`torch.cuda.graph` capture after warm-up runs on a side stream; every graph shares one
    memory pool and one capture stream (graphs of one sampler never run concurrently)."""

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        self.device = device
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def __call__(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm-up compiles the Triton kernels for this shape and lets cuBLAS / SDPA pick their
        # algorithms outside the capture; a side stream keeps that off the capturing stream.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for _ in range(self.warmup):
                fn()
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's unrelated CUDA call must not abort this capture
        with torch.cuda.graph(
            graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
        ):
            fn()
        return graph


def cuda_graphs_supported(model: torch.nn.Module) -> bool:
    """Whether a sample of `model` can be captured: a CUDA model with the Triton kernels selected
    (the reference routed expert groups tokens with `nonzero`, which waits on the host)."""
    return ops.triton_selected(next(model.parameters()).device)


# ------------------------------------------------------------------------------- sampler
@dataclass
class _StaticIO:
    """A graph's static input and outputs, views of flat buffers."""

    packed: Tensor  # [packed_size] int64 on the device, written by one copy per batch
    stage: Tensor  # the same on the host (pinned on CUDA), filled by `pack_inputs`
    out: Tensor  # [3, B, Ly] fp32: greedy token, its probability, the frozen expert
    host_out: Tensor  # the same on the host
    z: Tensor  # [B, Ly, d] the latent at t = 1 (decoded outside for sampled rows)
    token_uniforms: Tensor  # [B, Ly] fp32
    idle: tuple[Tensor, Tensor]  # zero temperature and top-k, [>= B]


class _Buffers:
    """Flat buffers sized for the largest shapes of a capture; `io(shape)` views a prefix of
    each, so every shape's graph reads and writes the same addresses from offset 0."""

    def __init__(self, shapes: Sequence[GraphShape], d: int, dtype: torch.dtype, device) -> None:
        packed = max(packed_size(s) for s in shapes)
        tgt = max(s.batch * s.tgt_len for s in shapes)  # target positions over all rows
        self.d = d
        pin = torch.device(device).type == "cuda"
        self.packed = torch.empty(packed, dtype=torch.long, device=device)
        self.stage = torch.empty(packed, dtype=torch.long, pin_memory=pin)
        self.out = torch.empty(3 * tgt, dtype=torch.float32, device=device)
        self.host_out = torch.empty(3 * tgt, dtype=torch.float32, pin_memory=pin)
        self.z = torch.empty(tgt * d, dtype=dtype, device=device)
        self.token_uniforms = torch.empty(tgt, dtype=torch.float32, device=device)
        rows = max(s.batch for s in shapes)  # a greedy batch's temperature and top-k: zeros
        self.idle = (torch.zeros(rows, device=device), torch.zeros(rows, dtype=torch.long,
                                                                   device=device))  # fmt: skip

    def nbytes(self) -> int:
        """Bytes of the device-side buffers (the host staging copies not counted)."""
        dev = (self.packed, self.out, self.z, self.token_uniforms)
        return sum(t.numel() * t.element_size() for t in dev)

    def io(self, shape: GraphShape) -> _StaticIO:
        B, Ly, d = shape.batch, shape.tgt_len, self.d
        n = packed_size(shape)
        return _StaticIO(
            self.packed[:n], self.stage, self.out[: 3 * B * Ly].view(3, B, Ly),
            self.host_out[: 3 * B * Ly].view(3, B, Ly), self.z[: B * Ly * d].view(B, Ly, d),
            self.token_uniforms[: B * Ly].view(B, Ly), self.idle,
        )  # fmt: skip


@dataclass
class _Entry:
    shape: GraphShape
    io: _StaticIO
    graph: Replayable
    replays: int = 0


@dataclass
class CaptureReport:
    graphs: int  # captured by this call
    skipped: int  # shapes that did not fit in device memory (they run eagerly)
    seconds: float
    buffer_bytes: int  # static input/output buffers
    pool_bytes: int  # growth of the CUDA caching allocator's reserved memory (graph pool)
    device_bytes: int  # growth of device memory in use (pool, buffers, graph executables)


class GraphSampler:
    """`Sampler.generate` served from captured graphs for a ladder of padded shapes.

    `capture(ladder)` (server start-up) records one graph per (shape, steps, routing); `generate`
    has `Sampler.generate`'s signature and results. `capturer` defaults to CUDA graphs on a CUDA
    model and to `EagerReplay` elsewhere (the same padding and buffers, run eagerly)."""

    def __init__(self, sampler: Sampler, capturer: Capturer | None = None) -> None:
        self.sampler = sampler
        self.model = sampler.model
        self.device = sampler.device
        self.dtype = next(self.model.parameters()).dtype
        self.cuda_graphs = capturer is None and self.device.type == "cuda"
        self._capturer = capturer  # the CUDA capturer is made on the first capture
        self._entries: dict[tuple[int, str], list[_Entry]] = {}
        self.captures = 0  # graphs recorded so far (a replay never adds one)
        self.stats = {"graph": 0, "eager": 0}  # batches served each way

    def shapes(self, steps: int, routing: Routing) -> list[GraphShape]:
        """The captured shapes for (steps, routing)."""
        return [e.shape for e in self._entries.get((steps, routing), [])]

    # ----------------------------------------------------------------------------- capture
    def _get_capturer(self) -> Capturer:
        if self._capturer is None:
            if not self.cuda_graphs:
                self._capturer = EagerReplay
            elif not cuda_graphs_supported(self.model):
                raise RuntimeError(
                    "CUDA graph capture needs the Triton kernels (yan_kernels.ops.use_triton() is"
                    " False, and the reference routed expert synchronizes with the host)"
                )
            else:
                self._capturer = CudaGraphCapturer(self.device)
        return self._capturer

    def capture(self, ladder: Ladder | None = None) -> CaptureReport:
        """Record a graph for every ladder shape and routing not captured yet (largest first)."""
        ladder = ladder or Ladder()
        cfg = self.model.config
        steps = cfg.ode_steps if ladder.steps is None else ladder.steps
        if steps < 1:
            raise ValueError(f"steps counts time points and must be >= 1, got {steps}")
        capturer = self._get_capturer()
        engine = self.sampler.engine
        if engine is not None:
            engine.tables(steps)  # built outside the graphs: it reads values on the host
        todo = [
            (shape, routing)
            for shape in ladder.shapes(cfg.max_length)
            for routing in ladder.routings
            if shape not in self.shapes(steps, routing)
        ]
        cuda = self.device.type == "cuda"
        if cuda:
            # measure from an empty cache and back to one: blocks cached before the capture,
            # or by its eager warm-up runs, would otherwise count (or, released, read negative)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            reserved0 = torch.cuda.memory_reserved(self.device)
            free0 = torch.cuda.mem_get_info(self.device)[0]
        t0 = time.perf_counter()
        buffers = None
        if todo:
            buffers = _Buffers([s for s, _ in todo], cfg.d_model, self.dtype, self.device)
        done = skipped = 0
        for shape, routing in todo:
            assert buffers is not None
            io = buffers.io(shape)
            self._fill_padding(io, shape)  # warm-up and capture run on valid inputs
            try:
                graph = capturer(self._graph_fn(io, shape, steps, routing))
            except torch.OutOfMemoryError:
                if cuda:
                    torch.cuda.empty_cache()
                log.warning("no memory to capture %s (%s routing): it runs eagerly", shape, routing)
                skipped += 1
                continue
            self.captures += 1
            done += 1
            self._entries.setdefault((steps, routing), []).append(_Entry(shape, io, graph))
        report = CaptureReport(done, skipped, 0.0, buffers.nbytes() if buffers else 0, 0, 0)
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the graphs' pools stay: they hold what the graphs use
            report.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved0
            report.device_bytes = free0 - torch.cuda.mem_get_info(self.device)[0]
        report.seconds = time.perf_counter() - t0
        return report

    def _fill_padding(self, io: _StaticIO, shape: GraphShape) -> None:
        """Every row a padding row: valid inputs for the warm-up runs and the capture."""
        staged = pack_inputs([], shape, self.model.config.pad_token_id, io.stage)
        io.packed.copy_(staged)

    def _graph_fn(
        self, io: _StaticIO, shape: GraphShape, steps: int, routing: Routing
    ) -> Callable[[], None]:
        """The captured work: packed inputs -> draws -> solve -> greedy decode -> outputs."""

        @torch.no_grad()
        def run() -> None:
            batch = unpack_inputs(io.packed, shape, self.dtype, io.idle)
            noise = self.sampler.draw(batch)
            res = self.sampler.solve(batch, steps, routing, noise=noise)
            tok, prob = self.sampler.greedy(res.z)
            torch.stack([tok.float(), prob, res.expert.float()], out=io.out)
            io.z.copy_(res.z)
            io.token_uniforms.copy_(noise.token_uniforms)

        return run

    # ---------------------------------------------------------------------------- generate
    def plan(
        self, requests: Sequence[GenerationRequest], steps: int, routing: Routing
    ) -> GraphShape | None:
        """The captured shape that would serve this batch, or None (eager)."""
        if not requests:
            return None
        return pick_shape(
            self.shapes(steps, routing),
            len(requests),
            max(r.tgt_len for r in requests),
            max(len(r.src) for r in requests),
        )

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        steps: int | None = None,
        routing: Routing = "sample",
        return_previews: bool = False,
        on_step: Callable[[int, Tensor], None] | None = None,
    ) -> list[Generation]:
        """`Sampler.generate` with a captured graph when one fits; eager otherwise."""
        steps = self.model.config.ode_steps if steps is None else steps
        shape = None if return_previews or on_step else self.plan(requests, steps, routing)
        if shape is None:
            self.stats["eager"] += 1
            return self.sampler.generate(requests, steps, routing, return_previews, on_step)
        entry = next(e for e in self._entries[(steps, routing)] if e.shape == shape)
        # the eager sampler's checks and errors; the source ids' vocabulary range is checked
        # on the packed buffer in one pass (a bad id then raises through the full check)
        self.sampler.validate(requests, token_ids=False)
        _ = self.sampler.engine  # re-derives the engine's constants if the weights changed
        io = entry.io
        cfg = self.model.config
        try:
            staged = pack_inputs(requests, shape, cfg.pad_token_id, io.stage)
        except (OverflowError, TypeError):  # an id int64 cannot hold: the full check names it
            self.sampler.validate(requests)
            raise
        ids = staged[: shape.batch * shape.src_len].numpy()
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            self.sampler.validate(requests)  # raises, naming the id
        io.packed.copy_(staged, non_blocking=True)
        entry.graph.replay()
        io.host_out.copy_(io.out, non_blocking=True)
        if self.device.type == "cuda":  # the copy back is asynchronous (pinned host memory)
            torch.cuda.current_stream(self.device).synchronize()
        entry.replays += 1
        self.stats["graph"] += 1
        n = len(requests)
        # copies: the host buffer is reused by the next batch
        tokens = io.host_out[0, :n].long()
        conf = io.host_out[1, :n].clone()
        expert = io.host_out[2, :n].long()
        hot = [i for i, r in enumerate(requests) if r.temperature > 0]
        if hot:  # sampled rows: decode the graph's final latent outside it (top-k, own uniforms)
            idx = torch.tensor(hot, device=self.device)
            rows = self.sampler.prepare([requests[i] for i in hot])
            noise = Noise(io.z[idx], torch.empty(0), io.token_uniforms[idx])
            tok_h, conf_h = self.sampler.decode(io.z[idx], rows, noise)
            tokens[hot], conf[hot] = tok_h, conf_h
        self.sampler.fill_content(io.z, requests, tokens, conf)
        return assemble(requests, tokens, conf, expert, self.model.config.eos_token_id)


def length_bucket(n: int, smallest: int = SMALLEST_BUCKET) -> int:
    """The length bucket `n` positions fall in: the smallest of `smallest`, 2 * `smallest`,
    4 * `smallest`, ... that holds them (unclamped; `length_buckets` lists a model's)."""
    b = smallest
    while b < n:
        b *= 2
    return b
