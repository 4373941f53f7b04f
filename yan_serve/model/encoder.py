"""Bidirectional pre-LN encoder, shared by source and target (z_1 = E(y)).

Each block mixes positions with self-attention, or with the bidirectional Mamba mixer when
`cfg.encoder_use_mamba` (same slot and call, `self_att(x, mask)`; see model/mamba.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from yan_serve.config import YANConfig
from yan_serve.model.layers import FeedForward, LayerNorm, MultiHeadAttention
from yan_serve.model.mamba import BiMamba


class EncoderBlock(nn.Module):
    def __init__(self, cfg: YANConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_self_att = LayerNorm(d)
        self.self_att: nn.Module = (
            BiMamba.from_config(cfg)
            if cfg.encoder_use_mamba
            else MultiHeadAttention(d, cfg.attention_heads, cfg.qkv_bias, cfg.dropout)
        )
        self.norm_ff = LayerNorm(d)
        self.ff = FeedForward(d, cfg.d_ffn)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, L, d], mask: [B, L] bool -> [B, L, d]."""
        m = mask[..., None].to(x.dtype)
        x = x + self.drop(self.self_att(self.norm_self_att(x), mask))
        x = x + self.drop(self.ff(self.norm_ff(x))) * m
        return x


class Encoder(nn.Module):
    """Embedded tokens -> latents `[B, L, d]` (final LayerNorm, optional training noise)."""

    def __init__(self, cfg: YANConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.trf_blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_n_trf_blocks))
        self.final_norm = LayerNorm(cfg.d_model)
        self.latent_noise = cfg.latent_noise

    def forward(
        self,
        x: Tensor,  # [B, L, d] token + position embeddings
        mask: Tensor,  # [B, L] bool
        add_noise: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        x = self.drop(x)
        for blk in self.trf_blocks:
            x = blk(x, mask)
        z = self.final_norm(x)
        if add_noise and self.latent_noise > 0:
            # one noise level u ~ U(0, latent_noise) per sequence (spec section 1)
            B = z.shape[0]
            u = torch.rand(B, 1, 1, generator=generator, device=z.device) * self.latent_noise
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z + u.to(z.dtype) * eps
        return z * mask[..., None].to(z.dtype)
