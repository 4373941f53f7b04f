"""The Mamba-1 selective scan in pure torch: the oracle, the chunked scan with its backward, and
the reference the `yan_kernels.ops.selective_scan` facade falls back to.

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) * B_t        h [Di, N] per row, h_0 = 0
    y_t = sum_n h_t[:, n] * C_t[n] + D * u_t                        (D optional)

- `selective_scan_sequential`: one time step at a time, written plainly: the oracle.
- `selective_scan_chunked`: equal to it, and what runs on CPU and whenever autograd records
  (training): chunks solved step by step on CPU (the least work, with a hand-written backward,
  `_LoopScan`, that runs the same recurrence back in time) or by a log-depth scan on CUDA (the
  fewest launches, each chunk recomputed in backward so training memory stays small), one state
  carried between chunks (docs/mamba.md).
- `selective_scan_ref`: the fused kernels' signature `(u, delta, A, B, C, D=None, z=None)` with
  the SiLU gate: the chunked scan in fp32, times silu(z) in fp32, rounded once to u's dtype.

This file imports neither `triton` nor the model: the CPU path needs only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def selective_scan_sequential(
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
    """Same signature, shapes and result as `selective_scan_sequential`; what the model runs.

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


def check_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices (ValueError naming the offender) -> (Bt, L, Di, N).

    u, delta, B, C and z share one dtype (fp32, bf16 or fp16): the activations. A and D may be
    any of those three (the model keeps A in fp32); every value is widened to fp32 in the scan.
    """
    if u.dim() != 3:
        raise ValueError(f"u must be [Bt, L, Di], got shape {tuple(u.shape)}")
    Bt, L, Di = u.shape
    if A.dim() != 2 or A.shape[0] != Di:
        raise ValueError(f"A must be [Di, N] = [{Di}, N], got shape {tuple(A.shape)}")
    N = A.shape[1]
    want = {"delta": (Bt, L, Di), "B": (Bt, L, N), "C": (Bt, L, N), "D": (Di,), "z": (Bt, L, Di)}
    given = {"delta": delta, "B": B, "C": C, "D": D, "z": z}
    for name, t in given.items():
        if t is not None and tuple(t.shape) != want[name]:
            raise ValueError(
                f"{name} must have shape {list(want[name])} for u {list(u.shape)} and "
                f"A {list(A.shape)}, got {list(t.shape)}"
            )
    if u.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"u must be float32, bfloat16 or float16, got {u.dtype}")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            raise ValueError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
    for name, t in (("A", A), ("D", D)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    devices = {t.device for t in (u, delta, A, B, C, D, z) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return Bt, L, Di, N


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    chunk: int = 64,
    inner: str | None = None,
) -> Tensor:
    """Pure-torch reference with the launchers' signature (differentiable): the chunked scan in
    fp32 (+ D * u), times silu(z) in fp32, rounded once to u's dtype, as the kernels do.
    `chunk` and `inner` pick the chunked scan's solver (see `selective_scan_chunked`)."""
    check_scan_inputs(u, delta, A, B, C, D, z)
    y = selective_scan_chunked(u.float(), delta, A, B, C, D, chunk, inner)  # fp32 [Bt, L, Di]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
