"""Batch-independent YAN inference: requests in, tokens out (pure-torch reference path).

Every request owns a `torch.Generator` seeded from its `seed`; its z_0 and its expert draws
come from that generator alone, drawn at the request's own length on the CPU. So a request's
output does not depend on which other requests share its batch, nor on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from yan_serve.flow.solver import FrozenRoutingEuler, Routing, SolveResult
from yan_serve.model.yan import YAN


@dataclass
class GenerationRequest:
    src: Sequence[int]  # source token ids
    tgt_len: int  # number of target positions to generate (chosen by the caller, no oracle)
    seed: int = 0


@dataclass
class Generation:
    tokens: list[int]  # greedy tokens, cut before the first EOS
    finish_reason: str  # "eos" if an EOS was decoded, else "length"
    confidence: list[float]  # decoder probability of each kept token
    expert: list[int]  # frozen expert per target position
    previews: list[list[int]] | None = None  # tokens decoded at each of the T time points


@dataclass
class PreparedBatch:
    src: Tensor  # [B, Lx] long
    src_mask: Tensor  # [B, Lx] bool
    tgt_mask: Tensor  # [B, Ly] bool
    z0: Tensor  # [B, Ly, d]
    uniforms: Tensor  # [B, Ly]


def request_noise(seed: int, length: int, d: int, init_noise: float) -> tuple[Tensor, Tensor]:
    """The request's own draws: z_0 [length, d] ~ N(0, init_noise^2 I) and uniforms [length]."""
    g = torch.Generator().manual_seed(int(seed))
    z0 = torch.randn(length, d, generator=g) * init_noise
    u = torch.rand(length, generator=g)
    return z0, u


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
        for i, r in enumerate(requests):
            src[i, : len(r.src)] = torch.as_tensor(list(r.src), dtype=torch.long)
            src_mask[i, : len(r.src)] = True
            tgt_mask[i, : r.tgt_len] = True
            z0[i, : r.tgt_len], uniforms[i, : r.tgt_len] = request_noise(
                r.seed, r.tgt_len, cfg.d_model, cfg.init_noise
            )
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        return PreparedBatch(
            src.to(dev), src_mask.to(dev), tgt_mask.to(dev), z0.to(dev, dtype), uniforms.to(dev)
        )

    @torch.no_grad()
    def solve(
        self,
        batch: PreparedBatch,
        steps: int,
        routing: Routing = "sample",
        return_trajectory: bool = False,
        naive: bool = False,
    ) -> SolveResult:
        """Latents at t = 1 for a prepared batch (`naive` uses the T-pass reference schedule)."""
        m = self.model
        cond = m.condition(m.encode(batch.src, batch.src_mask), batch.src_mask, batch.tgt_mask)
        if naive:
            return self.solver.solve_naive(m.flow, batch.z0, cond, steps, routing, batch.uniforms)
        return self.solver.solve(
            m.flow, batch.z0, cond, steps, routing, batch.uniforms, return_trajectory
        )

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        steps: int | None = None,
        routing: Routing = "sample",
        return_previews: bool = False,
    ) -> list[Generation]:
        """Generate every request in one batch; results are independent of the batching."""
        steps = self.model.config.ode_steps if steps is None else steps
        batch = self.prepare(requests)
        res = self.solve(batch, steps, routing, return_trajectory=return_previews)
        tokens, conf = self.decode(res.z)
        previews = [self.decode(z)[0] for z in res.trajectory] if return_previews else None
        eos = self.model.config.eos_token_id
        out = []
        for i, r in enumerate(requests):
            toks = tokens[i, : r.tgt_len].tolist()
            cut = toks.index(eos) if eos in toks else len(toks)
            out.append(
                Generation(
                    tokens=toks[:cut],
                    finish_reason="eos" if cut < len(toks) else "length",
                    confidence=conf[i, :cut].tolist(),
                    expert=res.expert[i, : r.tgt_len].tolist(),
                    previews=[p[i, : r.tgt_len].tolist() for p in previews] if previews else None,
                )
            )
        return out

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy decode: z [B, L, d] -> (argmax tokens [B, L], their probabilities [B, L])."""
        logp = torch.log_softmax(self.model.decode_logits(z).float(), dim=-1)
        best, tok = logp.max(-1)
        return tok.cpu(), best.exp().cpu()
