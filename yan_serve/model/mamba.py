"""Bidirectional Mamba-1 sequence mixer in pure torch: the reference and the CPU path.

YAN-Mamba (YAN_SPEC.md section 1) replaces the self-attention of every encoder and flow-trunk
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

Scans: `selective_scan_ref` is the sequential oracle. `selective_scan_chunked` equals it and
is what the module runs on CPU and whenever autograd records (training): chunks solved step by
step on CPU (the least work, with a hand-written backward that runs the same recurrence back in
time) or by a log-depth scan on CUDA (the fewest launches, each chunk recomputed in backward so
training memory stays small), one state carried between chunks. On
CUDA without autograd the module calls the fused scan `yan_kernels.ops.selective_scan`
(mamba-ssm's kernel when installed, else the Triton kernel in kernels/selective_scan.py), which
also fuses the D skip and the SiLU gate (docs/mamba.md, "Fast paths").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from yan_serve.config import YANConfig

# ------------------------------------------------------------------------------------ scans


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """Selective scan, one time step at a time (the oracle for every faster scan).

    u:     [Bt, L, Di]  input
    delta: [Bt, L, Di]  step sizes (already positive, e.g. after softplus)
    A:     [Di, N]      real diagonal state matrix (negative for a stable scan)
    B, C:  [Bt, L, N]   input and output projections, per position
    D:     [Di] or None skip connection
    returns y [Bt, L, Di], with the state h [Bt, Di, N] starting at 0 and

        h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) * B_t     (zero-order hold on A)
        y_t = sum_n h_t[:, n] * C_t[n] + D * u_t

    Computed in float32, returned in u's dtype.
    """
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    Bt, L, Di = u.shape
    h = u.new_zeros(Bt, Di, A.shape[1])
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, t, :, None] * A)  # [Bt, Di, N]
        dBu = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # [Bt, Di, N]
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1))  # [Bt, Di]
    y = torch.stack(ys, 1) if ys else u.new_zeros(Bt, 0, Di)
    if D is not None:
        y = y + u * D.float()
    return y.to(dtype)


class _LoopScan(torch.autograd.Function):
    """One chunk of T positions from state h0 [Bt, Di, N], a step at a time, with a hand-written
    backward -> (y [Bt, T, Di] without the D term, h_T [Bt, Di, N]). O(T) work: the fastest on CPU.

    The decays exp(delta A) and inputs delta u B of every step are formed in one op each; the
    recurrence is then one in-place multiply-add per step, forward and back (the adjoint runs
    the same recurrence backwards in time: g_{t-1} += exp(delta_t A) * g_t). Autograd over the
    plain loop would record ~6 tiny nodes per step and, checkpointed, run the forward twice;
    on CPU that launch overhead was most of a Mamba training step. Saves the decays and the
    states of the chunk, [T, Bt, Di, N] float32 each.
    """

    @staticmethod
    def forward(ctx, h0: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor):
        u_, d_, B_, C_ = (x.transpose(0, 1).contiguous() for x in (u, delta, B, C))  # time-major
        y, dA, H = _loop_block(h0, u_, d_, A, B_, C_)
        ctx.save_for_backward(h0, u_, d_, A, B_, C_, dA, H)
        return y.transpose(0, 1), H[-1].clone()

    @staticmethod
    def backward(ctx, gy: Tensor, ghT: Tensor):
        h0, u_, d_, A, B_, C_, dA, H = ctx.saved_tensors
        T = H.shape[0]  # >= 1: the chunked scan never makes an empty chunk
        gy_ = gy.transpose(0, 1)
        gH = gy_[..., None] * C_[:, :, None, :]  # dL/dh_t through y_t only, then accumulated
        gH[-1] += ghT
        for t in range(T - 1, 0, -1):
            gH[t - 1].addcmul_(dA[t], gH[t])  # ... plus through h_t = dA_t h_{t-1} + ...
        gh0 = dA[0] * gH[0]
        gC = torch.einsum("tbd,tbdn->tbn", gy_, H)  # (einsum: a batched GEMV here)
        g_log_dA = gH * torch.cat([h0[None], H[:-1]], 0) * dA  # d/d(delta A)
        gA = (g_log_dA * d_[..., None]).sum((0, 1))
        g_du = (gH * B_[:, :, None, :]).sum(-1)  # d/d(delta u)
        gdelta = (g_log_dA * A).sum(-1) + g_du * u_
        gB = (gH * (d_ * u_)[..., None]).sum(2)
        back = (x.transpose(0, 1) for x in (g_du * d_, gdelta, gB, gC))
        gu, gdelta, gB, gC = back
        return gh0, gu, gdelta, gA, gB, gC


def _loop_block(
    h0: Tensor, u_: Tensor, d_: Tensor, A: Tensor, B_: Tensor, C_: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """T steps from h0 on time-major inputs (u_, d_ [T, Bt, Di], B_, C_ [T, Bt, N])
    -> (y [T, Bt, Di], decays exp(delta A) [T, Bt, Di, N], states h_1..h_T [T, Bt, Di, N])."""
    dA = torch.exp(d_[..., None] * A)
    H = (d_ * u_)[..., None] * B_[:, :, None, :]  # delta u B, overwritten by the states
    h = h0
    for t in range(H.shape[0]):
        h = H[t].addcmul_(dA[t], h)  # h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t
    return (H * C_[:, :, None, :]).sum(-1), dA, H


# Without autograd the decays and states are not kept, so `_chunk_loop` forms them a block of
# steps at a time, each block's [steps, Bt, Di, N] buffers at most this many bytes: large
# short-lived buffers are fresh pages from the OS on every call (glibc hands allocations past
# its mmap threshold straight back), and faulting them in cost more than the loop they replace.
# Measured at Bt x L x Di x N = 16 x 128 x 256 x 16, no grad, 1 thread: 58 ms with whole-chunk
# buffers, 18 ms in 1 MiB blocks, 22-26 ms for the plain step-at-a-time loop; at 1 x 512 the
# blocks take 5.6 ms against that loop's 16.6 ms (docs/mamba.md).
_NO_GRAD_BLOCK_BYTES = 1 << 20


def _chunk_loop(
    h0: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One chunk of T positions from state h0 [Bt, Di, N], a step at a time
    -> (y [Bt, T, Di] without the D term, h_T [Bt, Di, N]); see `_LoopScan`."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (h0, u, delta, A, B, C)):
        return _LoopScan.apply(h0, u, delta, A, B, C)
    u_, d_, B_, C_ = (x.transpose(0, 1) for x in (u, delta, B, C))
    step = max(1, _NO_GRAD_BLOCK_BYTES // (4 * h0.numel()))  # steps per block
    h, ys = h0, []
    for s in range(0, u_.shape[0], step):
        y, _, H = _loop_block(h, *(x[s : s + step] for x in (u_, d_)), A,
                              *(x[s : s + step] for x in (B_, C_)))  # fmt: skip
        ys.append(y)
        h = H[-1]
    return torch.cat(ys).transpose(0, 1), h


def _chunk_doubling(
    h0: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as `_chunk_loop`, in ceil(log2 T) whole-chunk steps (Hillis-Steele).

    Every state is an affine map of h0, h_t = a_t * h0 + b_t; (a, b) are the prefix
    compositions of the per-step maps (a_s, b_s) = (exp(delta_s A), delta_s u_s B_s). O(T log T)
    work but few kernel launches: the better choice on a GPU without a fused kernel. Decays
    only multiply, never divide, so nothing overflows however long the chunk.
    """
    a = torch.exp(delta[..., None] * A)  # [Bt, T, Di, N]
    b = (delta * u)[..., None] * B[:, :, None, :]  # [Bt, T, Di, N]
    T, step = u.shape[1], 1
    while step < T:
        # compose with the map `step` positions back: (a, b) after (a', b') = (a a', a b' + b)
        b = torch.cat([b[:, :step], a[:, step:] * b[:, :-step] + b[:, step:]], 1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], 1)
        step *= 2
    h = a * h0[:, None] + b  # [Bt, T, Di, N]
    return (h * C[:, :, None, :]).sum(-1), h[:, -1]


_CHUNK_SOLVERS = {"loop": _chunk_loop, "doubling": _chunk_doubling}


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    chunk: int = 64,
    inner: str | None = None,
) -> Tensor:
    """Same signature, shapes and result as `selective_scan_ref`; what the module runs.

    The sequence is cut into chunks of `chunk` positions; the last state of each chunk carries
    to the next. `inner` solves a chunk: "loop" (a step at a time, fastest on CPU) or
    "doubling" (log-depth, fewer kernel launches on CUDA); None picks by device. Under autograd
    "loop" runs its own backward (`_LoopScan`, which keeps the chunk's states: host memory is
    plentiful, per-op overhead is not), and "doubling" chunks are checkpointed, so training on
    CUDA stores one [Bt, Di, N] state per chunk and recomputes the chunk in backward.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if inner is None:
        inner = "doubling" if u.is_cuda else "loop"
    if inner not in _CHUNK_SOLVERS:
        raise ValueError(f"unknown inner solver {inner!r}; choose from {sorted(_CHUNK_SOLVERS)}")
    solve = _CHUNK_SOLVERS[inner]
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    Bt, L, Di = u.shape
    h = u.new_zeros(Bt, Di, A.shape[1])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C))
    ys = []
    for s in range(0, L, chunk):
        part = (x[:, s : s + chunk] for x in (u, delta))
        args = (h, *part, A, B[:, s : s + chunk], C[:, s : s + chunk])
        if grad and inner == "doubling":
            y, h = checkpoint(solve, *args, use_reentrant=False)
        else:
            y, h = solve(*args)
        ys.append(y)
    y = torch.cat(ys, 1) if ys else u.new_zeros(Bt, 0, Di)
    if D is not None:
        y = y + u * D.float()
    return y.to(dtype)


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

        `scan` picks "chunked", "ref" (the sequential oracle), "fused" (the facade
        `yan_kernels.ops.selective_scan`, gate included; it falls back to the chunked scan
        itself where no kernel runs or autograd records) or "auto" (default): "fused" on CUDA
        when autograd does not record, else "chunked"."""
        if mask is not None:  # where, not multiply: garbage (even NaN) at padding stays out
            x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, Di] each
        xs = F.silu(self.causal_conv(xs))
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # [B, L, Di]
        A = -torch.exp(self.A_log.float())  # [Di, N]
        if scan == "auto":
            grad = torch.is_grad_enabled() and any(
                t.requires_grad for t in (xs, delta, A, B, C, z, self.D)
            )
            scan = "fused" if xs.is_cuda and not grad else "chunked"
        if scan == "fused":
            from yan_kernels import ops  # imported on use: the CPU path needs no kernels

            return self.out_proj(ops.selective_scan(xs, delta, A, B, C, self.D, z))
        if scan == "ref":
            y = selective_scan_ref(xs, delta, A, B, C, self.D)
        elif scan == "chunked":
            y = selective_scan_chunked(xs, delta, A, B, C, self.D, self.chunk, self.inner)
        else:
            raise ValueError(f"unknown scan {scan!r}; choose 'auto', 'fused', 'chunked' or 'ref'")
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
    "selective_scan_chunked",
    "selective_scan_ref",
]
