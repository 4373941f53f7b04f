"""The assembled YAN model: shared embeddings, encoder, latent flow, decoder.

The token and position embeddings are owned here and passed down (never registered twice), so
the state dict holds each tensor once and saves to safetensors as is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from yan_serve.config import YANConfig
from yan_serve.model.decoder import Decoder
from yan_serve.model.encoder import Encoder
from yan_serve.model.flow import FlowCondition, FlowNet
from yan_serve.model.layers import masked_mean


class YAN(nn.Module):
    def __init__(self, cfg: YANConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_length + 1, cfg.d_model)
        self.encoder = Encoder(cfg)
        self.flow = FlowNet(cfg)
        self.decoder = Decoder(cfg)
        # Embeddings keep torch's N(0, 1) init on purpose: the flow trunk reads `z_t + pos` with
        # z_t at unit scale, so a GPT-style 0.02 init would leave positions invisible to it.

    # -------------------------------------------------------------- pieces
    def check_length(self, length: int, what: str = "sequence") -> None:
        if length > self.config.max_length:
            raise ValueError(
                f"{what} of {length} tokens exceeds the model's max_length {self.config.max_length}"
            )

    def positions(self, length: int) -> Tensor:
        """Position embeddings of positions 0..length-1: [length, d]."""
        self.check_length(length)
        return self.pos_emb.weight[:length]

    def encode(
        self,
        tokens: Tensor,  # [B, L] long
        mask: Tensor,  # [B, L] bool
        add_noise: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Tokens -> latents [B, L, d]. `add_noise` adds the training-time latent noise."""
        x = self.tok_emb(tokens) + self.positions(tokens.shape[1])[None]
        return self.encoder(x, mask, add_noise=add_noise, generator=generator)

    def condition(self, src_h: Tensor, src_mask: Tensor, tgt_mask: Tensor) -> FlowCondition:
        """Bundle the encoded source and target layout for the flow trunk."""
        return FlowCondition(
            pos=self.positions(tgt_mask.shape[1]),
            tgt_mask=tgt_mask,
            src=src_h,
            src_mask=src_mask,
            src_pooled=masked_mean(src_h, src_mask),
        )

    def decode_logits(self, z: Tensor) -> Tensor:
        """Latents [..., d] -> logits [..., V] (materializes the logits; the fused kernel won't)."""
        return self.decoder(z)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter counts per top-level component."""
        out: dict[str, int] = {}
        for name, p in self.named_parameters():
            key = name.split(".")[0]
            if key == "flow":
                key = "flow." + name.split(".")[1]
            out[key] = out.get(key, 0) + p.numel()
        return out
