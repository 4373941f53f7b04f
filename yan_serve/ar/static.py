"""GPT-2 decoding with a static KV cache, one decode step captured per padded shape.

The AR baseline has to be as fast as a competent AR deployment, and at baseline sizes a decode
step is a few hundred tiny kernels: on a GPU, launch overhead, not arithmetic, sets the time
per token. So each decode step runs as one CUDA-graph replay, as vLLM and gpt-fast do.

A graph needs fixed shapes and fixed addresses, which Hugging Face's growing cache does not give.
`StaticGPT2` runs GPT-2's forward over the same `GPT2LMHeadModel` modules (its LayerNorms,
projections and MLP, so the weights are shared, not copied) with its own attention over a
preallocated cache `[layers, max_batch, heads, max_len, head_dim]`:

- `prefill` (eager, any length) writes the left-padded prompts into cache slots `0 .. Lp - 1`
  and marks the real ones valid;
- `step` (fixed shape) embeds one token per row at its own position, writes its key/value into
  slot `slot` (a 1-element tensor, so the slot moves without re-capture), attends over the
  `valid` slots of a `[batch, length]` window, and advances `slot` and the positions in place.
  Its output is the next token's log-probabilities, `[batch, vocab]` float32.

A shape `(batch, length)` reads a prefix window of the one cache, so every graph shares the same
buffers and one memory pool. A batch is served by the cheapest captured window holding its rows
and `prompt + new tokens` slots; rows past the real ones are padding (one valid slot, never read
back). Batches no window holds decode eagerly through Hugging Face (`HFRunner`), which is also the
reference: `ar_generate` gives the same tokens with either runner (tests/ar/test_static.py).

Off CUDA the same code runs with `EagerReplay` in place of graphs, so the CPU tests exercise the
static cache, the slot and position updates and the padding exactly as the GPU does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2LMHeadModel

from yan_serve.engine.graphs import (
    DEFAULT_BATCH_SIZES,
    Capturer,
    CudaGraphCapturer,
    EagerReplay,
    Replayable,
    length_buckets,
)

log = logging.getLogger("yan_serve.ar")


class HFRunner:
    """The reference runner: Hugging Face's forward with its growing cache (any shape)."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        self.model = model

    def start(self, ids: Tensor, att: Tensor, pos: Tensor, max_new: int) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        self.past, self.att, self.pos = out.past_key_values, att, pos[:, -1:] + 1
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    def step(self, tok: Tensor) -> Tensor:
        ones = torch.ones(self.att.shape[0], 1, dtype=self.att.dtype, device=self.att.device)
        self.att = torch.cat([self.att, ones], dim=1)
        out = self.model(input_ids=tok[:, None], attention_mask=self.att, position_ids=self.pos,
                         past_key_values=self.past, use_cache=True)  # fmt: skip
        self.past, self.pos = out.past_key_values, self.pos + 1
        return torch.log_softmax(out.logits[:, -1].float(), -1)


class StaticGPT2:
    """GPT-2 forward over a static KV cache (see the module docstring)."""

    def __init__(self, model: GPT2LMHeadModel, max_batch: int, max_len: int) -> None:
        cfg = model.config
        unsupported = [
            name for name, bad in (
                ("scale_attn_by_inverse_layer_idx", cfg.scale_attn_by_inverse_layer_idx),
                ("reorder_and_upcast_attn", cfg.reorder_and_upcast_attn),
                ("scale_attn_weights=False", not cfg.scale_attn_weights),
                (f"activation {cfg.activation_function}",
                 cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh")),
            ) if bad
        ]  # fmt: skip
        if unsupported:
            raise ValueError(f"static GPT-2 decoding does not support {unsupported[0]}")
        if max_len > cfg.n_positions:
            raise ValueError(f"max_len {max_len} exceeds the model's n_positions {cfg.n_positions}")
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.max_batch, self.max_len = max_batch, max_len
        shape = (cfg.n_layer, max_batch, cfg.n_head, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.valid = torch.zeros(max_batch, max_len, dtype=torch.bool, device=p.device)
        self.tok = torch.zeros(max_batch, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=p.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=p.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid))

    # -------------------------------------------------------------------------- the blocks
    def _blocks(self, x: Tensor, write, keys, values, mask: Tensor) -> Tensor:
        """x [B, T, d] through every block; `write(layer, k, v)` stores the new keys/values,
        then attention reads `keys(layer)` / `values(layer)` [B, H, L, hd] under `mask`."""
        B, T, d = x.shape
        tr = self.model.transformer
        for i, blk in enumerate(tr.h):
            a = blk.ln_1(x)
            q, k, v = blk.attn.c_attn(a).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
            write(i, k.transpose(1, 2), v.transpose(1, 2))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), keys(i), values(i), mask)
            x = x + blk.attn.c_proj(o.transpose(1, 2).reshape(B, T, d))
            x = x + blk.mlp(blk.ln_2(x))
        return tr.ln_f(x)

    def _logp(self, h: Tensor) -> Tensor:
        return torch.log_softmax(self.model.lm_head(h).float(), -1)

    # ----------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, ids: Tensor, att: Tensor, pos: Tensor, batch: int) -> Tensor:
        """Left-padded prompts `ids`/`att`/`pos` [B, Lp] into slots 0 .. Lp - 1 of rows 0 .. B - 1;
        rows B .. batch - 1 become padding. Returns the next token's log-probs [B, V]; the next
        `step` writes slot Lp at each row's next position."""
        B, Lp = ids.shape
        if batch < B or batch > self.max_batch or Lp >= self.max_len:
            raise ValueError(f"prefill of {B} x {Lp} does not fit {batch} rows x {self.max_len}")
        tr = self.model.transformer
        x = tr.wte(ids) + tr.wpe(pos)
        # key j is visible to query i if j <= i and j is a real token; every query also sees
        # itself, so a padding query never has an empty row (softmax of nothing is NaN, and a NaN
        # in the cache would leak through a zero attention weight later).
        idx = torch.arange(Lp, device=ids.device)
        causal = idx[None, :] <= idx[:, None]
        diag = torch.eye(Lp, dtype=torch.bool, device=ids.device)
        mask = (causal & att.bool()[:, None, :]) | diag
        mask = mask[:, None]  # [B, 1, Lp, Lp]

        def write(i: int, k: Tensor, v: Tensor) -> None:
            self.k[i, :B, :, :Lp] = k
            self.v[i, :B, :, :Lp] = v

        h = self._blocks(x, write, lambda i: self.k[i, :B, :, :Lp],
                         lambda i: self.v[i, :B, :, :Lp], mask)  # fmt: skip
        self.valid[:batch].zero_()
        self.valid[:B, :Lp] = att.bool()
        self.valid[B:batch, 0] = True  # padding rows attend to one (finite) slot
        self.pos[:B] = pos[:, -1] + 1
        self.pos[B:batch] = 0
        self.tok[B:batch] = 0
        self.slot.fill_(Lp)
        return self._logp(h[:, -1])

    # -------------------------------------------------------------------------------- step
    def step_fn(self, batch: int, length: int):
        """The fixed-shape decode step over window `(batch, length)`: reads `tok[:batch]`,
        returns log-probs [batch, V] and advances `slot` and `pos` (what a graph captures)."""
        tr = self.model.transformer
        kw, vw = self.k[:, :batch, :, :length], self.v[:, :batch, :, :length]
        valid = self.valid[:batch, :length]
        tok, pos = self.tok[:batch], self.pos[:batch]
        out: dict[str, Tensor] = {}

        def write(i: int, k: Tensor, v: Tensor) -> None:
            kw[i].index_copy_(2, self.slot, k)
            vw[i].index_copy_(2, self.slot, v)

        def run() -> None:
            valid.index_fill_(1, self.slot, True)
            x = (tr.wte(tok) + tr.wpe(pos))[:, None]
            h = self._blocks(x, write, lambda i: kw[i], lambda i: vw[i], valid[:, None, None, :])
            out["logp"] = self._logp(h[:, 0])
            pos.add_(1)
            self.slot.add_(1)

        return run, out


@dataclass
class _Window:
    batch: int
    length: int
    graph: Replayable
    out: dict[str, Tensor]


class WindowedRunner:
    """What the graph runners share: captured (batch, length) windows. The ladder is
    `batch_sizes` x `lengths` (ascending; lengths default to power-of-two buckets from 64 up to
    the model's context); subclasses fill `windows`, keyed by (batch, length)."""

    def __init__(
        self,
        model: GPT2LMHeadModel,
        batch_sizes: tuple[int, ...],
        lengths: tuple[int, ...] | None,
    ) -> None:
        lengths = lengths or length_buckets(model.config.n_positions, smallest=64)
        if any(n < 1 for n in (*batch_sizes, *lengths)):
            raise ValueError("batch sizes and lengths must be >= 1")
        self.batch_sizes, self.lengths = tuple(sorted(batch_sizes)), tuple(sorted(lengths))
        self.windows: dict = {}
        self.current = None

    @staticmethod
    def default_capturer(device: torch.device) -> Capturer:
        """CUDA graphs on a GPU, eager replay of the same buffers elsewhere."""
        return CudaGraphCapturer(device) if device.type == "cuda" else EagerReplay

    def window(self, batch: int, slots: int) -> tuple[int, int] | None:
        """The smallest (batch, length) window holding `batch` rows and `slots` cache slots."""
        b = next((x for x in self.batch_sizes if x >= batch), None)
        n = next((x for x in self.lengths if x >= slots), None)
        return None if b is None or n is None else (b, n)

    def fits(self, batch: int, prompt_len: int, max_new: int) -> bool:
        w = self.window(batch, prompt_len + max_new)
        return w is not None and w in self.windows


class StaticRunner(WindowedRunner):
    """Decoding through captured windows of one `StaticGPT2`; `fits` says whether a batch can.

    The runner interface `start(ids, att, pos, max_new) -> logp`, `step(tok) -> logp` is the one
    `ar_generate` drives, shared with `HFRunner`."""

    def __init__(
        self,
        model: GPT2LMHeadModel,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        lengths: tuple[int, ...] | None = None,
        capturer: Capturer | None = None,
    ) -> None:
        super().__init__(model, batch_sizes, lengths)
        self.static = StaticGPT2(model, self.batch_sizes[-1], self.lengths[-1])
        self.capturer = (
            capturer if capturer is not None else self.default_capturer(self.static.device)
        )
        self.windows: dict[tuple[int, int], _Window] = {}
        self.current: _Window | None = None

    def capture(self) -> tuple[int, float]:
        """Capture every window, largest first (smaller ones reuse the pool). Returns
        (graphs, seconds)."""
        t0 = time.perf_counter()
        s = self.static
        for b in reversed(self.batch_sizes):
            for n in reversed(self.lengths):
                fn, out = s.step_fn(b, n)
                # warm-up and capture run the step for real: give it a sane state, then reset
                s.valid[:b, :n].zero_()
                s.valid[:b, 0] = True
                s.slot.fill_(0)
                s.pos[:b] = 0
                s.tok[:b] = 0
                with torch.no_grad():
                    graph = self.capturer(fn)
                self.windows[(b, n)] = _Window(b, n, graph, out)
        return len(self.windows), time.perf_counter() - t0

    def start(self, ids: Tensor, att: Tensor, pos: Tensor, max_new: int) -> Tensor:
        key = self.window(ids.shape[0], ids.shape[1] + max_new)
        if key is None or key not in self.windows:
            raise ValueError(f"no captured window holds {ids.shape[0]} x {ids.shape[1] + max_new}")
        self.current = self.windows[key]
        return self.static.prefill(ids, att, pos, self.current.batch)

    def step(self, tok: Tensor) -> Tensor:
        w = self.current
        if w is None:
            raise RuntimeError("step() before start()")
        self.static.tok[: tok.shape[0]].copy_(tok)
        w.graph.replay()
        return w.out["logp"][: tok.shape[0]]
