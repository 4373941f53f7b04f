"""Ahead-of-time compilation of every kernel for real GPU targets, without a GPU.

Triton's CPU interpreter runs code that the GPU compiler rejects (a non-constexpr global read
inside `@triton.jit`, a dtype mismatch in a `tl.where`, a block too large for shared memory), so
numerical tests in the interpreter prove nothing about whether a kernel compiles. This module
compiles each kernel to PTX and cubin for `GPUTarget("cuda", 90, 32)` (H100/H200) and
`("cuda", 80, 32)` (A100) at every launch configuration its launcher can choose.

Each kernel file exports `aot_specs() -> list[AotSpec]`: one spec per (kernel, dtypes,
constexpr flags, block sizes, warps, stages) the launcher can pick. `python -m yan_kernels.aot`
compiles them all and exits non-zero on the first failure (or with `--keep-going`, after
listing every failure); it must run with `TRITON_INTERPRET` unset, because under the
interpreter `@triton.jit` yields interpreted functions that cannot be compiled.

    python -m yan_kernels.aot                   # everything, sm_90 and sm_80
    python -m yan_kernels.aot --targets 90 -k decoder

The GPU machines this project is measured on run an older Triton (`GPU_IMAGE_TRITON`) than the
CPU's, and a kernel must compile under both: `scripts/install.sh` (with test extras) installs
that version into `.cache/triton-<version>`, and the compile guard runs this driver a second
time, for sm_90, with that folder first on `PYTHONPATH` (the first line printed names the Triton
that compiled).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

# The kernel files that hold @triton.jit kernels; each exports aot_specs().
KERNEL_MODULES = (
    "yan_kernels.routed_expert",
    "yan_kernels.decoder_argmax",
    "yan_kernels.selective_scan",
    "yan_kernels.noise",
    "yan_kernels.layer_norm",
    "yan_kernels.fused_linear",
    "yan_kernels.decode_attention",
    "yan_kernels.greedy_select",
    "yan_kernels.length_masks",
    "yan_kernels.gate_route",
    "yan_kernels.attention",
)
TARGETS = (90, 80)
# The Triton of the GPU image (H100/H200 machines: torch 2.11, CUDA 13). scripts/install.sh
# installs it on its own into the checkout's `.cache/triton-<version>` (`pip install --target`,
# no dependencies) so that the guard can compile with it beside the CPU's Triton.
GPU_IMAGE_TRITON = "3.6.0"


@dataclass(frozen=True)
class AotSpec:
    """One launch configuration of one kernel.

    `signature` maps every non-constexpr argument of the kernel to its Triton type ("*bf16",
    "*fp32", "*i64", "i32", "i64", "fp32", ...); `constexprs` gives every constexpr argument's
    value. `num_warps` / `num_stages` are the launch options the launcher passes."""

    kernel: str  # attribute name of the @triton.jit function in its module
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""  # what the configuration is for, shown in reports
    module: str = field(default="", compare=False)
    # Integer arguments the launcher passes as multiples of 16 (None: every `stride*` argument
    # and `D`/`H`). At run time Triton specializes such values (and 16-byte aligned pointers)
    # and emits vectorized, pipelined loads; compiling with the same hints compiles the kernel
    # the GPU will actually run.
    aligned: tuple[str, ...] | None = None
    # The targets this configuration exists for (None: all); e.g. programmatic dependent
    # launch (a `PDL` constexpr True, launched with `launch_pdl`) only on sm_90 and newer.
    archs: tuple[int, ...] | None = None

    def describe(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        dtypes = ",".join(sorted({t for t in self.signature.values() if t.startswith("*")}))
        return (
            f"{self.module}.{self.kernel}[{self.label or flags}] dtypes={dtypes} "
            f"warps={self.num_warps} stages={self.num_stages}"
        )


def with_pdl(specs: Iterable[AotSpec]) -> list[AotSpec]:
    """Each spec of a kernel that takes the `PDL` constexpr twice: without programmatic
    dependent launch for every target, and with it for sm_90 only (`yan_kernels.pdl`: the
    launchers enable it nowhere older)."""
    from .pdl import ARCHS

    out = []
    for s in specs:
        out.append(replace(s, constexprs={**s.constexprs, "PDL": False}))
        archs = ARCHS if s.archs is None else tuple(a for a in s.archs if a in ARCHS)
        if archs:  # not for a configuration chosen only on older targets
            out.append(replace(s, constexprs={**s.constexprs, "PDL": True}, archs=archs,
                               label=f"{s.label} pdl" if s.label else ""))  # fmt: skip
    return out


def pointer(dtype: str) -> str:
    """Triton's pointer type for a dtype name: 'bf16' -> '*bf16'."""
    return "*" + dtype


TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def collect(modules: Iterable[str] = KERNEL_MODULES) -> list[AotSpec]:
    """Every spec of every kernel module, each tagged with its module."""
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        for spec in mod.aot_specs():
            out.append(AotSpec(**{**spec.__dict__, "module": name}))
    return out


def jit_kernels(module: str) -> list[str]:
    """Names of the @triton.jit kernels a module defines (helpers named `_*_kernel`)."""
    import triton

    mod = importlib.import_module(module)
    return sorted(
        n
        for n, v in vars(mod).items()
        if isinstance(v, triton.runtime.jit.JITFunction) and n.endswith("_kernel")
    )


# Shared memory one block may use on each target (the opt-in maximum, bytes): 227 KiB on Hopper,
# 163 KiB on A100. The compiler emits a kernel that needs more; the GPU then refuses to launch it
# (Triton's OutOfResources at the first call), so the guard checks the figure here.
MAX_SHARED = {90: 232_448, 80: 166_912}


def compile_spec(spec: AotSpec, arch: int) -> dict[str, object]:
    """Compile one spec for cuda:`arch`; returns resource figures (raises on failure, and when
    the kernel needs more shared memory than the target gives a block)."""
    k = compile_kernel(spec, arch)
    if "cubin" not in k.asm or not k.asm["cubin"]:
        raise RuntimeError(f"{spec.describe()}: no cubin produced for sm_{arch}")
    shared = int(k.metadata.shared)
    if shared > MAX_SHARED[arch]:
        raise RuntimeError(f"{spec.describe()}: needs {shared} bytes of shared memory, "
                           f"sm_{arch} gives a block at most {MAX_SHARED[arch]}")  # fmt: skip
    return {"shared": shared}


def compile_kernel(spec: AotSpec, arch: int):
    """Triton's compiled kernel for one spec on cuda:`arch` (its `asm` holds PTX and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    missing = [a for a in fn.arg_names if a not in spec.signature and a not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.describe()}: no type for argument(s) {missing}")
    sig = {a: ("constexpr" if a in spec.constexprs else spec.signature[a]) for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=_hints(spec, fn))
    options: dict[str, object] = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.constexprs.get("PDL"):
        options["launch_pdl"] = True  # as the launcher compiles it (`yan_kernels.pdl`)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _hints(spec: AotSpec, fn) -> dict:
    """`tt.divisibility` 16 on every pointer and on the aligned integer arguments."""
    aligned = spec.aligned
    if aligned is None:
        aligned = tuple(a for a in spec.signature if a.startswith("stride") or a in ("D", "H"))
    out = {}
    for i, a in enumerate(fn.arg_names):
        t = spec.signature.get(a, "constexpr")
        if t.startswith("*") or (a in aligned and t in ("i32", "i64")):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _compile_one(args: tuple[AotSpec, int]) -> tuple[str, int, str | None, float, dict]:
    spec, arch = args
    t0 = time.perf_counter()
    try:
        info = compile_spec(spec, arch)
    except Exception as e:  # reported, not raised: the driver lists every failure
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return spec.describe(), arch, " | ".join(msg[-6:]), time.perf_counter() - t0, {}
    return spec.describe(), arch, None, time.perf_counter() - t0, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m yan_kernels.aot", description=__doc__.split("\n")[0]
    )
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="e.g. 90,80")
    p.add_argument("-k", dest="match", default="", help="only specs whose description has this")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--keep-going", action="store_true", help="list every failure, then exit 1")
    p.add_argument("--list", action="store_true", help="list the specs and the uncovered kernels")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    specs = [s for s in collect() if args.match in s.describe()]
    covered = {(s.module, s.kernel) for s in collect()}
    uncovered = [
        f"{m}.{k}" for m in KERNEL_MODULES for k in jit_kernels(m) if (m, k) not in covered
    ]
    if args.list:
        for s in specs:
            print(s.describe())
    if uncovered:
        print("aot: kernels without an AOT spec: " + ", ".join(uncovered))
        return 1
    if args.list:
        return 0
    targets = [int(t) for t in args.targets.split(",") if t]
    work = [(s, a) for s in specs for a in targets if s.archs is None or a in s.archs]
    import triton

    print(f"aot: triton {triton.__version__} ({os.path.dirname(triton.__file__)}),"
          f" targets {', '.join(f'sm_{a}' for a in targets)}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for desc, arch, err, secs, info in pool.map(_compile_one, work):
            if err is None:
                print(f"ok    sm_{arch}  {secs:5.1f}s  smem={info['shared']:>6}  {desc}")
            else:
                failures += 1
                print(f"FAIL  sm_{arch}  {desc}\n      {err}")
                if not args.keep_going:
                    pool.shutdown(cancel_futures=True)
                    break
    print(
        f"aot: {len(work) - failures if not failures else '?'} of {len(work)} compiled,"
        f" {failures} failed, {time.perf_counter() - t0:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
