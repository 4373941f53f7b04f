"""Position-wise decoder: residual FFN blocks, then an untied `Linear(d, V)` with bias."""

from __future__ import annotations

from torch import Tensor, nn

from yan_serve.config import YANConfig
from yan_serve.model.layers import FeedForward, LayerNorm


class ResidualBlock(nn.Module):
    def __init__(self, cfg: YANConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.d_ffn)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.ff(self.norm(x)))


class Decoder(nn.Module):
    """Latents [..., d] -> hidden [..., d] (`features`) -> logits [..., V] (`lm_head`).

    Every position decodes independently, which is what makes one-shot decoding possible.
    """

    def __init__(self, cfg: YANConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.resi_blocks = nn.ModuleList(
            ResidualBlock(cfg) for _ in range(cfg.decoder_n_resi_blocks)
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def features(self, z: Tensor) -> Tensor:
        """The hidden state fed to `lm_head` (the fused decoder kernel starts here)."""
        x = self.drop(z)
        for blk in self.resi_blocks:
            x = blk(x)
        return x

    def forward(self, z: Tensor) -> Tensor:
        return self.lm_head(self.features(z))
