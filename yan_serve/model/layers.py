"""Building blocks shared by the encoder, the flow trunk and the decoder.

Module and parameter names follow the paper author's checkpoints: `W_q/W_k/W_v/out_proj`,
`ff.layers.{0,2}`, LayerNorm `scale/shift`, so converting a foreign checkpoint is a renaming,
not a re-implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-5


class LayerNorm(nn.Module):
    """LayerNorm with `scale`/`shift` parameters (biased variance, eps 1e-5)."""

    def __init__(self, d: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


def adaptive_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = LN_EPS) -> Tensor:
    """`scale * norm(x) + shift` with a parameter-free LayerNorm.

    x: [B, L, d]; scale, shift: [B, d] (one pair per sequence, from its time embedding).
    """
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * scale[:, None] + shift[:, None]


class FeedForward(nn.Module):
    """d -> mult*d -> d with exact (erf) GELU; `layers.0` and `layers.2` hold the weights."""

    def __init__(self, d: int, d_hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, d_hidden), nn.GELU(), nn.Linear(d_hidden, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def key_padding_mask(mask: Tensor) -> Tensor:
    """[B, Lk] bool (True = real token) -> [B, 1, 1, Lk] boolean mask for SDPA.

    A row with no real key would make SDPA return NaN; such rows attend to everything instead
    (their outputs belong to padding queries and are zeroed by the caller).
    """
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Bidirectional multi-head attention through torch SDPA, with padding masks.

    Scores are scaled by 1/sqrt(head_dim) (SDPA's default). Keys at padding are masked out;
    outputs at padding queries are zeroed so padding never feeds the residual stream.
    """

    def __init__(self, d: int, n_heads: int, qkv_bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d={d} not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.dropout = dropout
        self.W_q = nn.Linear(d, d, bias=qkv_bias)
        self.W_k = nn.Linear(d, d, bias=qkv_bias)
        self.W_v = nn.Linear(d, d, bias=qkv_bias)
        self.out_proj = nn.Linear(d, d)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]

    def forward(
        self,
        x: Tensor,  # [B, Lq, d] queries
        q_mask: Tensor,  # [B, Lq] bool
        kv: Tensor | None = None,  # [B, Lk, d]; None = self-attention
        kv_mask: Tensor | None = None,  # [B, Lk] bool
    ) -> Tensor:
        if kv is None:
            kv, kv_mask = x, q_mask
        assert kv_mask is not None
        q, k, v = self._heads(self.W_q(x)), self._heads(self.W_k(kv)), self._heads(self.W_v(kv))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_padding_mask(kv_mask),
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, Lq, hd]
        B, _, Lq, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, -1))
        return out * q_mask[..., None].to(out.dtype)


def sinusoidal_embedding(t: Tensor, d: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the raw time t in [0, 1]: [B] -> [B, d] as [sin | cos].

    Frequencies are exp(-ln(max_period) * i / (d/2)), i < d/2; t is not rescaled (the spec feeds
    raw t), so the learned Linear that follows does the spreading.
    """
    half = d // 2
    tt = t if t.dtype == torch.float64 else t.float()  # never evaluate sin/cos in half precision
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=tt.dtype) / half
    )
    args = tt[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if d % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class SinusoidalTimeFeatures(nn.Module):
    """Module wrapper so `time_emb` is `Sequential(features, Linear, GELU)` (`time_emb.1.*`)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, t: Tensor) -> Tensor:
        """t: [B] in the model's dtype -> [B, d] in that dtype."""
        return sinusoidal_embedding(t, self.d).to(t.dtype)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of x [B, L, d] counting only mask [B, L] True entries -> [B, d]."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
