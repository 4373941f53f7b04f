"""A linear layer with the LayerNorm before it, and its bias, GELU and residual add after it.

A Transformer block at inference is a chain of `LayerNorm -> GEMM (+bias, GELU) -> ... -> GEMM
(+bias) -> residual add`. Eager torch runs the norm, the GEMM, the activation and the residual
add as separate launches (the fused residual + LayerNorm of `yan_kernels.layer_norm` already
makes the add and the norm one). At batch 1 a YAN sample is launch-bound: each launch costs a
few microseconds of GPU time even inside a CUDA graph, whatever the arithmetic. This kernel
takes every step of the chain around one GEMM:

    h   = LayerNorm(x) * norm_weight + norm_shift     (NORM: the prologue; else h = x)
    a   = h @ W.T (+ bias)                            (fp32 accumulator)
    a   = 0.5 * a * (1 + erf(a / sqrt(2)))            (GELU 1: the exact form YAN uses;
                                                       GELU 2: the tanh form GPT-2 uses)
    out = residual + a                                (RESIDUAL: the epilogue)

so a block's sub-layer is two launches (`norm -> QKV`, `out-projection + residual`; `norm -> up
+ GELU`, `down + residual`) instead of the three or four of cuBLAS plus the fused norm.

- **Prologue.** A program owns BLOCK_M rows and BLOCK_N output columns. It first sweeps its rows
  over the whole reduction width K twice (the mean, then the variance of the deviations: the
  two-pass form `F.layer_norm` computes, in fp32), then in the GEMM's K loop normalizes each
  [BLOCK_M, BLOCK_K] tile in registers, applies the affine and rounds it to the input dtype, as
  the unfused norm rounds its output before the GEMM reads it. Every column tile re-derives the
  statistics of its rows: at batch 1 the rows are a few hundred and K a few hundred, so the
  extra reads come from L1/L2 and cost less than a launch; at 64 x 1024 tokens the unfused
  kernels are the faster choice (which a caller picks by row count, measured by `bench
  sampler --compare`).
- **Epilogue.** The bias, the exact GELU and the residual act on the fp32 accumulator, rounded
  once to the output dtype (the unfused path rounds the GEMM's output before each of them, so
  the two differ by those roundings).
- **GEMM.** A tiled GEMM over `x` [M, K] and the weight in `nn.Linear`'s layout [N, K] (each
  tile read K-contiguous and transposed in registers), or in the [K, N] layout of GPT-2's
  `Conv1D` (`transposed=True`: the same loads with the strides swapped, N-contiguous). Tiles
  run in a grouped order (GROUP_M row tiles per column sweep) so a weight tile is read from
  DRAM once per group. `default_config` picks the tile by row count; `bench kernels --sweep
  gelu` measures them.

`linear_gelu` (the FFN's up-projection with its GELU: cuBLASLt's GELU epilogue is the tanh
approximation, which the model is not trained with) is the kernel with only the GELU flag.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .gdc import grid_dependency

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELUS = {"none": 1, "tanh": 2}  # F.gelu's `approximate` -> the kernel's GELU constexpr


@triton.jit(do_not_specialize=["M"])
def _fused_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (nn.Linear's weight)
    b_ptr,  # [N] (HAS_BIAS)
    nw_ptr,  # [K] the norm's scale (NORM)
    ns_ptr,  # [K] the norm's shift (NORM)
    r_ptr,  # [M, N] the residual (RESIDUAL)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    GELU: tl.constexpr,  # 0: none, 1: exact (erf), 2: tanh approximation
    RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    x_rows = x_ptr + r64[:, None] * stride_xm
    if NORM:
        # the rows' statistics over all of K, two passes in fp32 (zero-padded lanes add 0)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            total += tl.sum(a.to(tl.float32), axis=1)
        mean = total / K
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_in = row_ok[:, None] & (ks < K)[None, :]
            a = tl.load(x_rows + ks[None, :], mask=k_in, other=0.0)
            dev = tl.where(k_in, a.to(tl.float32) - mean[:, None], 0.0)
            sq += tl.sum(dev * dev, axis=1)
        rstd = tl.rsqrt(sq / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            # padded lanes: scale and shift load as 0, so the normalized value is 0 there
            sc = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            sh = tl.load(ns_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            hn = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * sc[None, :] + sh[None, :]
            a = hn.to(x_ptr.dtype.element_ty)
        w = tl.load(
            w_ptr + c64[:, None] * stride_wn + ks[None, :].to(tl.int64) * stride_wk,
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU == 1:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
    elif GELU == 2:
        u = _SQRT_2_OVER_PI * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 1 + tanh(u), overflow-safe
    out_mask = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        res = tl.load(r_ptr + r64[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(
        out_ptr + r64[:, None] * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )


class Config(NamedTuple):
    """One launch configuration: tile sizes, row tiles per group, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# GPU tiles by row count, not yet tuned on a GPU (`bench kernels --sweep gelu` compares them
# with cuBLAS + GELU): few rows want narrow tiles, so that a 128-token batch still spreads over
# the SMs (a 32 x 64 tile gives a [128, 512] output 32 programs); up to 16 rows (an AR decode
# step) the GEMM is a weight-streaming GEMV, and 32-column tiles give GPT-2's 3072 -> 768
# projection 24 programs instead of 12; many rows want the large tile that feeds the tensor
# cores.
GPU_GEMV = Config(16, 32, 128, 1, 4, 3)
GPU_TINY = Config(32, 64, 64, 8, 4, 4)
GPU_SMALL = Config(64, 64, 64, 8, 4, 4)
GPU_LARGE = Config(128, 128, 64, 8, 8, 3)
GPU_GEMV_M = 16
GPU_TINY_M = 256
GPU_LARGE_M = 2048
SWEEP = (
    GPU_GEMV,
    GPU_TINY,
    GPU_SMALL,
    Config(64, 128, 64, 8, 4, 4),
    Config(128, 64, 64, 8, 4, 4),
    GPU_LARGE,
    Config(128, 256, 64, 8, 8, 3),
)
INTERPRETER = Config(32, 64, 64, 4, 4, 1)  # few, large tiles: each tile op is one numpy call


def default_config(device: torch.device, m: int) -> Config:
    """The launch configuration for `m` rows on `device`."""
    if device.type == "cuda":
        if m <= GPU_GEMV_M:
            return GPU_GEMV
        if m <= GPU_TINY_M:
            return GPU_TINY
        return GPU_LARGE if m >= GPU_LARGE_M else GPU_SMALL
    return INTERPRETER


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


Norm = tuple[Tensor, Tensor, float]  # the LayerNorm before the GEMM: (scale [K], shift [K], eps)


def _rows(t: Tensor, width: int) -> Tensor:
    """[..., width] -> [rows, width] with unit inner stride (a copy only when needed)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm: Norm | None = None,
    gelu: bool = False,
    approximate: str = "none",
    residual: Tensor | None = None,
    transposed: bool = False,
    config: Config | None = None,
) -> Tensor:
    """Triton launcher: x [..., K], weight [N, K] ([K, N] when `transposed`), bias [N] or None;
    `norm` (scale [K], shift [K], eps): LayerNorm x first; `gelu`: GELU after the bias, exact
    or with F.gelu's `approximate="tanh"`; `residual` [..., N]: added last -> [..., N] in x's
    dtype (see the module docstring). One launch, no host synchronization (graph-capturable).
    `config` overrides the tile choice."""
    *lead, K = x.shape
    N = weight.shape[1] if transposed else weight.shape[0]
    want = (K, N) if transposed else (N, K)
    assert weight.shape == want, f"weight must be {list(want)}, got {list(weight.shape)}"
    assert approximate in GELUS, f"approximate must be one of {sorted(GELUS)}"
    assert bias is None or bias.shape == (N,), f"bias must be [{N}]"
    ts = [x, weight, bias]
    if norm is not None:
        scale, shift, eps = norm
        assert scale.shape == (K,) and shift.shape == (K,), f"norm scale and shift must be [{K}]"
        assert K > 0, "a LayerNorm needs a non-empty row"
        ts += [scale, shift]
    if residual is not None:
        assert residual.shape == (*lead, N), f"residual must be {(*lead, N)}"
        ts.append(residual)
    assert len({t.dtype for t in ts if t is not None}) == 1, "one dtype"
    assert len({t.device for t in ts if t is not None}) == 1, "one device"
    x2 = _rows(x, K)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    stride_wn, stride_wk = (w.stride(1), w.stride(0)) if transposed else (w.stride(0), 1)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    r2 = _rows(residual, N) if residual is not None else out
    nw, ns, eps = (norm[0].contiguous(), norm[1].contiguous(), norm[2]) if norm else (w, w, 0.0)
    cfg = config or default_config(x.device, M)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _fused_linear_kernel[grid](
        x2, w, bias if bias is not None else w, nw, ns, r2, out, M, N, K, float(eps),
        x2.stride(0), stride_wn, stride_wk, r2.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, NORM=norm is not None, GELU=GELUS[approximate] if gelu else 0,
        RESIDUAL=residual is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_options(x.device),
    )  # fmt: skip
    return out.view(*lead, N)


def fused_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm: Norm | None = None,
    gelu: bool = False,
    approximate: str = "none",
    residual: Tensor | None = None,
    transposed: bool = False,
) -> Tensor:
    """Pure-torch reference with the launcher's signature (the unfused ops, each rounding to
    x's dtype as the model's modules do)."""
    h = x
    if norm is not None:
        scale, shift, eps = norm
        h = F.layer_norm(x, (x.shape[-1],), eps=eps) * scale + shift
    if transposed:
        a = h @ weight if bias is None else torch.addmm(bias, h.flatten(0, -2), weight)
        a = a.view(*h.shape[:-1], weight.shape[1])
    else:
        a = F.linear(h, weight, bias)
    if gelu:
        a = F.gelu(a, approximate=approximate)
    return a if residual is None else residual + a


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                config: Config | None = None) -> Tensor:  # fmt: skip
    """gelu(x @ weight.T + bias), the exact erf GELU on the fp32 accumulator: one launch."""
    return fused_linear(x, weight, bias, gelu=True, config=config)


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-torch reference (the unfused ops the model's FeedForward runs)."""
    return F.gelu(F.linear(x, weight, bias))


# (HAS_BIAS, NORM, GELU, RESIDUAL) YAN's engine uses (weights in nn.Linear's layout): the FFN's
# up-projection with its exact GELU (with and without its norm), QKV and query projections after
# their norm, output projections into the residual
FLAGS = (
    (True, False, 1, False),
    (True, True, 1, False),
    (True, True, 0, False),
    (False, True, 0, False),
    (True, False, 0, True),
    (False, False, 0, True),
)
# ... and the GPT-2 decode step (Conv1D weights, transposed): QKV after ln_1, the attention's
# projection into the residual, the MLP's first layer after ln_2 with the tanh GELU, its second
# layer into the residual
FLAGS_T = ((True, True, 0, False), (True, False, 0, True), (True, True, 2, False),
           (True, False, 0, True))  # fmt: skip


def aot_specs() -> list:
    """Every configuration the launcher can choose on a GPU and every flag combination the
    engines use, in bf16 and fp32 (fp16: the GELU-only form); the sweep's other tiles with the
    GELU-only flags in bf16; the transposed (GPT-2) layout at the decode step's rows (at most
    256: the two small tiles); each without and (for sm_90 only) with programmatic dependent
    launch (see `yan_kernels.aot`). A unit weight stride is a constexpr 1, as Triton
    specializes it at run time."""
    from .aot import TORCH_TO_TRITON, AotSpec, with_pdl

    specs = []
    chosen = (GPU_GEMV, GPU_TINY, GPU_SMALL, GPU_LARGE)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        base = {a: t for a in ("x_ptr", "w_ptr", "b_ptr", "nw_ptr", "ns_ptr", "r_ptr", "out_ptr")}
        base.update({a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_rm", "stride_om")})
        base["eps"] = "fp32"
        plans = []  # (config, flags, transposed)
        for cfg in dict.fromkeys((*chosen, *SWEEP)):
            if dtype == torch.float32 and cfg.block_n > 128:
                continue  # fp32 tiles twice the bytes: the 256-wide tile is a bf16 option
            if cfg not in chosen and dtype != torch.bfloat16:
                continue
            plans.append((cfg, FLAGS if cfg in chosen and dtype != torch.float16 else FLAGS[:1],
                          False))  # fmt: skip
        if dtype != torch.float16:
            plans += [(cfg, dict.fromkeys(FLAGS_T), True) for cfg in (GPU_GEMV, GPU_TINY)]
        for cfg, flags, transposed in plans:
            unit, strided = ("stride_wn", "stride_wk") if transposed else ("stride_wk", "stride_wn")
            sig = {**base, strided: "i32"}
            for has_bias, norm, gelu, residual in flags:
                consts = dict(HAS_BIAS=has_bias, NORM=norm, GELU=gelu, RESIDUAL=residual,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              GROUP_M=cfg.group_m, DOT_PRECISION=_precision(dtype))  # fmt: skip
                consts[unit] = 1
                specs.append(AotSpec(
                    "_fused_linear_kernel", sig, consts, cfg.num_warps, cfg.num_stages,
                    label=f"{t[1:]} bias={has_bias} norm={norm} gelu={gelu} "
                          f"residual={residual} transposed={transposed} {cfg}",
                    aligned=("stride_xm", strided, "stride_rm", "stride_om", "N", "K"),
                ))  # fmt: skip
    return with_pdl(specs)
