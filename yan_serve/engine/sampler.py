"""Batch-independent YAN inference: requests in, tokens out (pure-torch reference path).

Every request owns a `torch.Generator` seeded from its `seed`; its z_0, its expert draws and its
token-sampling draws come from that generator alone, drawn at the request's own length on the
CPU. So a request's output does not depend on which other requests share its batch, nor on the
device.

Decoding is greedy by default; a request with `temperature > 0` samples each position from the
tempered (optionally top-k) decoder distribution by inverse CDF with its own uniforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from yan_serve.flow.solver import FrozenRoutingEuler, Routing, SolveResult
from yan_serve.model.yan import YAN


@dataclass
class GenerationRequest:
    src: Sequence[int]  # source token ids
    tgt_len: int  # number of target positions to generate (chosen by the caller, no oracle)
    seed: int = 0
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # with temperature > 0: sample among the k most likely tokens (0: all)


@dataclass
class Generation:
    tokens: list[int]  # greedy tokens, cut before the first EOS
    finish_reason: str  # "eos" if an EOS was decoded, else "length"
    confidence: list[float]  # decoder probability of each kept token
    expert: list[int]  # frozen expert per target position
    previews: list[list[int]] | None = None  # tokens decoded at each of the T time points
    full: list[int] = field(default_factory=list)  # all tgt_len decoded tokens (EOS not cut)
    full_confidence: list[float] = field(default_factory=list)  # their decoder probabilities


@dataclass
class PreparedBatch:
    src: Tensor  # [B, Lx] long
    src_mask: Tensor  # [B, Lx] bool
    tgt_mask: Tensor  # [B, Ly] bool
    z0: Tensor  # [B, Ly, d]
    uniforms: Tensor  # [B, Ly] expert draws
    token_uniforms: Tensor  # [B, Ly] token-sampling draws
    temperature: Tensor  # [B]
    top_k: Tensor  # [B] long


def request_noise(
    seed: int, length: int, d: int, init_noise: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The request's own draws: z_0 [length, d] ~ N(0, init_noise^2 I), expert uniforms
    [length] and token-sampling uniforms [length], in that order from one generator."""
    g = torch.Generator().manual_seed(int(seed))
    z0 = torch.randn(length, d, generator=g) * init_noise
    u = torch.rand(length, generator=g)
    u_tok = torch.rand(length, generator=g)
    return z0, u, u_tok


StepCallback = Callable[[int, Tensor], None]  # (time-point index, tokens [B, Ly]) per preview


class Sampler:
    """Encode once, solve the latent ODE with frozen routing, decode greedily, cut at EOS."""

    def __init__(self, model: YAN, solver: FrozenRoutingEuler | None = None) -> None:
        self.model = model
        self.solver = solver or FrozenRoutingEuler()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, requests: Sequence[GenerationRequest]) -> PreparedBatch:
        """Pad sources and targets to the batch maximum; draw each request's noise."""
        if not requests:
            raise ValueError("no requests")
        cfg = self.model.config
        for r in requests:
            if len(r.src) == 0:
                raise ValueError("a request has an empty source")
            if r.tgt_len < 1:
                raise ValueError(f"tgt_len must be >= 1, got {r.tgt_len}")
            if r.temperature < 0 or r.top_k < 0:
                raise ValueError("temperature and top_k must be >= 0")
            bad = [t for t in r.src if not 0 <= int(t) < cfg.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} outside the vocabulary of {cfg.vocab_size}")
            self.model.check_length(len(r.src), "source")
            self.model.check_length(r.tgt_len, "target")
        B, Lx, Ly = (
            len(requests),
            max(len(r.src) for r in requests),
            max(r.tgt_len for r in requests),
        )
        src = torch.full((B, Lx), cfg.pad_token_id, dtype=torch.long)
        src_mask = torch.zeros(B, Lx, dtype=torch.bool)
        tgt_mask = torch.zeros(B, Ly, dtype=torch.bool)
        z0 = torch.zeros(B, Ly, cfg.d_model)
        uniforms = torch.zeros(B, Ly)
        token_uniforms = torch.zeros(B, Ly)
        for i, r in enumerate(requests):
            src[i, : len(r.src)] = torch.as_tensor(list(r.src), dtype=torch.long)
            src_mask[i, : len(r.src)] = True
            tgt_mask[i, : r.tgt_len] = True
            z0[i, : r.tgt_len], uniforms[i, : r.tgt_len], token_uniforms[i, : r.tgt_len] = (
                request_noise(r.seed, r.tgt_len, cfg.d_model, cfg.init_noise)
            )
        temperature = torch.tensor([float(r.temperature) for r in requests])
        top_k = torch.tensor([int(r.top_k) for r in requests], dtype=torch.long)
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        return PreparedBatch(
            src.to(dev), src_mask.to(dev), tgt_mask.to(dev), z0.to(dev, dtype), uniforms.to(dev),
            token_uniforms.to(dev), temperature.to(dev), top_k.to(dev),
        )  # fmt: skip

    @torch.no_grad()
    def solve(
        self,
        batch: PreparedBatch,
        steps: int,
        routing: Routing = "sample",
        return_trajectory: bool = False,
        naive: bool = False,
        step_hook: Callable[[int, Tensor], None] | None = None,
    ) -> SolveResult:
        """Latents at t = 1 for a prepared batch (`naive` uses the T-pass reference schedule).
        `step_hook(i, z)` sees the state at every time point as soon as it is computed."""
        m = self.model
        cond = m.condition(m.encode(batch.src, batch.src_mask), batch.src_mask, batch.tgt_mask)
        if naive:
            return self.solver.solve_naive(m.flow, batch.z0, cond, steps, routing, batch.uniforms)
        return self.solver.solve(
            m.flow, batch.z0, cond, steps, routing, batch.uniforms, return_trajectory, step_hook
        )

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        steps: int | None = None,
        routing: Routing = "sample",
        return_previews: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[Generation]:
        """Generate every request in one batch; results are independent of the batching.

        `on_step(i, tokens)` is called with the greedy tokens decoded at each time point as soon
        as the solver reaches it (progressive previews for streaming)."""
        steps = self.model.config.ode_steps if steps is None else steps
        batch = self.prepare(requests)
        want_traj = return_previews or on_step is not None
        previews: list[Tensor] = []

        def step_hook(i: int, z: Tensor) -> None:
            toks = self.decode(z)[0]
            previews.append(toks)
            if on_step is not None:
                on_step(i, toks)

        res = self.solve(batch, steps, routing, step_hook=step_hook if want_traj else None)
        tokens, conf = self.decode(res.z, batch)
        return assemble(requests, tokens, conf, res.expert, self.model.config.eos_token_id,
                        previews if return_previews else None)  # fmt: skip

    @torch.no_grad()
    def score(
        self,
        requests: Sequence[GenerationRequest],
        targets: Sequence[Sequence[int]],
        steps: int | None = None,
        routing: Routing = "sample",
    ) -> list[list[float]]:
        """Decoder log-probability of each given target token, per position: the request's
        latent is generated as usual (`tgt_len` must equal the target's length), then scored.

        Requests that are the same (source, length, seed and sampling fields) have the same
        latent, so it is solved and decoded once and every target sharing it is read from the
        one [L, V] table: scoring K candidate labels costs one sample, not K."""
        if len(targets) != len(requests):
            raise ValueError("one target per request")
        for r, t in zip(requests, targets, strict=False):
            if len(t) != r.tgt_len:
                raise ValueError(f"target of {len(t)} tokens for tgt_len {r.tgt_len}")
        steps = self.model.config.ode_steps if steps is None else steps
        row: dict[tuple, int] = {}  # a distinct request -> its row in `unique`
        unique: list[GenerationRequest] = []
        which = []
        for r in requests:
            key = (tuple(r.src), r.tgt_len, r.seed, r.temperature, r.top_k)
            if key not in row:
                row[key] = len(unique)
                unique.append(r)
            which.append(row[key])
        batch = self.prepare(unique)
        z = self.solve(batch, steps, routing).z
        logp = torch.log_softmax(self.model.decode_logits(z).float(), dim=-1)
        out = []
        for i, t in zip(which, targets, strict=True):
            idx = torch.as_tensor(list(t), dtype=torch.long, device=logp.device)
            out.append(logp[i, torch.arange(len(t), device=logp.device), idx].tolist())
        return out

    def decode(self, z: Tensor, batch: PreparedBatch | None = None) -> tuple[Tensor, Tensor]:
        """z [B, L, d] -> (tokens [B, L], their decoder probabilities [B, L]).

        Greedy, except rows of `batch` with temperature > 0, which sample by inverse CDF from
        their own token uniforms (top-k restricted when top_k > 0)."""
        if z.is_cuda:  # fused lm_head + argmax (yan_kernels.decoder_argmax): no [B, L, V] logits
            from yan_kernels import ops

            if ops.use_triton():
                dec = self.model.decoder
                hid = dec.features(z)  # [B, L, d]
                res = ops.decoder_argmax(
                    hid.reshape(-1, hid.shape[-1]), dec.lm_head.weight, dec.lm_head.bias
                )
                tok, best = res.token.view(z.shape[:-1]), res.prob.view(z.shape[:-1])
                hot = [] if batch is None else (batch.temperature > 0).nonzero().flatten().tolist()
                for i in hot:  # sampled rows keep the reference draw (inverse CDF, top-k)
                    row = dec.lm_head(hid[i]).float()  # [L, V]
                    tok[i] = sample_tokens(
                        row, float(batch.temperature[i]), int(batch.top_k[i]),
                        batch.token_uniforms[i],
                    )  # fmt: skip
                    logp_i = torch.log_softmax(row, dim=-1)
                    best[i] = logp_i.gather(-1, tok[i][:, None]).squeeze(-1).exp()
                return tok.cpu(), best.cpu()
        logits = self.model.decode_logits(z).float()
        logp = torch.log_softmax(logits, dim=-1)
        best, tok = logp.max(-1)
        if batch is not None and bool((batch.temperature > 0).any()):
            rows = (batch.temperature > 0).nonzero().flatten()
            for i in rows.tolist():
                tok[i] = sample_tokens(
                    logits[i], float(batch.temperature[i]), int(batch.top_k[i]),
                    batch.token_uniforms[i],
                )  # fmt: skip
            best = logp.gather(-1, tok[..., None]).squeeze(-1)
        return tok.cpu(), best.exp().cpu()


def assemble(
    requests: Sequence[GenerationRequest],
    tokens: Tensor,  # [B, L] long, L >= every tgt_len
    conf: Tensor,  # [B, L]
    expert: Tensor,  # [B, L]
    eos: int,
    previews: list[Tensor] | None = None,  # T x [B, L]
) -> list[Generation]:
    """Per-request `Generation`s from decoded rows, cut at the first EOS."""
    out = []
    for i, r in enumerate(requests):
        toks = tokens[i, : r.tgt_len].tolist()
        probs = conf[i, : r.tgt_len].tolist()
        cut = toks.index(eos) if eos in toks else len(toks)
        out.append(
            Generation(
                tokens=toks[:cut],
                finish_reason="eos" if cut < len(toks) else "length",
                confidence=probs[:cut],
                expert=expert[i, : r.tgt_len].tolist(),
                previews=[p[i, : r.tgt_len].tolist() for p in previews] if previews else None,
                full=toks,
                full_confidence=probs,
            )
        )
    return out


def sample_tokens(logits: Tensor, temperature: float, top_k: int, uniforms: Tensor) -> Tensor:
    """One token per row of logits [L, V] from softmax(logits / temperature), restricted to the
    top_k largest when top_k > 0, by inverse CDF with uniforms [L] in [0, 1)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)  # sorted, so ties break the same way everywhere
    else:
        vals, idx = logits, None
    probs = torch.softmax(vals / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True)
    pick = pick.clamp_max(vals.shape[-1] - 1).squeeze(-1)
    return pick if idx is None else idx.gather(-1, pick[:, None]).squeeze(-1)
