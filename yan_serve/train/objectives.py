"""The two training objectives of YAN as functions of a model and a batch.

Stage 1 trains the latent autoencoder (embeddings, encoder, decoder); stage 2 trains the flow
(trunk, experts, gate) on the frozen autoencoder's latents, with a CE term through the unrolled
frozen-routing Euler solve.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from yan_serve.flow.losses import (
    distill_mse,
    gate_entropy,
    load_balance_kl,
    mmd2,
    moe_fm_nll,
    scale_loss,
    token_ce,
)
from yan_serve.flow.path import LinearPath
from yan_serve.flow.solver import FrozenRoutingEuler, Routing
from yan_serve.model.yan import YAN


@dataclass
class Stage1Weights:
    ce: float = 1.0
    mmd: float = 1.0
    scale: float = 0.01
    mmd_samples: int = 512  # the spec allows <= 2000; 512 keeps the O(N^2) kernel cheap on CPU


@dataclass
class Stage2Weights:
    fm: float = 1.0  # MoE-FM NLL
    ce: float = 1.0  # CE of D(z1_hat): essential, the NLL alone lands on wrong tokens
    entropy: float = 0.0  # gate entropy bonus (subtracted)
    balance: float = 0.0  # KL(mean gate || uniform)
    distill: float = 0.0  # ||z1_hat - z1||^2


def stage1_loss(
    model: YAN,
    corrupted: Tensor,  # [B, L] corrupted tokens, right-padded with <pad> to the target length
    targets: Tensor,  # [B, L] clean tokens, position-aligned with `corrupted`
    mask: Tensor,  # [B, L] bool, the target's valid positions
    weights: Stage1Weights | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Regularized denoising autoencoder: CE(D(E(corrupt(y))), y) + MMD^2(z, N(0, I)) + mean z^2.

    The encoder reads the corrupted sequence over the target's positions (a collapsed mask span
    leaves <pad> slots at the tail), adds training latent noise, and the decoder must recover the
    clean token at every target position. Returns the weighted `loss` and each term.
    """
    w = weights or Stage1Weights()
    z = model.encode(corrupted, mask, add_noise=model.training, generator=generator)
    ce = token_ce(model.decode_logits(z), targets, mask)
    terms = {"ce": ce}
    loss = w.ce * ce
    if w.mmd:
        terms["mmd"] = mmd2(z[mask].float(), max_samples=w.mmd_samples, generator=generator)
        loss = loss + w.mmd * terms["mmd"]
    if w.scale:
        terms["scale"] = scale_loss(z, mask)
        loss = loss + w.scale * terms["scale"]
    terms["loss"] = loss
    return terms


def stage2_loss(
    model: YAN,
    src: Tensor,  # [B, Lx]
    src_mask: Tensor,  # [B, Lx] bool
    tgt: Tensor,  # [B, Ly]
    tgt_mask: Tensor,  # [B, Ly] bool
    weights: Stage2Weights | None = None,
    steps: int | None = None,
    routing: Routing = "sample",
    freeze_autoencoder: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """MoE-FM NLL at a random time on the linear path + CE through the unrolled Euler solve.

    z_1 = E(y) (no latent noise), z_0 ~ N(0, init_noise^2 I), t ~ Beta(a, b) per sequence. The
    solve from the same z_0 uses `steps` time points (default `train_ode_steps`) with experts
    drawn once from pi(z_0, 0); gradients flow through every Euler step into the trunk, the
    experts and (through the NLL) the gate.
    """
    cfg = model.config
    w = weights or Stage2Weights()
    steps = cfg.train_ode_steps if steps is None else steps
    dev = src.device
    gdev = generator.device if generator is not None else dev
    frozen = torch.no_grad() if freeze_autoencoder else contextlib.nullcontext()
    with frozen:
        src_h = model.encode(src, src_mask)
        z1 = model.encode(tgt, tgt_mask)
    cond = model.condition(src_h, src_mask, tgt_mask)
    m = tgt_mask[..., None].to(z1.dtype)

    z0 = torch.randn(z1.shape, generator=generator, device=gdev).to(dev, z1.dtype)
    z0 = z0 * cfg.init_noise * m
    path = LinearPath(cfg.beta_a, cfg.beta_b)
    t = path.sample_t(z1.shape[0], dev, generator)
    ps = path.sample(z0, z1, t)

    state = model.flow.trunk(ps.x_t, t, cond)
    logits = model.flow.gate_logits(state)
    nll = moe_fm_nll(model.flow.expert_fields(state), logits, ps.dx_t, tgt_mask, cfg.moe_sigma)

    uniforms = torch.rand(tgt.shape, generator=generator, device=gdev).to(dev)
    z1_hat = FrozenRoutingEuler().solve(model.flow, z0, cond, steps, routing, uniforms).z
    ce = token_ce(model.decode_logits(z1_hat), tgt, tgt_mask)

    terms = {"nll": nll, "ce": ce}
    loss = w.fm * nll + w.ce * ce
    if w.entropy:
        terms["entropy"] = gate_entropy(logits, tgt_mask)
        loss = loss - w.entropy * terms["entropy"]
    if w.balance:
        terms["balance"] = load_balance_kl(logits, tgt_mask)
        loss = loss + w.balance * terms["balance"]
    if w.distill:
        terms["distill"] = distill_mse(z1_hat, z1, tgt_mask)
        loss = loss + w.distill * terms["distill"]
    terms["loss"] = loss
    return terms
