"""Mamba-1 selective scan, forward only (inference), with the D skip and the SiLU gate fused:

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) * B_t        h [Di, N] per row, h_0 = 0
    y_t = (sum_n h_t[:, n] * C_t[n] + D * u_t) * silu(z_t)          (D, z optional)

Layout: one program per (batch row, block of BLOCK_D channels). It loads its [BLOCK_D, N] slice
of A once, keeps the state h [BLOCK_D, N] in fp32 registers and walks L one position at a time:
load u, delta (and z) for its channels and B, C for the position (in their own dtype, fp32 or
16-bit), update h, reduce over N, add D * u, gate, store in u's dtype. The recurrence is
sequential in L, so the parallelism is Bt * cdiv(Di, BLOCK_D) programs; every position's loads
are independent of h, so they can be issued ahead of the dependent FMA chain. Every stride is a
kernel argument (offsets in int64): inputs need not be contiguous, e.g. `u` may be the
transposed [Bt, Di, L] output of the causal conv and B, C slices of x_proj's output.

Three implementations share one signature `(u, delta, A, B, C, D=None, z=None) -> y`:
- `selective_scan`: the Triton launcher (CUDA, or CPU under TRITON_INTERPRET=1).
- `selective_scan_mamba_ssm`: the adapter to mamba-ssm's CUDA kernel (its layout is [B, D, L]).
- `yan_kernels.chunked_scan.selective_scan_ref`: pure torch and differentiable (the chunked scan,
  equal to the sequential oracle, then the gate in fp32): the CPU path and the fallback under
  autograd.
No backward: callers go through `yan_kernels.ops.selective_scan`, which picks one of the three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked_scan import _KERNEL_DTYPES, check_scan_inputs


@triton.jit
def _selective_scan_kernel(
    u_ptr,  # [Bt, L, Di]
    delta_ptr,  # [Bt, L, Di]
    A_ptr,  # [Di, N]
    B_ptr,  # [Bt, L, N]
    C_ptr,  # [Bt, L, N]
    D_ptr,  # [Di] (HAS_D)
    z_ptr,  # [Bt, L, Di] (HAS_Z)
    out_ptr,  # [Bt, L, Di]
    L,
    Di,
    N,
    s_ub, s_ul, s_ud,
    s_db, s_dl, s_dd,
    s_ad, s_an,
    s_bb, s_bl, s_bn,
    s_cb, s_cl, s_cn,
    s_dsk,
    s_zb, s_zl, s_zd,
    s_ob, s_ol, s_od,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = chans < Di
    ch = chans.to(tl.int64)
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < N
    # padded states get A = 0 and B = C = 0: they stay 0 and add nothing to y
    A = tl.load(
        A_ptr + ch[:, None] * s_ad + ns[None, :] * s_an,
        mask=c_ok[:, None] & n_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_D, BLOCK_N]
    if HAS_D:
        Dv = tl.load(D_ptr + ch * s_dsk, mask=c_ok, other=0.0).to(tl.float32)
    u_p = u_ptr + row * s_ub + ch * s_ud
    d_p = delta_ptr + row * s_db + ch * s_dd
    z_p = z_ptr + row * s_zb + ch * s_zd
    o_p = out_ptr + row * s_ob + ch * s_od
    b_p = B_ptr + row * s_bb + ns * s_bn
    c_p = C_ptr + row * s_cb + ns * s_cn
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for _ in range(0, L):
        u = tl.load(u_p, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
        dt = tl.load(d_p, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
        Bv = tl.load(b_p, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        Cv = tl.load(c_p, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bv[None, :]
        y = tl.sum(h * Cv[None, :], axis=1)  # [BLOCK_D]
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            zv = tl.load(z_p, mask=c_ok, other=0.0).to(tl.float32)
            y = y * (zv / (1.0 + tl.exp(-zv)))  # y * silu(z)
            z_p += s_zl
        tl.store(o_p, y.to(out_ptr.dtype.element_ty), mask=c_ok)
        u_p += s_ul
        d_p += s_dl
        b_p += s_bl
        c_p += s_cl
        o_p += s_ol


def _default_blocks(device: torch.device) -> tuple[int, int]:
    """(BLOCK_D, num_warps). CUDA: 32 channels x N states per program, so Bt = 1 at Di = 1024
    still gives 32 programs and h stays a few registers per thread (untuned).
    The interpreter wants few programs (each tile op is one numpy call)."""
    if device.type == "cuda":
        return 32, 2
    return 64, 1


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    block_d: int | None = None,
) -> Tensor:
    """Triton launcher: u, delta [Bt, L, Di], A [Di, N], B, C [Bt, L, N], D [Di] or None,
    z [Bt, L, Di] or None -> y [Bt, L, Di] in u's dtype; `(scan + D * u) * silu(z)`.

    Any strides; no host synchronization (graph-capturable). `block_d` (a power of two)
    overrides the channels per program. Raises ValueError on inconsistent inputs."""
    Bt, L, Di, N = check_scan_inputs(u, delta, A, B, C, D, z)
    bd, warps = _default_blocks(u.device)
    bd = block_d or bd
    if bd & (bd - 1):
        raise ValueError(f"block_d must be a power of two, got {bd}")
    out = torch.empty((Bt, L, Di), device=u.device, dtype=u.dtype)
    if out.numel() == 0:
        return out
    dd = D if D is not None else A  # a valid pointer; not read unless HAS_D
    zz = z if z is not None else u  # likewise, unless HAS_Z
    _selective_scan_kernel[(Bt, triton.cdiv(Di, bd))](
        u, delta, A, B, C, dd, zz, out,
        L, Di, N,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        dd.stride(0), *zz.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None,
        BLOCK_D=bd, BLOCK_N=triton.next_power_of_2(N),
        num_warps=warps,
    )  # fmt: skip
    return out


def aot_specs() -> list:
    """Every configuration the launcher can choose on a GPU (see `yan_kernels.aot`).

    The launcher casts nothing: u, delta, B, C, z and out share the activation dtype, while A
    and D may each be any of fp32 / bf16 / fp16 (the model passes A in fp32 and D in its own
    dtype). Without D the kernel gets A as D's pointer, without z it gets u as z's. On CUDA
    BLOCK_D = 32 with 2 warps and Triton's default 3 stages (`_default_blocks`).

    BLOCK_N = next_power_of_2(N) is reached for any N; every dtype and flag combination is
    compiled at the model's N = 16, and the other powers of two from 1 to 256 (a representative
    set: Mamba uses 16, and a larger N only widens the same register tiles) in the model's own
    configuration (A fp32, D and z given, D in the activation dtype) for each activation dtype.
    `block_d` is a caller override (any power of two; tests use 16 and 32): 1, 16, 64 and 128
    stand for it.

    Ints are i32: Triton types an int as i64 only from 2**31 up, which among these arguments
    only a batch stride can reach (one row of more than 2**31 elements, e.g. L * Di); one spec
    per activation dtype covers that case."""
    from .aot import TORCH_TO_TRITON, AotSpec

    block_d, warps = _default_blocks(torch.device("cuda"))
    ints = ("L", "Di", "N", "s_ub", "s_ul", "s_ud", "s_db", "s_dl", "s_dd", "s_ad", "s_an",
            "s_bb", "s_bl", "s_bn", "s_cb", "s_cl", "s_cn", "s_dsk", "s_zb", "s_zl", "s_zd",
            "s_ob", "s_ol", "s_od")  # fmt: skip
    batch_strides = ("s_ub", "s_db", "s_bb", "s_cb", "s_zb", "s_ob")
    kinds = ["*" + TORCH_TO_TRITON[str(d).removeprefix("torch.")] for d in _KERNEL_DTYPES]

    def spec(act, a, d, has_d, has_z, bd=block_d, bn=16, big=False, label=""):
        sig = dict(u_ptr=act, delta_ptr=act, A_ptr=a, B_ptr=act, C_ptr=act,
                   D_ptr=d if has_d else a, z_ptr=act, out_ptr=act)  # fmt: skip
        sig.update({k: "i64" if big and k in batch_strides else "i32" for k in ints})
        flags = dict(HAS_D=has_d, HAS_Z=has_z, BLOCK_D=bd, BLOCK_N=bn)
        tag = f"u={act[1:]} A={a[1:]} D={d[1:] if has_d else '-'} z={has_z} BD={bd} BN={bn}"
        return AotSpec("_selective_scan_kernel", sig, flags, num_warps=warps, num_stages=3,
                       label=f"{tag}{label}")  # fmt: skip

    specs = [
        spec(act, a, d, has_d, has_z)
        for act in kinds
        for a in kinds
        for has_d, d in [(False, a)] + [(True, d) for d in kinds]
        for has_z in (False, True)
    ]
    for act in kinds:
        specs += [
            spec(act, "*fp32", act, True, True, bn=bn) for bn in (1, 2, 4, 8, 32, 64, 128, 256)
        ]
        specs.append(spec(act, "*fp32", act, True, True, big=True, label=" i64 batch strides"))
    specs += [spec("*fp32", "*fp32", "*fp32", True, True, bd=bd) for bd in (1, 16, 64, 128)]
    return specs


def selective_scan_mamba_ssm(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """The same op through mamba-ssm's fused CUDA kernel (`pip install yan-serve[mamba]`).

    `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` takes u, delta, z [B, Di, L],
    A [Di, N] fp32, B, C [B, N, L] (input-dependent), D [Di] fp32, and applies the gate itself
    when z is given; delta is passed as it is (no delta_bias, delta_softplus=False: the caller
    already applied softplus). Returns [Bt, L, Di] in u's dtype, a transposed view of the
    kernel's [Bt, Di, L] output."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    check_scan_inputs(u, delta, A, B, C, D, z)

    def lead(x: Tensor) -> Tensor:  # [Bt, L, X] -> [Bt, X, L] with unit stride along L
        return x.transpose(1, 2).contiguous()

    y = selective_scan_fn(
        lead(u), lead(delta), A.float().contiguous(), lead(B), lead(C),
        None if D is None else D.float().contiguous(),
        None if z is None else lead(z),
        delta_bias=None, delta_softplus=False,
    )  # fmt: skip
    return y.transpose(1, 2)
