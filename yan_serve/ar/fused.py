"""Fused GPT-2 decoding: a static-cache decode step with token choice and stopping on the device.

Hugging Face's GPT-2 forward costs a few hundred small operators per token plus Python module
overhead (masks, cache objects, output classes), which on a GPU means launch-bound decoding and
on a CPU means most of the time goes to the interpreter, not the arithmetic. `FusedGPT2` keeps
`StaticGPT2`'s cache layout and prefill (the same preallocated `[layers, batch, heads, length,
head_dim]` keys/values, `valid` slots, positions and slot counter), and replaces its decode step
with `decode_logp`, a plain function over the model's own parameters (shared, not copied):

- per layer: LayerNorm, one `addmm` for Q, K and V together, the new key/value written into the
  cache slot, SDPA over the window's valid slots, `addmm` output projection plus residual,
  LayerNorm, `addmm` + tanh-GELU, `addmm` + residual; then the final LayerNorm, the tied output
  projection (on the CPU through a [d, V] copy of the table, `FusedGPT2.head_t`) and
  log-softmax; the attention mask is made additive once per step, not once per layer;
- `torch.compile` can take the whole function (`step="compile"`; no graph breaks: it only reads
  its tensor arguments and writes the cache in place), so on a GPU inductor fuses the bias, GELU,
  residual and LayerNorm epilogues and the captured graph holds a few dozen kernels per token;
- or the same step with every linear layer one Triton GEMM that carries the LayerNorm before it
  in its prologue and the tanh GELU or the residual add after it in its epilogue
  (`step="triton"`, `decode_logp_fused_linear`, `ops.fused_linear` on the Conv1D weights as
  they are) and the cache writes inside the attention kernel (`ops.decode_attention`): 5
  launches per layer (QKV, attention, projection, MLP in, MLP out) and one for the final norm
  with the output projection; greedy windows then end in one `ops.greedy_select` launch
  (argmax, its probability, the token recorded, the stopping state and position updated)
  instead of a dozen small operators.

Token choice runs on the device too (`choose`): greedy argmax, or the same inverse-CDF sampling
as `yan_serve.engine.sampler.sample_tokens` (top-k restricted or over the whole vocabulary, per
row temperature and top-k), from uniforms drawn up front with each row's own seeded generator
(the reference draws the same numbers one step at a time). Each step also records the chosen
token and its probability in device buffers and updates a per-row `done` flag (EOS unless
`ignore_eos`, or the row's token budget spent), so the host reads nothing while decoding: it
replays `check_every` steps back to back, then reads one flag to see whether every row is done.
The token lists are cut on the host afterwards with exactly the reference loop's rules, so
`FusedRunner.generate` returns what `ar_generate` with Hugging Face's runner returns, token for
token (tests/ar/test_fused.py), whatever the batch-mates, padding and stopping rows.

On CUDA every window `(batch, length)` is one CUDA graph per token-choice mode (greedy captured
up front, sampling on first use); off CUDA the same code runs with `EagerReplay`, so the CPU tests
exercise the buffers, slot arithmetic and stopping exactly as the GPU does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2LMHeadModel
from yan_kernels import ops, pdl

from yan_serve.ar.generate import AROutput, ARRequest, collect_outputs, left_pad
from yan_serve.ar.static import DEFAULT_BATCH_SIZES, StaticGPT2, WindowedRunner
from yan_serve.engine.graphs import (
    Capturer,
    EagerReplay,
    Replayable,
)
from yan_serve.engine.sampler import effective_temperature

log = logging.getLogger("yan_serve.ar")

Layer = tuple[Tensor, ...]  # ln_1 w/b, qkv W/b, proj W/b, ln_2 w/b, fc W/b, out W/b


def decode_logp(
    tok: Tensor,
    pos: Tensor,
    slot: Tensor,
    valid: Tensor,
    kc: Tensor,
    vc: Tensor,
    wte: Tensor,
    wpe: Tensor,
    layers: list[Layer],
    ln_f: tuple[Tensor, Tensor],
    n_head: int,
    eps: float,
    head_t: Tensor | None = None,
) -> Tensor:
    """One decode step over a static cache window: tokens `tok` [B] at positions `pos` [B];
    their keys/values go into slot `slot` (a 1-element tensor) of `kc`/`vc` [layers, B, H, L, hd],
    attention reads the slots where `valid` [B, L] is true (the caller marks `slot` valid first).
    Returns the next token's log-probabilities [B, V], float32. Conv1D weights are [in, out].
    The output projection is `x @ head_t` when `head_t` ([d, V], the tied embedding transposed)
    is given, else `x @ wte.T`."""
    B = tok.shape[0]
    d = wte.shape[1]
    hd = d // n_head
    x = wte[tok] + wpe[pos]
    # one additive mask for every layer (SDPA would convert a boolean one per call)
    mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill_(
        ~valid, float("-inf")
    )[:, None, None, :]
    for i, (w1, b1, wqkv, bqkv, wo, bo, w2, b2, wfc, bfc, wout, bout) in enumerate(layers):
        a = F.layer_norm(x, (d,), w1, b1, eps)
        q, k, v = torch.addmm(bqkv, a, wqkv).view(B, 3, n_head, 1, hd).unbind(1)
        kc[i].index_copy_(2, slot, k)
        vc[i].index_copy_(2, slot, v)
        o = F.scaled_dot_product_attention(q, kc[i], vc[i], mask)
        x = x + torch.addmm(bo, o.reshape(B, d), wo)
        m = F.layer_norm(x, (d,), w2, b2, eps)
        x = x + torch.addmm(bout, F.gelu(torch.addmm(bfc, m, wfc), approximate="tanh"), wout)
    x = F.layer_norm(x, (d,), ln_f[0], ln_f[1], eps)
    logits = F.linear(x, wte) if head_t is None else x @ head_t
    return torch.log_softmax(logits.float(), -1)


def decode_logp_fused_linear(
    tok: Tensor,
    pos: Tensor,
    slot: Tensor,
    valid: Tensor,
    kc: Tensor,
    vc: Tensor,
    wte: Tensor,
    wpe: Tensor,
    layers: list[Layer],
    ln_f: tuple[Tensor, Tensor],
    n_head: int,
    eps: float,
    head_t: Tensor | None = None,
    raw: bool = False,
    counts: Tensor | None = None,
) -> Tensor:
    """`decode_logp` with each linear layer one `ops.fused_linear` call (the Triton GEMM where
    the kernels run, its reference elsewhere): the norms in the prologues, the tanh GELU and
    the residual adds in the epilogues, the final norm with the output projection; and the
    cache writes with the attention in one `ops.decode_attention` call per layer, which reads
    `valid` itself (no mask is built; `counts`: its arrival counters, shared by the layers).
    `head_t` is not used (the output projection reads the tied table in place). `raw`: return
    the logits [B, V] in the weights' dtype instead (for `ops.greedy_select`, which normalizes
    them itself)."""
    x = wte[tok] + wpe[pos]
    for i, (w1, b1, wqkv, bqkv, wo, bo, w2, b2, wfc, bfc, wout, bout) in enumerate(layers):
        qkv = ops.fused_linear(x, wqkv, bqkv, norm=(w1, b1, eps), transposed=True)
        o = ops.decode_attention(qkv, kc[i], vc[i], valid, slot, n_head, counts=counts)
        x = ops.fused_linear(o, wo, bo, residual=x, transposed=True)
        m = ops.fused_linear(x, wfc, bfc, norm=(w2, b2, eps), gelu=True, approximate="tanh",
                             transposed=True)  # fmt: skip
        x = ops.fused_linear(m, wout, bout, residual=x, transposed=True)
    logits = ops.fused_linear(x, wte, None, norm=(ln_f[0], ln_f[1], eps))
    return logits if raw else torch.log_softmax(logits.float(), -1)


STEPS = {"torch": decode_logp, "compile": decode_logp, "triton": decode_logp_fused_linear}


def choose(
    logp: Tensor, uniform: Tensor, temperature: Tensor, top_k: Tensor, sample: bool
) -> tuple[Tensor, Tensor]:
    """(token [B], its probability [B]) per row of log-probs [B, V]: argmax, or with `sample`,
    rows whose temperature is > 0 draw by inverse CDF with `uniform` [B] exactly as
    `sample_tokens` does for one row: over the top_k largest (sorted) when 0 < top_k < V, else
    over the whole vocabulary in index order."""
    nxt = logp.argmax(-1)
    if sample:
        V = logp.shape[-1]
        full = (top_k <= 0) | (top_k >= V)
        k = torch.where(full, V, top_k)
        vals, idx = logp.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(V, device=logp.device)
        vals = vals.masked_fill(ranks >= k[:, None], float("-inf"))
        src = torch.where(full[:, None], logp, vals)
        t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        cdf = torch.softmax(src / t[:, None], -1).cumsum(-1)
        pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
        pick = torch.minimum(pick, k - 1)
        drawn = torch.where(full, pick, idx.gather(-1, pick[:, None]).squeeze(-1))
        nxt = torch.where(temperature > 0, drawn, nxt)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1).exp()


class FusedGPT2(StaticGPT2):
    """`StaticGPT2`'s cache and prefill with the fused decode step and on-device token choice
    (see the module docstring)."""

    def __init__(
        self, model: GPT2LMHeadModel, max_batch: int, max_len: int, step: str = "torch"
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
        super().__init__(model, max_batch, max_len)
        tr = model.transformer
        self.eps = float(model.config.layer_norm_epsilon)
        self.layers: list[Layer] = [
            (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
             b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
             b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)
            for b in tr.h
        ]  # fmt: skip
        if model.lm_head.weight is not tr.wte.weight:
            raise ValueError("fused GPT-2 decoding needs tied input/output embeddings")
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        dev = self.device
        cols = max_len + 1  # the token chosen after slot s is recorded in column s + 1
        self.out_tok = torch.zeros(max_batch, cols, dtype=torch.long, device=dev)
        self.out_p = torch.zeros(max_batch, cols, dtype=torch.float32, device=dev)
        self.uniform = torch.zeros(max_batch, cols, dtype=torch.float32, device=dev)
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.stop_eos = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self.left = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.done = torch.ones(max_batch, dtype=torch.bool, device=dev)
        self.eos = torch.zeros(1, dtype=torch.long, device=dev)
        # the arrival counters of `ops.greedy_select` (per row) and `ops.decode_attention` (per
        # row and head, shared by the layers): zero between launches, so no memset in a graph
        self.select_counts = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.attn_counts = torch.zeros(max_batch * self.n_head, dtype=torch.int32, device=dev)
        self.trim = False  # set by the runner when steps replay eagerly (no CUDA graphs)
        self.host_slot = 0  # the host's copy of `slot`, for `trim`
        self.step = step
        self.body = STEPS[step]
        if step == "compile":
            # Automatic dynamic shapes (dynamic=None): the first window compiles for its exact
            # shape, the next recompiles with the sizes that changed symbolic, and later windows
            # reuse that (6 compiles for 28 windows on the CPU: size 1 is specialized). With
            # dynamic=False each of a server's ~35 windows was a compile of its own, and the
            # ninth hit dynamo's recompile limit, a hard error under fullgraph=True.
            self.body = torch.compile(decode_logp, fullgraph=True, dynamic=None)
        self._head_t: Tensor | None = None
        self._head_version = -1

    def head_t(self) -> Tensor | None:
        """On the CPU, the tied embedding transposed to [d, V] (contiguous), else None.

        At batch 1 the output projection is a GEMV over the whole vocabulary table, read from
        memory every token. On the CPU (MKL, one thread) a GEMV streams a [d, V] table about
        twice as fast as the [V, d] rows (`F.linear`), so the decode step reads a transposed
        copy: V x d more floats held, refreshed whenever the embedding changes in place (its
        version counter moves). GPUs read either layout at full rate and use the table itself."""
        if self.device.type != "cpu":
            return None
        w = self.model.transformer.wte.weight
        if self._head_t is None or self._head_version != w._version:
            self._head_t = w.detach().t().contiguous()
            self._head_version = w._version
        return self._head_t

    def select(self, logp: Tensor, n: int, col: Tensor, sample: bool) -> None:
        """Choose rows 0 .. n - 1's next tokens from `logp` [n, V]; record token and probability
        in column `col` (1 element); update `done`/`left`; the tokens become `tok`."""
        u = self.uniform[:n].index_select(1, col).squeeze(1)
        nxt, p = choose(logp, u, self.temperature[:n], self.top_k[:n], sample)
        self.out_tok[:n].index_copy_(1, col, nxt[:, None])
        self.out_p[:n].index_copy_(1, col, p[:, None])
        done, left = self.done[:n], self.left[:n]
        hit = ~done & self.stop_eos[:n] & (nxt == self.eos)
        left.sub_((~done & ~hit).long())
        done.logical_or_(hit | (left <= 0))
        self.tok[:n].copy_(nxt)

    def fused_step_fn(self, batch: int, length: int, sample: bool):
        """The fixed-shape decode step over window `(batch, length)`, token choice included:
        reads `tok[:batch]`, writes the next tokens back there, advances `slot` and `pos`."""
        kw, vw = self.k[:, :batch, :, :length], self.v[:, :batch, :, :length]
        valid = self.valid[:batch, :length]
        tok, pos = self.tok[:batch], self.pos[:batch]
        tr = self.model.transformer
        # the Triton step's greedy windows end in one kernel (choice, probability, stopping)
        one_kernel_end = self.step == "triton" and not sample
        # the Triton body reads the tied table in place: no transposed CPU copy for it
        head_t = self.head_t if self.step != "triton" else lambda: None
        state = (self.out_tok[:batch], self.out_p[:batch], self.slot, self.done[:batch],
                 self.left[:batch], self.stop_eos[:batch], self.eos, tok, pos)  # fmt: skip
        extra = {"counts": self.attn_counts} if self.step == "triton" else {}

        def run() -> None:
            valid.index_fill_(1, self.slot, True)
            # trimmed: attend over the slots written so far (a shape that changes every step,
            # so only without graphs); else the whole window, the padding slots masked
            n = self.host_slot + 1 if self.trim else length
            args = (tok, pos, self.slot, valid[:, :n], kw[..., :n, :], vw[..., :n, :],
                    tr.wte.weight, tr.wpe.weight, self.layers, self.ln_f, self.n_head, self.eps,
                    head_t())  # fmt: skip
            if one_kernel_end:
                logits = self.body(*args, raw=True, **extra)
                ops.greedy_select(logits, *state, counts=self.select_counts)
            else:
                self.select(self.body(*args, **extra), batch, self.slot + 1, sample)
                pos.add_(1)
            self.slot.add_(1)
            self.host_slot += 1

        return run


@dataclass
class _Window:
    batch: int
    length: int
    graphs: dict[bool, Replayable] = field(default_factory=dict)  # sample? -> graph


class FusedRunner(WindowedRunner):
    """Generation through captured windows of one `FusedGPT2`: `fits` says whether a batch can,
    `generate(requests, eos, pad)` returns `ar_generate`'s outputs. `check_every` steps run
    between two reads of the `done` flags (default 8 on CUDA, 1 elsewhere: a CPU pays for the
    steps, not the read). `step`: the decode step's body, "torch" (eager ops), "compile" (the
    same under torch.compile) or "triton" (`decode_logp_fused_linear`). `pdl`: whether the
    Triton kernels captured in its graphs use programmatic dependent launch
    (`yan_kernels.pdl`; None: as `YAN_KERNELS_PDL` says; sm_90 and newer only)."""

    def __init__(
        self,
        model: GPT2LMHeadModel,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        lengths: tuple[int, ...] | None = None,
        capturer: Capturer | None = None,
        step: str = "torch",
        check_every: int | None = None,
        pdl: bool | None = None,
    ) -> None:
        super().__init__(model, batch_sizes, lengths)
        self.pdl = pdl
        self.fused = FusedGPT2(model, self.batch_sizes[-1], self.lengths[-1], step=step)
        dev = self.fused.device
        self.capturer = capturer if capturer is not None else self.default_capturer(dev)
        self.fused.trim = self.capturer is EagerReplay
        self.check_every = check_every or (8 if dev.type == "cuda" else 1)
        self.windows: dict[tuple[int, int], _Window] = {}
        self.current: _Window | None = None

    @property
    def static(self) -> FusedGPT2:  # the name StaticRunner uses for its cache
        return self.fused

    def _capture(self, w: _Window, sample: bool) -> Replayable:
        s, b, n = self.fused, w.batch, w.length
        fn = s.fused_step_fn(b, n, sample)
        # warm-up and capture run the step for real: give it a sane state
        s.valid[:b, :n].zero_()
        s.valid[:b, 0] = True
        s.slot.zero_()
        s.host_slot = 0
        s.pos[:b] = 0
        s.tok[:b] = 0
        s.done[:b] = True
        launches = contextlib.nullcontext() if self.pdl is None else pdl.use(self.pdl)
        with torch.no_grad(), launches:
            w.graphs[sample] = self.capturer(fn)
        return w.graphs[sample]

    def capture(self, sample: bool = False) -> tuple[int, float]:
        """Capture every window's greedy step (and sampling step with `sample`), largest first.
        Returns (graphs, seconds)."""
        t0 = time.perf_counter()
        for b in reversed(self.batch_sizes):
            for n in reversed(self.lengths):
                w = self.windows.setdefault((b, n), _Window(b, n))
                for mode in (False, True) if sample else (False,):
                    if mode not in w.graphs:
                        self._capture(w, mode)
        return sum(len(w.graphs) for w in self.windows.values()), time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, requests: Sequence[ARRequest], eos: int, pad: int) -> list[AROutput]:
        s = self.fused
        ids, att, pos = left_pad(requests, pad, s.device)
        B, Lp = ids.shape
        limit = max(r.max_new for r in requests)
        key = self.window(B, Lp + limit)
        if key is None or key not in self.windows:
            raise ValueError(f"no captured window holds {B} x {Lp + limit}")
        if limit < 1:
            return collect_outputs(requests, [[] for _ in requests], [[] for _ in requests], eos)
        w = self.current = self.windows[key]
        sample = any(r.temperature > 0 for r in requests)
        graph = w.graphs.get(sample) or self._capture(w, sample)
        logp = s.prefill(ids, att, pos, w.batch)
        # per-row decoding state; padding rows are done from the start
        s.done[: w.batch] = True
        s.done[:B] = False
        s.left[:B] = torch.tensor([r.max_new for r in requests])
        s.stop_eos[:B] = torch.tensor([not r.ignore_eos for r in requests])
        s.eos.fill_(eos)
        s.temperature[:B] = torch.tensor([effective_temperature(r.temperature) for r in requests])
        s.top_k[:B] = torch.tensor([r.top_k for r in requests])
        if sample:
            s.uniform[: w.batch].zero_()
            for i, r in enumerate(requests):
                if r.temperature > 0:  # the reference's draws, one per step, taken up front
                    g = torch.Generator().manual_seed(int(r.seed))
                    s.uniform[i, Lp : Lp + limit] = torch.rand(limit, generator=g)
        s.host_slot = Lp  # after prefill, slot == Lp
        s.select(logp, B, s.slot.clone(), sample)
        steps = 0
        while steps < limit - 1:
            n = min(self.check_every, limit - 1 - steps)
            for _ in range(n):
                graph.replay()
            steps += n
            if bool(s.done[:B].all()):
                break
        toks = s.out_tok[:B, Lp : Lp + 1 + steps].tolist()
        probs = s.out_p[:B, Lp : Lp + 1 + steps].tolist()
        return collect_outputs(requests, toks, probs, eos)
