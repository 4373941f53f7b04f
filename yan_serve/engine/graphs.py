"""The whole fixed-step sample captured in CUDA graphs, for a ladder of padded shapes.

One graph holds a complete greedy sample at one shape `(batch, tgt_len, src_len)` and one
`(steps, routing)`: the encoder, the T - 1 trunk passes with routed experts and Euler updates,
and the decoder's argmax (the fused Triton kernel). Graphs read fixed ("static") input buffers
and write fixed output buffers, so a batch is served by

1. `Sampler.prepare` on the real requests: the same validation and the same per-request noise
   (each request's own CPU generator, at its own length) as the eager sampler;
2. `pad_prepared` into the static inputs of the cheapest captured shape that holds the batch:
   real rows keep their values, extra rows are harmless padding (one source token, one valid
   target position, zero noise) and are thrown away;
3. a replay, then the real rows read back from the static outputs.

Rows with `temperature > 0` take the graph's final latent and are decoded outside the graph by
`Sampler.decode` (top-k and the request's own token uniforms stay in torch). Previews and step
callbacks, `steps` or `routing` not captured, and batches that no captured shape holds run the
eager `Sampler.generate` unchanged.

Why results equal the eager sampler: the graph runs the same code (`Sampler.solve`, then the same
greedy decode as `Sampler.decode`) on the same per-request draws; padding only adds rows and
masked positions, which never feed a real position. What padding does change is the shape of
every matmul, so values can differ from an unpadded eager batch in the last float bits, exactly
as they do between two eager batches of different composition (see `Sampler`'s batch-independence
test); a token can only flip on a decoder near-tie.

Graph memory: all graphs share one memory pool (they never run concurrently) and, within one
`capture` call, one set of flat input/output buffers, of which each shape uses a prefix. Shapes
are captured largest first so smaller graphs reuse the pool's blocks.

Off CUDA (and in the CPU tests) the same class runs with `EagerReplay` in place of CUDA graphs:
"capture" keeps the function and "replay" calls it, so the padding, the static buffers and the
read-back are exercised exactly as on the GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from yan_serve.engine.sampler import (
    Generation,
    GenerationRequest,
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
    (the batcher's `length_bucket`, clamped to what the model accepts)."""
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


def _batch_fields(batch: PreparedBatch) -> list[Tensor]:
    return [getattr(batch, f.name) for f in dataclasses.fields(batch)]


def empty_padded(
    shape: GraphShape, d: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> PreparedBatch:
    """Uninitialised tensors of a padded batch at `shape` (z0 in `dtype`)."""
    B, Ly, Lx = shape.batch, shape.tgt_len, shape.src_len
    kw = dict(device=device)
    return PreparedBatch(
        src=torch.empty(B, Lx, dtype=torch.long, **kw),
        src_mask=torch.empty(B, Lx, dtype=torch.bool, **kw),
        tgt_mask=torch.empty(B, Ly, dtype=torch.bool, **kw),
        z0=torch.empty(B, Ly, d, dtype=dtype, **kw),
        uniforms=torch.empty(B, Ly, **kw),
        token_uniforms=torch.empty(B, Ly, **kw),
        temperature=torch.empty(B, **kw),
        top_k=torch.empty(B, dtype=torch.long, **kw),
    )


def pad_prepared(
    batch: PreparedBatch, shape: GraphShape, pad_token_id: int, out: PreparedBatch | None = None
) -> PreparedBatch:
    """Pad a prepared batch [n, Ly, Lx] up to `shape`, into `out` (every element overwritten) or
    new tensors. Real rows keep their values, with padding positions as `Sampler.prepare` pads
    them; each extra row is one `pad_token_id` source token and one valid target position, with
    zero noise, uniforms, temperature and top-k, so it runs like a tiny request whose outputs are
    discarded (an all-masked row would also be safe, but this keeps every row a valid input)."""
    n, Lx = batch.src.shape
    Ly = batch.tgt_mask.shape[1]
    if n > shape.batch or Ly > shape.tgt_len or Lx > shape.src_len:
        raise ValueError(f"a batch of {n} x (tgt {Ly}, src {Lx}) does not fit {shape}")
    if out is None:
        out = empty_padded(shape, batch.z0.shape[-1], batch.z0.dtype, batch.src.device)
    elif out.src.shape != (shape.batch, shape.src_len) or out.z0.shape[:2] != (
        shape.batch,
        shape.tgt_len,
    ):
        raise ValueError(f"output buffers {tuple(out.z0.shape)} are not of {shape}")
    for t in _batch_fields(out):
        t.zero_()
    out.src.fill_(pad_token_id)
    out.src[:n, :Lx] = batch.src
    out.src_mask[:n, :Lx] = batch.src_mask
    out.src_mask[n:, 0] = True
    out.tgt_mask[:n, :Ly] = batch.tgt_mask
    out.tgt_mask[n:, 0] = True
    out.z0[:n, :Ly] = batch.z0
    out.uniforms[:n, :Ly] = batch.uniforms
    out.token_uniforms[:n, :Ly] = batch.token_uniforms
    out.temperature[:n] = batch.temperature
    out.top_k[:n] = batch.top_k
    return out


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
    if next(model.parameters()).device.type != "cuda":
        return False
    from yan_kernels import ops

    return ops.use_triton()


# ------------------------------------------------------------------------------- sampler
@dataclass
class _StaticIO:
    """A graph's static inputs (a padded `PreparedBatch`) and outputs, views of flat buffers."""

    batch: PreparedBatch
    z: Tensor  # [B, Ly, d] the latent at t = 1
    expert: Tensor  # [B, Ly] long
    token: Tensor  # [B, Ly] long, greedy
    prob: Tensor  # [B, Ly] fp32, its decoder probability


class _Buffers:
    """Flat buffers sized for the largest shapes of a capture; `io(shape)` views a prefix of
    each, so every shape's graph reads and writes the same addresses from offset 0."""

    def __init__(self, shapes: Sequence[GraphShape], d: int, dtype: torch.dtype, device) -> None:
        rows = max(s.batch for s in shapes)
        tgt = max(s.batch * s.tgt_len for s in shapes)  # target positions over all rows
        src = max(s.batch * s.src_len for s in shapes)
        self.d = d
        kw = dict(device=device)
        self.src = torch.empty(src, dtype=torch.long, **kw)
        self.src_mask = torch.empty(src, dtype=torch.bool, **kw)
        self.tgt_mask = torch.empty(tgt, dtype=torch.bool, **kw)
        self.z0 = torch.empty(tgt * d, dtype=dtype, **kw)
        self.uniforms = torch.empty(tgt, **kw)
        self.token_uniforms = torch.empty(tgt, **kw)
        self.temperature = torch.empty(rows, **kw)
        self.top_k = torch.empty(rows, dtype=torch.long, **kw)
        self.z = torch.empty(tgt * d, dtype=dtype, **kw)
        self.expert = torch.empty(tgt, dtype=torch.long, **kw)
        self.token = torch.empty(tgt, dtype=torch.long, **kw)
        self.prob = torch.empty(tgt, dtype=torch.float32, **kw)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if torch.is_tensor(t))

    def io(self, shape: GraphShape) -> _StaticIO:
        B, Ly, Lx, d = shape.batch, shape.tgt_len, shape.src_len, self.d

        def v(flat: Tensor, *dims: int) -> Tensor:
            return flat[: math.prod(dims)].view(*dims)

        batch = PreparedBatch(
            v(self.src, B, Lx), v(self.src_mask, B, Lx), v(self.tgt_mask, B, Ly),
            v(self.z0, B, Ly, d), v(self.uniforms, B, Ly), v(self.token_uniforms, B, Ly),
            v(self.temperature, B), v(self.top_k, B),
        )  # fmt: skip
        return _StaticIO(
            batch, v(self.z, B, Ly, d), v(self.expert, B, Ly), v(self.token, B, Ly),
            v(self.prob, B, Ly),
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
        todo = [
            (shape, routing)
            for shape in ladder.shapes(cfg.max_length)
            for routing in ladder.routings
            if shape not in self.shapes(steps, routing)
        ]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
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
                graph = capturer(self._graph_fn(io, steps, routing))
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
            report.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved0
            report.device_bytes = free0 - torch.cuda.mem_get_info(self.device)[0]
        report.seconds = time.perf_counter() - t0
        return report

    def _fill_padding(self, io: _StaticIO, shape: GraphShape) -> None:
        """Every row a padding row: valid inputs for the warm-up runs and the capture."""
        none = empty_padded(GraphShape(0, 1, 1), self.model.config.d_model, self.dtype, self.device)
        pad_prepared(none, shape, self.model.config.pad_token_id, out=io.batch)

    def _graph_fn(self, io: _StaticIO, steps: int, routing: Routing) -> Callable[[], None]:
        """The captured work: static inputs -> solve -> greedy decode -> static outputs."""

        @torch.no_grad()
        def run() -> None:
            res = self.sampler.solve(io.batch, steps, routing)
            tok, prob = self._greedy(res.z)
            io.z.copy_(res.z)
            io.expert.copy_(res.expert)
            io.token.copy_(tok)
            io.prob.copy_(prob)

        return run

    def _greedy(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """`Sampler.decode`'s greedy path, kept on the device (no `.cpu()`, capturable):
        z [B, L, d] -> (tokens [B, L] long, probabilities [B, L] fp32)."""
        if z.is_cuda:
            from yan_kernels import ops

            if ops.use_triton():  # fused lm_head + online softmax: no [B, L, V] logits
                dec = self.model.decoder
                hid = dec.features(z)
                res = ops.decoder_argmax(
                    hid.reshape(-1, hid.shape[-1]), dec.lm_head.weight, dec.lm_head.bias
                )
                return res.token.view(z.shape[:-1]), res.prob.view(z.shape[:-1])
        logp = torch.log_softmax(self.model.decode_logits(z).float(), dim=-1)
        best, tok = logp.max(-1)
        return tok, best.exp()

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
        batch = self.sampler.prepare(requests)  # validation and per-request noise, as eager
        pad_prepared(batch, shape, self.model.config.pad_token_id, out=entry.io.batch)
        entry.graph.replay()
        entry.replays += 1
        self.stats["graph"] += 1
        n = len(requests)
        # copies (on CPU `.cpu()` would alias the static buffers, which are reused)
        tokens = entry.io.token[:n].to("cpu", copy=True)
        conf = entry.io.prob[:n].to("cpu", copy=True)
        hot = [i for i, r in enumerate(requests) if r.temperature > 0]
        if hot:  # sampled rows: decode the graph's final latent outside it (top-k, own uniforms)
            idx = torch.tensor(hot, device=self.device)
            rows = PreparedBatch(*(t[idx] for t in _batch_fields(entry.io.batch)))
            tok_h, conf_h = self.sampler.decode(entry.io.z[idx], rows)
            tokens[hot], conf[hot] = tok_h, conf_h
        expert = entry.io.expert[:n].to("cpu", copy=True)
        return assemble(requests, tokens, conf, expert, self.model.config.eos_token_id)
