"""`python -m yan_serve.bench scan`: the Mamba-1 selective scan at Bt x L x Di x N shapes.

Paths: the sequential oracle (`yan_kernels.chunked_scan.selective_scan_sequential`),
`selective_scan_chunked` with its two chunk solvers ("loop", the CPU path; "doubling", the CUDA
training path), each forward (no_grad) and forward + backward, and, on CUDA, the fused
forward-only paths of `yan_kernels.ops.selective_scan` (the Triton kernel, and mamba-ssm's
kernel when it imports). Per row: median ms, speedup over the oracle, GB/s of minimal traffic
and its share of the measured copy bandwidth, and the max abs error against the oracle in fp32
(of y, and of the input grads for forward + backward). On a CPU the fused rows read
"n/a (interpreter)" (Triton) and "n/a (not installed)" or "n/a (needs CUDA)" (mamba-ssm).
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from yan_serve.bench.common import (
    CPU_BUDGET_S,
    DTYPES,
    TRITON_ON_CPU,
    bench_device,
    copy_bandwidth,
    finish,
    fmt,
    print_header,
    run_header,
    suite_parser,
    timer,
)

HELP = "Mamba selective scan: oracle vs chunked (loop, doubling) vs fused, fwd and fwd+bwd"
SCAN_DTYPES = {**DTYPES, "fp16": torch.float16}
SCAN_CHUNK = 64  # selective_scan_chunked's default chunk, the one the model runs
SCAN_TORCH_PATHS = ("ref", "chunked-loop", "chunked-doubling")  # differentiable: fwd and fwd+bwd
SCAN_FUSED_PATHS = ("triton", "mamba_ssm")  # yan_kernels.ops.selective_scan's fused paths: fwd
SCAN_MODES = ("fwd", "fwd+bwd")
NOT_INSTALLED = "n/a (not installed)"
NEEDS_CUDA = "n/a (needs CUDA)"
SCAN_COLUMNS = (
    f"{'path':<18}{'mode':<9}{'shape':<16}{'ms':>10}{'speedup':>9}{'GB/s':>9}{'% copy':>8}"
    f"{'max err':>10}"
)
# Per device: the default dtype, timed calls and shapes.
DEFAULTS = {
    "cuda": ("bf16", 20, [(8, 1024, 1024, 16), (64, 256, 1024, 16)]),
    "cpu": ("fp32", 10, [(16, 128, 256, 16), (1, 512, 256, 16)]),
}

Shape = tuple[int, int, int, int]  # Bt, L, Di, N


@dataclass
class ScanRow:
    path: str  # "ref", "chunked-loop", "chunked-doubling", "triton" or "mamba_ssm"
    mode: str  # "fwd" (under no_grad) or "fwd+bwd" (y, then the grads of (y * w).sum())
    shape: str  # BtxLxDixN
    ms: float | None  # median; None: not timed (`status` says why)
    status: str  # "ok", "oom", TRITON_ON_CPU, NOT_INSTALLED or NEEDS_CUDA
    speedup: float | None  # the ref row's ms / ms, same shape and mode
    bytes: int  # minimal traffic in the input dtype (see `_scan_bytes`)
    gbps: float | None
    copy_pct: float | None  # gbps as a share of the measured copy bandwidth, in %
    max_err: float | None  # max |out - oracle| in fp32: y, and for fwd+bwd also the grads

    def line(self) -> str:
        start = f"{self.path:<18}{self.mode:<9}{self.shape:<16}"
        if self.status not in ("ok", "oom"):
            return f"{start}  {self.status}"
        speed = "-" if self.speedup is None else f"{self.speedup:.2f}x"  # "-": this or ref oom
        gbps = "-" if self.gbps is None else f"{self.gbps:.2f}"
        pct = "-" if self.copy_pct is None else f"{self.copy_pct:.1f}%"
        err = "-" if self.max_err is None else f"{self.max_err:.1e}"
        return f"{start}{fmt(self.ms, '10.3f')}{speed:>9}{gbps:>9}{pct:>8}{err:>10}"


def _scan_bytes(shape: Shape, elt: int, mode: str, gate: bool) -> int:
    """Minimal traffic: fwd reads u, delta, B, C (and z when the gate is fused) and writes y;
    fwd+bwd then reads u, delta, B, C and dy again and writes their four grads. A [Di, N] and
    D [Di] are left out (negligible)."""
    bt, length, di, n = shape
    act = 2 * bt * length * di + 2 * bt * length * n  # u, delta, B, C
    y = bt * length * di
    if mode == "fwd":
        return elt * (act + y + (y if gate else 0))
    return elt * (3 * act + 2 * y)


def _scan_inputs(shape: Shape, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Mamba-like inputs: delta = softplus(x - 2) (about 0.1, as after dt_proj's bias), A the
    S4D-real init -[1..N] per channel and D = 1 (both fp32, as the model keeps them), u, B, C,
    the gate z and the loss weights w standard normal, all activations in `dtype`."""
    bt, length, di, n = shape
    torch.manual_seed(0)

    def act(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device).to(dtype)

    u, B, C = act(bt, length, di), act(bt, length, n), act(bt, length, n)
    delta = torch.nn.functional.softplus(torch.randn(bt, length, di, device=device) - 2).to(dtype)
    A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(di, 1)
    D = torch.ones(di, device=device)
    return {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D,
            "z": act(bt, length, di), "w": act(bt, length, di)}  # fmt: skip


def _scan_fn(path: str) -> Callable:
    """(u, delta, A, B, C, D[, z]) -> y for one path; the fused ones import on first use."""
    from yan_kernels.chunked_scan import selective_scan_chunked, selective_scan_sequential

    if path == "ref":
        return selective_scan_sequential
    if path in ("chunked-loop", "chunked-doubling"):
        inner = path.split("-")[1]
        return lambda *a: selective_scan_chunked(*a, chunk=SCAN_CHUNK, inner=inner)
    from yan_kernels import selective_scan as kernels

    return kernels.selective_scan if path == "triton" else kernels.selective_scan_mamba_ssm


def _scan_call(path: str, mode: str, x: dict[str, torch.Tensor]) -> Callable[[], tuple]:
    """The timed call, which also returns what the check compares: (y,) for fwd, (y, grad u,
    grad delta, grad A, grad B, grad C) for fwd+bwd. Fused paths take and apply the gate z."""
    fn = _scan_fn(path)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    if path in SCAN_FUSED_PATHS:
        args = (*args, x["z"])
    if mode == "fwd":

        def fwd() -> tuple:
            with torch.no_grad():
                return (fn(*args),)

        return fwd
    leaves = [t.detach().requires_grad_() for t in args[:5]]

    def fwd_bwd() -> tuple:
        y = fn(*leaves, *args[5:])
        grads = torch.autograd.grad((y * x["w"]).sum(), leaves)
        return (y.detach(), *grads)

    return fwd_bwd


def _fused_unavailable(path: str, device: str) -> str | None:
    """Why a fused path cannot be timed here, or None when it can."""
    if path == "triton":
        return None if device == "cuda" else TRITON_ON_CPU
    from yan_kernels import ops

    if not ops.mamba_ssm_available():
        return NOT_INSTALLED
    return None if device == "cuda" else NEEDS_CUDA


def _scan_oracle(x: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """`selective_scan_sequential` in fp32 on the same input values: y per mode, fused-gated y."""
    x32 = {k: v.float() for k, v in x.items()}
    oracle = {mode: _scan_call("ref", mode, x32)() for mode in SCAN_MODES}
    gated = (oracle["fwd"][0] * torch.nn.functional.silu(x32["z"]),)
    return {**oracle, "gated": gated}


def _max_err(out: tuple, want: tuple) -> float:
    return max((a.float() - b).abs().max().item() for a, b in zip(out, want, strict=True))


def _scan_cell(
    path: str, mode: str, x: dict, oracle: dict, iters: int, device: str
) -> tuple[float | None, str, float | None]:
    """(median ms, status, max err) of one path and mode; on CUDA an OOM gives (None, "oom")."""
    try:
        call = _scan_call(path, mode, x)
        want = oracle["gated" if path in SCAN_FUSED_PATHS else mode]
        err = _max_err(call(), want)
        return timer(device)(call, iters), "ok", err
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "oom", None


def _scan_rows(
    shapes: list[Shape], dtype: torch.dtype, device: str, iters: int, bw: float
) -> Iterator[ScanRow]:
    """Per shape, per path, per mode; the fused paths forward only (they have no backward)."""
    elt = torch.finfo(dtype).bits // 8
    for shape in shapes:
        label = "x".join(map(str, shape))
        x = _scan_inputs(shape, dtype, device)
        oracle = _scan_oracle(x)
        ref_ms: dict[str, float | None] = {}
        for path in (*SCAN_TORCH_PATHS, *SCAN_FUSED_PATHS):
            fused = path in SCAN_FUSED_PATHS
            for mode in SCAN_MODES[:1] if fused else SCAN_MODES:
                nbytes = _scan_bytes(shape, elt, mode, gate=fused)
                reason = _fused_unavailable(path, device) if fused else None
                if reason is not None:
                    yield ScanRow(path, mode, label, None, reason, None, nbytes, None, None, None)
                    continue
                ms, status, err = _scan_cell(path, mode, x, oracle, iters, device)
                if path == "ref":
                    ref_ms[mode] = ms
                base = ref_ms.get(mode)
                speed = None if ms is None or base is None else base / ms
                gbps = None if ms is None else nbytes / ms / 1e6
                pct = None if gbps is None else 100 * gbps * 1e9 / bw
                yield ScanRow(path, mode, label, ms, status, speed, nbytes, gbps, pct, err)
        del x, oracle
        if device == "cuda":
            torch.cuda.empty_cache()


def run_scan(args: argparse.Namespace) -> int:
    if (device := bench_device(args, "scan")) is None:
        return 2
    dtype_name, iters, shapes = DEFAULTS[device]
    dtype_name = args.dtype or dtype_name
    iters = args.iters or iters
    shapes = args.shapes or shapes
    bw = copy_bandwidth(iters, device)
    header = {
        **run_header(device),
        "python": platform.python_version(),
        "dtype": dtype_name,
        "chunk": SCAN_CHUNK,
        "copy_GBps": round(bw / 1e9, 1),
    }
    print_header(header)
    print(SCAN_COLUMNS)
    rows = []
    for r in _scan_rows(shapes, SCAN_DTYPES[dtype_name], device, iters, bw):
        rows.append(r)
        print(r.line(), flush=True)
    timing = (
        f"medians of {iters} calls (CUDA events)"
        if device == "cuda"
        else f"wall-clock medians of up to {iters} calls (fewer past {CPU_BUDGET_S} s)"
    )
    return finish(
        args,
        header,
        rows,
        "shape: Bt x L x Di x N. ref: selective_scan_sequential, the oracle. chunked-loop /\n"
        f"chunked-doubling: selective_scan_chunked(chunk={SCAN_CHUNK}, inner=loop|doubling)."
        " triton /\nmamba_ssm: the fused paths of yan_kernels.ops.selective_scan (D skip and"
        " silu(z) gate\nfused; forward only). fwd: under no_grad; fwd+bwd: y, then the grads of"
        " (y * w).sum()\nwrt u, delta, A, B, C. speedup: ref ms / ms at the same shape and"
        f" mode.\nms: {timing}.\nGB/s: minimal bytes in the input dtype / ms (fwd: read u,"
        " delta, B, C (+ z fused),\nwrite y; fwd+bwd: also read them and dy again, write their"
        " grads). % copy: share of\ncopy_GBps. max err: max |out - oracle| in fp32 over y"
        " (fwd+bwd: and the five grads);\noracle: selective_scan_sequential in fp32 on the same"
        " inputs (fused: times silu(z)).\ntriton and mamba_ssm need CUDA: a CPU runs Triton only in"
        " its interpreter (not timed).",
    )


def _shape_list(text: str) -> list[Shape]:
    """`16x128x256x16,1x512x256x16` -> [(Bt, L, Di, N), ...], each a positive integer."""
    shapes = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        dims = item.lower().split("x")
        if len(dims) != 4 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated BtxLxDixN shapes of positive integers"
                f" (e.g. 16x128x256x16), got {item!r}"
            )
        shapes.append((int(dims[0]), int(dims[1]), int(dims[2]), int(dims[3])))
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected comma-separated BtxLxDixN shapes, got {text!r}")
    return shapes


def add_scan(sub: argparse._SubParsersAction) -> None:
    dtype_help = "activations u, delta, B, C, z (default: bf16 on CUDA, fp32 on CPU)"
    iters = (DEFAULTS["cuda"][1], DEFAULTS["cpu"][1])
    p = suite_parser(sub, "scan", HELP, run_scan, iters, SCAN_DTYPES, dtype_help)
    p.add_argument(
        "--shapes",
        type=_shape_list,
        help="BtxLxDixN, comma-separated (default CUDA 8x1024x1024x16,64x256x1024x16;"
        " CPU 16x128x256x16,1x512x256x16)",
    )
