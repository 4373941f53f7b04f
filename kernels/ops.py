"""One facade per fused op, and the one switch that picks Triton or the pure-torch reference.

The choice is made once per process: Triton when a CUDA device is present and `triton` imports,
else the reference. `YAN_KERNELS=ref|triton` in the environment overrides it, and `force()` (a
context manager) or `set_backend()` override both, for tests and benchmarks. Where Triton is
chosen, `YAN_KERNELS_OFF=gate_route,length_masks` (names from `KERNEL_OPS`) sends just those
ops to their references: a kernel that misbehaves on some GPU is set aside, not the rest.

A facade runs the Triton kernel only where it can run: on CUDA tensors, or on CPU tensors under
the Triton interpreter (`TRITON_INTERPRET=1`, which must be set before `triton` is first
imported). It also falls back to the reference when autograd is recording through an input,
because the kernels have no backward. Callers call the facades unconditionally.

The selective scan (`selective_scan`) has a third implementation, mamba-ssm's CUDA kernel, and
its own setting of the same switch: `YAN_MAMBA_SCAN=auto|mamba_ssm|triton|ref` in the
environment, overridden by `force(backend, op="selective_scan")` / `set_backend(backend,
op="selective_scan")`: `auto` takes mamba-ssm for CUDA tensors when `mamba_ssm` imports, else the
switch above decides Triton or the reference; the other values name one path (see `scan_path`).

This module imports neither `triton` nor the kernel files at import time, so a caller can ask
`use_triton()` without binding `@triton.jit` before a test has set `TRITON_INTERPRET`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .decoder_argmax import DecodeResult
    from .routed_expert import TileMap

Backend = Literal["auto", "ref", "triton"]
_BACKENDS = ("auto", "ref", "triton")
_override: Backend = "auto"  # set by force() / set_backend(); "auto" defers to env + hardware
ScanBackend = Literal["auto", "mamba_ssm", "triton", "ref"]
ScanPath = Literal["mamba_ssm", "triton", "ref"]
_SCAN_BACKENDS = ("auto", "mamba_ssm", "triton", "ref")
_scan_override: ScanBackend = "auto"  # set by force(..., op="selective_scan")


def triton_available() -> bool:
    """Whether `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _decided() -> bool:
    """The once-per-process choice: env `YAN_KERNELS`, else CUDA present and Triton importable."""
    env = os.environ.get("YAN_KERNELS", "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"YAN_KERNELS must be one of {', '.join(_BACKENDS)}, got {env!r}")
    if env == "ref":
        return False
    if env == "triton":
        if not triton_available():
            raise RuntimeError("YAN_KERNELS=triton but the triton package is not installed")
        return True
    return torch.cuda.is_available() and triton_available()


def use_triton() -> bool:
    """True when the Triton kernels are selected (see the module docstring for the rules)."""
    if _override != "auto":
        return _override == "triton"
    return _decided()


def triton_selected(device: torch.device) -> bool:
    """Whether a model on `device` runs the Triton kernels: a CUDA device with `use_triton()`.
    (The CPU interpreter is for kernel tests; it never makes a model's default.)"""
    return device.type == "cuda" and use_triton()


Op = Literal["selective_scan"]
_OP_BACKENDS = {None: _BACKENDS, "selective_scan": _SCAN_BACKENDS}


def set_backend(backend: str, op: Op | None = None) -> None:
    """Select a backend for the rest of the process; `"auto"` restores the default.

    `op=None` is the switch every facade follows: `"triton"` or `"ref"`. `op="selective_scan"`
    is the scan's own setting: `"mamba_ssm"`, `"triton"` or `"ref"` (see `scan_path`). Naming
    `"triton"` or `"mamba_ssm"` needs that package to import."""
    global _override, _scan_override
    if op not in _OP_BACKENDS:
        raise ValueError(f"op must be None or 'selective_scan', got {op!r}")
    allowed = _OP_BACKENDS[op]
    if backend not in allowed:
        raise ValueError(f"backend must be one of {', '.join(allowed)}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package")
    if backend == "mamba_ssm" and not mamba_ssm_available():
        raise RuntimeError("backend 'mamba_ssm' needs the mamba_ssm package (with CUDA)")
    if op is None:
        _override = backend  # type: ignore[assignment]
    else:
        _scan_override = backend  # type: ignore[assignment]


@contextmanager
def force(backend: str, op: Op | None = None) -> Iterator[None]:
    """`with force("ref"): ...` runs the block with that backend (for `op`, as in `set_backend`),
    then restores the previous one."""
    previous = _override if op is None else _scan_override
    set_backend(backend, op)
    try:
        yield
    finally:
        set_backend(previous, op)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# The facades whose kernels `YAN_KERNELS_OFF` can switch off one by one.
KERNEL_OPS = (
    "routed_expert_euler", "decoder_argmax", "fused_linear", "decode_attention", "greedy_select",
    "gate_route", "length_masks", "add_layer_norm", "request_noise", "attention",
)  # fmt: skip


def kernels_off() -> frozenset[str]:
    """The ops `YAN_KERNELS_OFF` (comma-separated names of `KERNEL_OPS`) sends to their
    references while the rest run Triton: a kernel that misbehaves on some GPU can be set
    aside without giving up the others. Read at every call (a dictionary lookup)."""
    names = frozenset(
        n.strip() for n in os.environ.get("YAN_KERNELS_OFF", "").split(",") if n.strip()
    )
    unknown = names - set(KERNEL_OPS)
    if unknown:
        raise ValueError(f"YAN_KERNELS_OFF names unknown op(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(KERNEL_OPS)}")  # fmt: skip
    return names


def _kernel_runs(op: str, ts: list[Tensor]) -> bool:
    """Triton selected and not switched off for `op` (`kernels_off`), and every tensor where the
    kernel can reach it (the facades whose inputs are integers; the rest use `_take_triton`)."""
    return use_triton() and op not in kernels_off() and _triton_runs_on(ts)


def _take_triton(*tensors: Tensor | None, op: str, also: tuple[Tensor | None, ...] = ()) -> bool:
    """`_kernel_runs`, and the floating inputs in one dtype the kernels support (mixed dtypes,
    e.g. fp32 weights under autocast, go to the reference), none recording autograd. `also`:
    the kernel's other tensors (indices, state, fp32 side inputs), which need only be on the
    same device."""
    ts = [t for t in tensors if t is not None]
    if not _kernel_runs(op, [*ts, *(t for t in also if t is not None)]):
        return False
    if (
        len({t.dtype for t in ts if t.is_floating_point()}) != 1
        or ts[0].dtype not in _KERNEL_DTYPES
    ):
        return False
    return not _records_grad(ts)  # no backward in the kernels: let autograd see the reference


def _records_grad(ts: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _triton_runs_on(ts: list[Tensor]) -> bool:
    """All on one device the kernels reach: a CUDA device, or the CPU with the interpreter
    selected."""
    devices = {t.device for t in ts}
    if len(devices) > 1:
        return False
    return all(d.type == "cuda" or (d.type == "cpu" and interpreting()) for d in devices)


def routed_expert_euler(
    h: Tensor,
    expert: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    z: Tensor | None = None,
    dt: float = 1.0,
    tiles: TileMap | None = None,
) -> Tensor:
    """`z + dt * FFN_expert(h)` per token (or `FFN_expert(h)` when z is None): h [N, d],
    expert [N] long, w1 [K, d, F], b1 [K, F], w2 [K, F, d], b2 [K, d], z [N, d] -> [N, d].
    `tiles` (from `expert_tiles`) lets a solve group its tokens by expert once."""
    from . import routed_expert as m  # the submodule, imported on first use

    if torch.compiler.is_compiling() or (h.is_cuda and _records_grad([h, w1, b1, w2, b2])):
        # training on a GPU: the grouped reference syncs with the host once per expert
        # (`nonzero`), which stalls a launch-bound training step; every expert at every token,
        # then the routed one, is the same function and gradient with no sync (and, under
        # torch.compile, no data-dependent shape)
        return m.routed_expert_euler_dense(h, expert, w1, b1, w2, b2, z, dt)
    if _take_triton(h, w1, b1, w2, b2, z, op="routed_expert_euler", also=(expert,)):
        return m.routed_expert_euler(h, expert, w1, b1, w2, b2, z, dt, tiles=tiles)
    return m.routed_expert_euler_ref(h, expert, w1, b1, w2, b2, z, dt)


def expert_tiles(expert: Tensor, n_experts: int, like: Tensor) -> TileMap | None:
    """The token grouping `routed_expert_euler` would build for `expert` [N] with activations
    like `like` [N, d], when the Triton kernel will run; None for the reference (it groups with
    `nonzero` itself)."""
    from . import routed_expert as m

    if not _take_triton(like, op="routed_expert_euler", also=(expert,)):
        return None
    blocks = m.default_blocks(like.device, expert.shape[0])
    return m.build_tile_map(expert, n_experts, blocks.block_m)


def routed_expert(
    h: Tensor, expert: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Only the routed expert's field per token: h [N, d], expert [N] -> [N, d]."""
    return routed_expert_euler(h, expert, w1, b1, w2, b2, None, 1.0)


def decoder_argmax(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    temperature: Tensor | float | None = None,
    seed: Tensor | None = None,
    labels: Tensor | None = None,
) -> DecodeResult:
    """lm_head + softmax statistics per row without materializing logits: x [N, d],
    weight [V, d], bias [V] -> DecodeResult (see `yan_kernels.decoder_argmax`)."""
    from . import decoder_argmax as m

    fn = (
        m.decoder_argmax
        if _take_triton(x, weight, bias, op="decoder_argmax")
        else m.decoder_argmax_ref
    )
    return fn(x, weight, bias, temperature, seed, labels)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """gelu(x @ weight.T + bias) with the exact (erf) GELU in the GEMM's epilogue: x [..., K],
    weight [N, K], bias [N] or None -> [..., N] (see `yan_kernels.fused_linear`)."""
    return fused_linear(x, weight, bias, gelu=True)


def fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm: tuple[Tensor, Tensor, float] | None = None,
    gelu: bool = False,
    approximate: str = "none",
    residual: Tensor | None = None,
    transposed: bool = False,
) -> Tensor:
    """[residual +] [gelu](LayerNorm?(x) @ weight.T + bias) in one GEMM: x [..., K], weight
    [N, K] ([K, N] when `transposed`), bias [N] or None, `norm` (scale [K], shift [K], eps) or
    None, `approximate` as F.gelu's, residual [..., N] or None -> [..., N] (see
    `yan_kernels.fused_linear`)."""
    from . import fused_linear as m

    ts = (x, weight, bias, residual, *(norm[:2] if norm else ()))
    fn = m.fused_linear if _take_triton(*ts, op="fused_linear") else m.fused_linear_ref
    return fn(x, weight, bias, norm=norm, gelu=gelu, approximate=approximate, residual=residual,
              transposed=transposed)  # fmt: skip


def decode_attention(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    slot: Tensor,
    n_head: int,
    counts: Tensor | None = None,
) -> Tensor:
    """One decode step's attention: writes the step's key and value (from the QKV row `qkv`
    [B, 3d]) into the caches [B, H, >= L, hd] at `slot` [1], then attends each row's query over
    its `valid` [B, L] slots -> [B, d] (see `yan_kernels.decode_attention`). `counts` [>= B * H]
    int32 zeros: the kernel's arrival counters when it splits the slots, kept by the caller so
    that a captured step needs no memset."""
    from . import decode_attention as m

    run = _take_triton(qkv, k_cache, v_cache, op="decode_attention", also=(valid, slot))
    fn = m.decode_attention if run else m.decode_attention_ref
    return fn(qkv, k_cache, v_cache, valid, slot, n_head, counts=counts)


def greedy_select(
    logits: Tensor,
    out_tok: Tensor,
    out_p: Tensor,
    slot: Tensor,
    done: Tensor,
    left: Tensor,
    stop_eos: Tensor,
    eos: Tensor,
    tok: Tensor,
    pos: Tensor,
    counts: Tensor | None = None,
) -> None:
    """A greedy decode step's end, in place: each row's argmax token of `logits` [B, V] and its
    probability recorded at column slot + 1, its stopping state updated, its token and position
    advanced (see `yan_kernels.greedy_select`). `counts` [>= B] int32 zeros: the kernel's
    per-row arrival counters, kept by the caller so that a captured step needs no memset."""
    from . import greedy_select as m

    state = (out_tok, out_p, slot, done, left, stop_eos, eos, tok, pos)
    run = _take_triton(logits, op="greedy_select", also=state)
    (m.greedy_select if run else m.greedy_select_ref)(logits, *state, counts=counts)


def attention(q: Tensor, k: Tensor, v: Tensor, klen: Tensor, Lq: int, Lk: int) -> Tensor:
    """Bidirectional attention of key-padded rows: q [B * Lq, H, hd], k / v [B * Lk, H, hd]
    views, klen [B] int32 real keys per row (0: all) -> [B * Lq, H * hd] (see
    `yan_kernels.attention`)."""
    from . import attention as m

    ok = _take_triton(q, k, v, op="attention", also=(klen,))
    return (m.attention if ok else m.attention_ref)(q, k, v, klen, Lq, Lk)


def gate_route(
    h: Tensor,
    row: Tensor,
    w1: Tensor,
    w2: Tensor,
    b2: Tensor,
    temperature: float,
    routing: str,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The MoE gate and routing: h [B, L, D], row [B, G], w1 [G, D], w2 [K, G], b2 [K] ->
    (probs [B, L, K] fp32, expert [B, L] long) by "argmax" or "sample" (with `uniforms` [B, L])
    (see `yan_kernels.gate_route`)."""
    from . import gate_route as m

    ok = _take_triton(h, row, w1, w2, b2, op="gate_route", also=(uniforms,))
    fn = m.gate_route if ok else m.gate_route_ref
    return fn(h, row, w1, w2, b2, temperature, routing, uniforms)


def length_masks(
    src_len: Tensor, tgt_len: Tensor, Lx: int, Ly: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A padded batch's prefix masks [B, Lx] / [B, Ly] bool and additive key biases (0 / -inf,
    all 0 for a row without a real key) in `dtype`, from its lengths [B] (see
    `yan_kernels.length_masks`)."""
    from . import length_masks as m

    run = dtype in _KERNEL_DTYPES and _kernel_runs("length_masks", [src_len, tgt_len])
    return (m.length_masks if run else m.length_masks_ref)(src_len, tgt_len, Lx, Ly, dtype)


def add_layer_norm(
    x: Tensor,
    y: Tensor | None,
    weight: Tensor | None,
    shift: Tensor | None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """(res, out): res = x + y + bias (x when y is None), out = LayerNorm(res) * weight + shift;
    x, y [N, d], weight / shift / bias [d] or None (see `yan_kernels.layer_norm`)."""
    from . import layer_norm as m

    ts = (x, y, weight, shift, bias)
    fn = m.add_layer_norm if _take_triton(*ts, op="add_layer_norm") else m.add_layer_norm_ref
    return fn(x, y, weight, shift, bias, eps)


def request_noise(
    seed: Tensor, length: Tensor, L: int, d: int, init_noise: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Each request's draws from a counter-based generator keyed by its seed, on the seeds'
    device: seed [B] int64, length [B] -> z0 [B, L, d] (dtype), routing uniforms [B, L] and
    token uniforms [B, L] (fp32), zero past each length (see `yan_kernels.noise`)."""
    from . import noise as m

    fn = m.request_noise if _kernel_runs("request_noise", [seed, length]) else m.request_noise_ref
    return fn(seed, length, L, d, init_noise, dtype)


# ------------------------------------------------------------------------------ selective scan


@functools.cache
def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's selective scan imports (with its CUDA extension); tried once."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or a CUDA extension that fails to load on this host
        return False
    return True


@functools.cache
def _scan_env() -> ScanBackend:
    env = os.environ.get("YAN_MAMBA_SCAN", "auto").strip().lower() or "auto"
    if env not in _SCAN_BACKENDS:
        raise ValueError(f"YAN_MAMBA_SCAN must be one of {', '.join(_SCAN_BACKENDS)}, got {env!r}")
    if env == "mamba_ssm" and not mamba_ssm_available():
        raise RuntimeError("YAN_MAMBA_SCAN=mamba_ssm but mamba_ssm does not import")
    if env == "triton" and not triton_available():
        raise RuntimeError("YAN_MAMBA_SCAN=triton but the triton package is not installed")
    return env  # type: ignore[return-value]


def scan_backend() -> ScanBackend:
    """The selective-scan preference: `force(..., op="selective_scan")`, else `YAN_MAMBA_SCAN`."""
    return _scan_override if _scan_override != "auto" else _scan_env()


def _one_kernel_dtype(*scan_inputs: Tensor | None) -> bool:
    """For (u, delta, A, B, C, D, z): the activations u, delta, B, C, z share one dtype and every
    given input is a kernel dtype (A and D may differ from the activations)."""
    u, delta, _, B, C, _, z = scan_inputs
    acts = {t.dtype for t in (u, delta, B, C, z) if t is not None}
    given = [t for t in scan_inputs if t is not None]
    return len(acts) == 1 and all(t.dtype in _KERNEL_DTYPES for t in given)


def scan_path(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
) -> ScanPath:
    """Which implementation `selective_scan` runs for these inputs.

    The fused paths need the activations (u, delta, B, C, z) in one dtype among fp32 / bf16 /
    fp16 (A and D may differ) and no autograd recording through any input; otherwise "ref".
    Then, by `scan_backend()`:
    - "auto": mamba_ssm when every input is on CUDA and it imports; else Triton when
      `use_triton()` and it can run here (CUDA, or the CPU under the interpreter); else ref.
    - "mamba_ssm": mamba_ssm on CUDA inputs, else ref.  "triton": Triton where it can run,
      else ref.  "ref": ref.
    """
    ts = [t for t in (u, delta, A, B, C, D, z) if t is not None]
    if not _one_kernel_dtype(u, delta, A, B, C, D, z) or _records_grad(ts):
        return "ref"
    backend = scan_backend()
    if backend in ("auto", "mamba_ssm"):
        on_cuda = all(t.is_cuda for t in ts) and len({t.device for t in ts}) == 1
        if on_cuda and mamba_ssm_available():
            return "mamba_ssm"
        if backend == "mamba_ssm":
            return "ref"
    triton = backend == "triton" or (backend == "auto" and use_triton())
    return "triton" if triton and _triton_runs_on(ts) else "ref"


def selective_scan(
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
    """Mamba-1 selective scan with the skip and gate fused, `(scan + D * u) * silu(z)`:
    u, delta [Bt, L, Di], A [Di, N], B, C [Bt, L, N], D [Di] or None, z [Bt, L, Di] or None
    -> [Bt, L, Di] in u's dtype (see `yan_kernels.selective_scan`; path by `scan_path`).

    `chunk` and `inner` configure the reference's chunked scan (`selective_scan_chunked`); the
    fused paths ignore them. The reference takes any float dtypes (e.g. mixed under autocast):
    where they are not one kernel dtype it runs on fp32 copies and rounds to u's dtype."""
    path = scan_path(u, delta, A, B, C, D, z)
    if path == "ref":
        from . import chunked_scan as m

        ts = (u, delta, A, B, C, D, z)
        if _one_kernel_dtype(*ts):
            return m.selective_scan_ref(*ts, chunk=chunk, inner=inner)
        wide = (None if t is None else t.float() for t in ts)
        return m.selective_scan_ref(*wide, chunk=chunk, inner=inner).to(u.dtype)
    from . import selective_scan as m

    fn = m.selective_scan if path == "triton" else m.selective_scan_mamba_ssm
    return fn(u, delta, A, B, C, D, z)
