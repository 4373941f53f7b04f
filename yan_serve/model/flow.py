"""The latent flow: time-conditioned trunk, K expert vector fields and the routing gate.

`FlowNet` implements the `MoEVectorField` protocol of `yan_serve.flow.solver`, so the same
Euler solver drives YAN and the 2-D toy model. One trunk pass at (z_t, t) yields a state from
which the gate and any expert can be read; experts are stacked tensors (`w1 [K, d, 4d]`, ...)
so that all-expert training and routed inference share one set of weights. With
`cfg.flow_use_mamba` each trunk block mixes target positions with the bidirectional Mamba
mixer instead of self-attention, keeping its cross-attention and adaptive norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from yan_kernels import ops

from yan_serve.config import YANConfig
from yan_serve.model.layers import (
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    SinusoidalTimeFeatures,
    adaptive_norm,
)
from yan_serve.model.mamba import BiMamba


@dataclass
class FlowCondition:
    """Everything the trunk needs besides (z_t, t); built once per solve."""

    pos: Tensor  # [L, d] position embeddings of the target positions
    tgt_mask: Tensor  # [B, L] bool
    src: Tensor  # [B, Lx, d] encoded source
    src_mask: Tensor  # [B, Lx] bool
    src_pooled: Tensor  # [B, d] masked mean of the encoded source


@dataclass
class TrunkState:
    """One trunk evaluation: read the gate and the experts from it."""

    h: Tensor  # [B, L, d] trunk output (after the final norm)
    t_emb: Tensor  # [B, d]
    mask: Tensor  # [B, L] bool
    src_pooled: Tensor  # [B, d]


class FlowBlock(nn.Module):
    """self-attn -> [cross-attn to the source] -> FFN, each behind an adaptive LayerNorm.

    With `cfg.flow_use_mamba` the `self_att` slot holds a `BiMamba` mixer (same call).
    """

    def __init__(self, cfg: YANConfig, cross: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.has_cross = cross
        self.self_att: nn.Module = (
            BiMamba.from_config(cfg)
            if cfg.flow_use_mamba
            else MultiHeadAttention(d, cfg.attention_heads, cfg.qkv_bias, cfg.dropout)
        )
        if cross:
            self.cross_att = MultiHeadAttention(d, cfg.attention_heads, cfg.qkv_bias, cfg.dropout)
        self.ff = FeedForward(d, cfg.d_ffn)
        # chunks: (scale, shift) self-attn norm, (scale, shift) FFN norm, [(scale, shift) cross]
        self.adaLN = nn.Sequential(nn.GELU(), nn.Linear(d, (6 if cross else 4) * d))
        self.drop = nn.Dropout(cfg.dropout)
        # The form is `scale * norm(x) + shift` (no 1 +), so start every scale at 1: with Linear's
        # default init the scales would start near 0 and mute the trunk at initialisation.
        with torch.no_grad():
            self.adaLN[1].bias.view(-1, d)[0::2].fill_(1.0)

    def forward(self, x: Tensor, t_emb: Tensor, cond: FlowCondition) -> Tensor:
        """x: [B, L, d], t_emb: [B, d] -> [B, L, d]."""
        mods = self.adaLN(t_emb).chunk(6 if self.has_cross else 4, dim=-1)
        m = cond.tgt_mask[..., None].to(x.dtype)
        x = x + self.drop(self.self_att(adaptive_norm(x, mods[0], mods[1]), cond.tgt_mask))
        if self.has_cross:
            q = adaptive_norm(x, mods[4], mods[5])
            x = x + self.drop(self.cross_att(q, cond.tgt_mask, cond.src, cond.src_mask))
        x = x + self.drop(self.ff(adaptive_norm(x, mods[2], mods[3]))) * m
        return x


class Experts(nn.Module):
    """K feed-forward vector fields d -> 4d -> d, stacked: w1 [K, d, 4d], w2 [K, 4d, d]."""

    def __init__(self, n_experts: int, d: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d, d_hidden))
        self.b1 = nn.Parameter(torch.empty(n_experts, d_hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d))
        self.b2 = nn.Parameter(torch.empty(n_experts, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def all(self, h: Tensor) -> Tensor:
        """Every expert at every token: h [B, L, d] -> [B, L, K, d]."""
        a = F.gelu(torch.einsum("bld,kdf->blkf", h, self.w1) + self.b1)
        return torch.einsum("blkf,kfd->blkd", a, self.w2) + self.b2

    def routed(self, h: Tensor, expert: Tensor) -> Tensor:
        """Only the routed expert per token: h [B, L, d], expert [B, L] long -> [B, L, d].

        Each token costs one FFN, not K: the facade `yan_kernels.ops.routed_expert` (the fused
        kernel where it runs, else tokens grouped by expert in torch).
        """
        flat = ops.routed_expert(
            h.reshape(-1, h.shape[-1]), expert.reshape(-1), self.w1, self.b1, self.w2, self.b2
        )
        return flat.view_as(h)


class FlowNet(nn.Module):
    """Trunk + experts + gate; the MoE vector field of YAN's latent ODE."""

    def __init__(self, cfg: YANConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.time_emb = nn.Sequential(SinusoidalTimeFeatures(d), nn.Linear(d, d), nn.GELU())
        self.drop = nn.Dropout(cfg.dropout)
        cross = set(cfg.cross_att_idx)
        self.trf_blocks = nn.ModuleList(FlowBlock(cfg, i in cross) for i in range(cfg.n_trf_blocks))
        self.final_norm = LayerNorm(d)
        self.experts = Experts(cfg.moe_n_experts, d, cfg.d_ffn)
        self.gate = nn.Sequential(
            nn.Linear(3 * d, cfg.gate_dim), nn.GELU(), nn.Linear(cfg.gate_dim, cfg.moe_n_experts)
        )
        self.gate_temperature = cfg.moe_gate_temperature

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    # ------------------------------------------------------- MoEVectorField
    def trunk(self, z: Tensor, t: Tensor, cond: FlowCondition) -> TrunkState:
        """z: [B, L, d], t: [B] in [0, 1] -> TrunkState (h [B, L, d])."""
        t_emb = self.time_emb(t.to(z.dtype))  # [B, d]
        x = self.drop(z + cond.pos[None, : z.shape[1]])
        for blk in self.trf_blocks:
            x = blk(x, t_emb, cond)
        h = self.final_norm(x)
        return TrunkState(h=h, t_emb=t_emb, mask=cond.tgt_mask, src_pooled=cond.src_pooled)

    def gate_logits(self, s: TrunkState) -> Tensor:
        """[B, L, K] logits / temperature; exactly 0 at padding, so pads route uniformly."""
        B, L, d = s.h.shape
        feats = torch.cat(
            [s.h, s.src_pooled[:, None].expand(B, L, d), s.t_emb[:, None].expand(B, L, d)], -1
        )
        logits = self.gate(feats) / self.gate_temperature
        return logits.masked_fill(~s.mask[..., None], 0.0)

    def expert_fields(self, s: TrunkState) -> Tensor:
        """All K vector fields: [B, L, K, d], zero at padding."""
        return self.experts.all(s.h) * s.mask[..., None, None].to(s.h.dtype)

    def routed_field(self, s: TrunkState, expert: Tensor) -> Tensor:
        """The routed expert's vector field: expert [B, L] -> [B, L, d], zero at padding."""
        return self.experts.routed(s.h, expert) * s.mask[..., None].to(s.h.dtype)
