"""Bidirectional Mamba-1 sequence mixer in pure torch: the reference and the CPU path.

YAN-Mamba replaces the self-attention of every encoder and flow-trunk
block with two independent Mamba-1 modules, one reading the sequence forward and one reading
it reversed; their outputs are concatenated `[B, L, 2d]` and projected back to d. The trunk
keeps its explicit cross-attention (Mamba has none) and its adaptive LayerNorms.

One direction (`Mamba`), with Di = expand * d, N = d_state, R = dt_rank = ceil(d / 16):

    x, z   = in_proj(x).chunk(2)                 # [B, L, Di] each
    x      = SiLU(causal depthwise conv1d(x))    # kernel d_conv, sees positions <= t only
    dt,B,C = x_proj(x).split(R, N, N)            # input-dependent ("selective") parameters
    delta  = softplus(dt_proj(dt))               # [B, L, Di], low-rank R -> Di, with bias
    y      = selective_scan(x, delta, A = -exp(A_log), B, C, D)
    out    = out_proj(y * SiLU(z))

Padding. Batches are right-padded (`mask` [B, L] is True on a prefix of each row). The forward
scan and the causal conv only look back, so valid positions never read the padding after
them; padded inputs are zeroed anyway. The reversed direction reverses each row's *valid
prefix* only (`reverse_valid_prefix`), so its scan starts at the row's last real token rather
than on padding; the author's code flips whole rows instead (docs/mamba.md).

Scans (yan_kernels.chunked_scan, docs/mamba.md): `selective_scan_sequential` is the oracle;
`selective_scan_chunked` equals it and is the pure-torch path (CPU, and whenever autograd
records). The module calls the facade `yan_kernels.ops.selective_scan`, which takes a fused
kernel where one runs (mamba-ssm's when installed, else the Triton kernel in
kernels/selective_scan.py; both fuse the D skip and the SiLU gate) and the chunked scan
otherwise (docs/mamba.md, "Fast paths").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from yan_kernels import ops
from yan_kernels.chunked_scan import selective_scan_chunked, selective_scan_sequential

from yan_serve.config import YANConfig

# ------------------------------------------------------------------------------- reversal


def reverse_valid_prefix_index(mask: Tensor) -> Tensor:
    """Gather index that reverses each row's valid prefix and leaves its padding in place.

    mask: [B, L] bool, True on a prefix of each row (right padding) -> index [B, L] long with
    index[b, i] = n_b - 1 - i for i < n_b and i otherwise (n_b = valid length of row b). The
    map is its own inverse, and a reversed row keeps the same mask.
    """
    L = mask.shape[1]
    pos = torch.arange(L, device=mask.device)[None]  # [1, L]
    n = mask.sum(-1, keepdim=True)  # [B, 1]
    return torch.where(pos < n, n - 1 - pos, pos)


def reverse_valid_prefix(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, ...] reordered along dim 1 by `reverse_valid_prefix_index(mask)`."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


# --------------------------------------------------------------------------------- modules


class Mamba(nn.Module):
    """One Mamba-1 direction: x [B, L, d] (+ mask [B, L]) -> [B, L, d]; causal in L.

    Parameters: `in_proj` (d -> 2 Di, no bias), `conv1d` (depthwise, kernel d_conv, bias),
    `x_proj` (Di -> R + 2N, no bias), `dt_proj` (R -> Di, bias), `A_log` [Di, N], `D` [Di],
    `out_proj` (Di -> d, no bias).
    """

    def __init__(
        self,
        d: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        chunk: int = 64,
    ) -> None:
        super().__init__()
        Di = expand * d
        self.d_inner, self.d_state, self.d_conv = Di, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d / 16)
        self.chunk = chunk
        self.inner: str | None = None  # chunk solver of the scan; None picks by device
        self.in_proj = nn.Linear(d, 2 * Di, bias=False)
        self.conv1d = nn.Conv1d(Di, Di, d_conv, groups=Di, bias=True)
        self.x_proj = nn.Linear(Di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, Di, bias=True)
        # S4D-real init: A[:, n] = -(n + 1) for every channel
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(Di, 1)  # [Di, N]
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(Di))
        self.out_proj = nn.Linear(Di, d, bias=False)
        with torch.no_grad():
            # initial step sizes softplus(bias) log-uniform in [dt_min, dt_max]
            nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            u = torch.rand(Di)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def causal_conv(self, x: Tensor) -> Tensor:
        """Depthwise conv over L with left zero-padding: x [B, L, Di] -> [B, L, Di], where
        output t reads inputs t - d_conv + 1 .. t only."""
        xt = F.pad(x.transpose(1, 2), (self.d_conv - 1, 0))  # [B, Di, L + d_conv - 1]
        y = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)  # [B, Di, L]
        return y.transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None, scan: str = "auto") -> Tensor:
        """x: [B, L, d], mask: [B, L] bool (right-padded) or None -> [B, L, d].

        `scan` picks "auto" (default: the facade `yan_kernels.ops.selective_scan`, gate
        included, which runs a fused kernel where one runs and the chunked scan otherwise),
        "chunked" or "ref" (the sequential oracle)."""
        if mask is not None:  # where, not multiply: garbage (even NaN) at padding stays out
            x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, Di] each
        xs = F.silu(self.causal_conv(xs))
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # [B, L, Di]
        A = -torch.exp(self.A_log.float())  # [Di, N]
        if scan == "auto":
            y = ops.selective_scan(xs, delta, A, B, C, self.D, z, self.chunk, self.inner)
            return self.out_proj(y)
        if scan == "ref":
            y = selective_scan_sequential(xs, delta, A, B, C, self.D)
        elif scan == "chunked":
            y = selective_scan_chunked(xs, delta, A, B, C, self.D, self.chunk, self.inner)
        else:
            raise ValueError(f"unknown scan {scan!r}; choose 'auto', 'chunked' or 'ref'")
        return self.out_proj(y * F.silu(z))


class BiMamba(nn.Module):
    """Bidirectional mixer: `out_proj([fwd(x) | rev(bwd(rev(x)))])`, zero at padding.

    A drop-in for self-attention: `forward(x [B, L, d], mask [B, L]) -> [B, L, d]`. `fwd` and
    `bwd` are independent `Mamba` modules; `rev` reverses each row's valid prefix only.
    """

    def __init__(self, d: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.fwd = Mamba(d, d_state, d_conv, expand)
        self.bwd = Mamba(d, d_state, d_conv, expand)
        self.out_proj = nn.Linear(2 * d, d)

    @classmethod
    def from_config(cls, cfg: YANConfig) -> BiMamba:
        return cls(cfg.d_model, cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_expand)

    def directions(
        self, x: Tensor, mask: Tensor | None = None, scan: str = "auto"
    ) -> tuple[Tensor, Tensor]:
        """The two directions' outputs before the projection: ([B, L, d], [B, L, d])."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        idx = reverse_valid_prefix_index(mask)
        y_fwd = self.fwd(x, mask, scan)
        y_bwd = reverse_valid_prefix(self.bwd(reverse_valid_prefix(x, idx), mask, scan), idx)
        return y_fwd, y_bwd

    def forward(self, x: Tensor, mask: Tensor | None = None, scan: str = "auto") -> Tensor:
        """x: [B, L, d], mask: [B, L] bool (right-padded; None = all valid) -> [B, L, d];
        `scan` as in `Mamba.forward`."""
        y = self.out_proj(torch.cat(self.directions(x, mask, scan), dim=-1))  # [B, L, d]
        if mask is None:
            return y
        return y * mask[..., None].to(y.dtype)


__all__ = [
    "BiMamba",
    "Mamba",
    "reverse_valid_prefix",
    "reverse_valid_prefix_index",
]
