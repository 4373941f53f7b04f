"""The compile guard: every Triton kernel compiles for real GPU targets, checked on the CPU.

Triton's interpreter (what the kernel tests use without CUDA) runs code that the GPU compiler
rejects, so `python -m yan_kernels.aot` compiles every kernel for sm_90 and sm_80 at every
launch configuration its launcher can choose (each kernel file's `aot_specs()`). These tests
run that driver, check that the specs cover every kernel and name every argument, and show the
guard failing on a known bug class (a non-constexpr module global read inside `@triton.jit`).
The GPU machines run an older Triton than this one (`GPU_IMAGE_TRITON`); the guard compiles
every kernel for sm_90 with that version too (`scripts/install.sh` puts it in `.cache/`).

Every check runs in a subprocess without `TRITON_INTERPRET`, which the test session sets:
under the interpreter `@triton.jit` yields interpreted functions that cannot be compiled.

Run: python -m pytest -q tests/kernels/test_compile_guard.py   (-m "not slow" skips the full
compile: 683 launch configurations, 1,072 compilations with this Triton for sm_90 and sm_80 and
683 more with the GPU image's for sm_90, about 1 s each: some 30 minutes of a CI run's two
cores shared with the rest of the suite, 2026-11-28)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from yan_kernels.aot import GPU_IMAGE_TRITON, TARGETS

# The whole driver, with room for slow CI machines; it prints a line per compiled spec.
FULL_COMPILE_TIMEOUT_S = 1800
# The GPU image's Triton, installed apart by scripts/install.sh (pip --target, no dependencies).
GPU_TRITON = Path(__file__).resolve().parents[2] / ".cache" / f"triton-{GPU_IMAGE_TRITON}"


# The interpreter, and the switch that lets the compiler accept non-constexpr globals: a
# deployment sets neither, so the guard must not either.
_UNSET = ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")


def _env(tmp_path: Path, pythonpath: Path | None = None) -> dict[str, str]:
    """The test's environment without `_UNSET`, with a fresh Triton cache (every kernel is
    compiled, not fetched) and `pythonpath` first on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"


def test_every_kernel_has_a_spec(tmp_path: Path) -> None:
    """`--list` exits 1 when a @triton.jit kernel of a KERNEL_MODULES file has no spec (and
    fails outright when a module is missing or has no `aot_specs`)."""
    proc = _run(["-m", "yan_kernels.aot", "--list"], _env(tmp_path), timeout=300)
    assert proc.returncode == 0, _output(proc)
    assert proc.stdout.strip(), "the driver listed no specs"


# Run without the interpreter, so kernels are JITFunctions with `params`: prints one line per
# problem (an argument missing from a spec, one it names that the kernel lacks, a runtime
# argument given as a constexpr or the reverse, an unknown type, a duplicate spec). A runtime
# int may be given as the constexpr 1: that is how Triton itself specializes ints equal to 1.
_ARG_CHECK = """
import importlib, re
from yan_kernels.aot import collect
SCALAR = r"(i1|i8|i16|i32|i64|u8|u16|u32|u64|fp8e4nv|fp8e5|fp16|bf16|fp32|fp64)"
TYPE = re.compile(r"\\*?" + SCALAR + r"|tensordesc<" + SCALAR + r"\\[\\d+, \\d+\\]>")
seen, n = set(), 0
for s in collect():
    n += 1
    fn = getattr(importlib.import_module(s.module), s.kernel)
    const = [p.name for p in fn.params if p.is_constexpr]
    runtime = [a for a in fn.arg_names if a not in const]
    where = s.describe()
    one = lambda a: type(s.constexprs.get(a)) is int and s.constexprs[a] == 1
    ones = [a for a in runtime if a not in s.signature and one(a)]
    if missing := [a for a in runtime if a not in s.signature and a not in ones]:
        print(f"{where}: signature lacks {missing}")
    if missing := [a for a in const if a not in s.constexprs]:
        print(f"{where}: constexprs lacks {missing}")
    if extra := [a for a in s.signature if a not in runtime]:
        print(f"{where}: signature has {extra}, not runtime arguments of {s.kernel}")
    if extra := [a for a in s.constexprs if a not in const and a not in ones]:
        print(f"{where}: constexprs has {extra}, not constexpr arguments of {s.kernel}")
    if bad := {a: t for a, t in s.signature.items() if not TYPE.fullmatch(t)}:
        print(f"{where}: unknown types {bad}")
    if s.num_warps < 1 or s.num_warps & (s.num_warps - 1):
        print(f"{where}: num_warps {s.num_warps} is not a power of two")
    key = (s.module, s.kernel, repr(sorted(s.signature.items())),
           repr(sorted(s.constexprs.items())), s.num_warps, s.num_stages)
    if key in seen:
        print(f"{where}: duplicate spec")
    seen.add(key)
print(f"checked {n} specs")
"""


def test_every_spec_names_every_kernel_argument(tmp_path: Path) -> None:
    """compile_spec rejects a spec without some argument only when it compiles it; this checks
    every spec up front, both ways, and that constexprs and runtime arguments are not mixed
    up (a runtime argument given as a constexpr would compile a different kernel)."""
    proc = _run(["-c", _ARG_CHECK], _env(tmp_path), timeout=300)
    assert proc.returncode == 0, _output(proc)
    *problems, summary = proc.stdout.strip().splitlines()
    assert not problems, "\n".join(problems)
    assert re.fullmatch(r"checked [1-9]\d* specs", summary), _output(proc)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path: Path) -> None:
    """The guard itself: every spec of every kernel module, PTX and cubin, on the CPU."""
    proc = _run(
        ["-m", "yan_kernels.aot", "--keep-going"], _env(tmp_path), timeout=FULL_COMPILE_TIMEOUT_S
    )
    _compiled_all(proc)


def _compiled_all(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, _output(proc)
    done = re.search(r"aot: (\d+) of (\d+) compiled, 0 failed", proc.stdout)
    assert done and done[1] == done[2] and int(done[1]) > 0, _output(proc)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_with_the_gpu_images_triton(tmp_path: Path) -> None:
    """The same specs for sm_90 under the Triton the H100/H200 image has: a kernel written
    against this machine's newer Triton (an argument, a builtin, a layout rule it added) must
    not reach the GPU to fail there. The driver's first line names the Triton it imported."""
    if not (GPU_TRITON / "triton" / "__init__.py").is_file():
        why = f"triton {GPU_IMAGE_TRITON} is not in {GPU_TRITON} (scripts/install.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    proc = _run(
        ["-m", "yan_kernels.aot", "--keep-going", "--targets", "90"],
        _env(tmp_path, pythonpath=GPU_TRITON),
        timeout=FULL_COMPILE_TIMEOUT_S,
    )
    assert proc.stdout.startswith(f"aot: triton {GPU_IMAGE_TRITON} ({GPU_TRITON}"), _output(proc)
    _compiled_all(proc)


# For each kernel that takes the PDL flag: its first spec's PTX for sm_90 with the flag and
# without it, as "<kernel> <wait> <trigger> <launch_pdl>" lines.
_PDL_PTX = """
from yan_kernels.aot import collect, compile_kernel
seen = set()
for s in collect():
    if "PDL" not in s.constexprs or (s.kernel, s.constexprs["PDL"]) in seen:
        continue
    seen.add((s.kernel, s.constexprs["PDL"]))
    k = compile_kernel(s, 90)
    ptx = k.asm["ptx"]
    print(s.kernel, s.constexprs["PDL"], "griddepcontrol.wait" in ptx,
          "griddepcontrol.launch_dependents" in ptx, bool(k.metadata.launch_pdl))
"""


# Kernels outside the YAN sample and the AR decode step: no PDL flag.
_NO_PDL = {"_selective_scan_kernel", "_philox_kernel"}
_JIT_KERNELS = """
from yan_kernels.aot import KERNEL_MODULES, jit_kernels
print(" ".join(k for m in KERNEL_MODULES for k in jit_kernels(m)))
"""


def test_pdl_flag_emits_the_grid_dependency_control(tmp_path: Path) -> None:
    """The PDL variants are real: with the flag the sm_90 PTX waits on the previous grid and
    triggers the next (and the kernel carries `launch_pdl`), without it neither instruction is
    there; every kernel of the YAN sample and the AR decode step has both (`yan_kernels.pdl`),
    and the specs list PDL only for sm_90."""
    proc = _run(["-c", _JIT_KERNELS], _env(tmp_path), timeout=300)
    assert proc.returncode == 0, _output(proc)
    kernels = set(proc.stdout.split()) - _NO_PDL
    assert len(kernels) >= 14 and _NO_PDL.issubset(proc.stdout.split()), _output(proc)
    proc = _run(["-c", _PDL_PTX], _env(tmp_path), timeout=900)
    assert proc.returncode == 0, _output(proc)
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in proc.stdout.splitlines()}
    assert {k for k, _ in rows} == kernels, _output(proc)
    for k in kernels:
        assert rows[(k, "True")] == ["True", "True", "True"], _output(proc)
        assert rows[(k, "False")] == ["False", "False", "False"], _output(proc)
    proc = _run(["-c", _PDL_ARCHS], _env(tmp_path), timeout=300)
    assert proc.stdout.split() == ["[(90,)]", "0"], _output(proc)


# The targets of the PDL specs, then how many specs that an sm_90 launch can choose (every target,
# or sm_90's own) lack their PDL twin, or are the twin of a configuration for older targets only.
_PDL_ARCHS = """
from yan_kernels.aot import collect
specs = collect()
print(sorted({s.archs for s in specs if s.constexprs.get("PDL")}))
key = lambda s: (s.module, s.kernel, s.label.removesuffix(" pdl"), repr(s.signature),
                 repr({k: v for k, v in s.constexprs.items() if k != "PDL"}), s.num_warps,
                 s.num_stages)
on = {key(s) for s in specs if s.constexprs.get("PDL") is False and s.archs in (None, (90,))}
twins = {key(s) for s in specs if s.constexprs.get("PDL")}
print(len(on ^ twins))
"""


# A kernel that reads a module-level float `_C`, defined by `{definition}`: the interpreter
# runs it whatever the definition, the compiler only when `_C` is a `tl.constexpr` object.
_PROBE = """
import triton
import triton.language as tl

{definition}


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * _C, mask=mask)
"""

# Compiles the probe through the driver's own compile_spec, for every target.
_COMPILE_PROBE = """
import sys
from yan_kernels.aot import TARGETS, AotSpec, compile_spec
spec = AotSpec("_scale_kernel", {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
               {"BLOCK": 128}, num_warps=4, module=sys.argv[1])
for arch in TARGETS:
    compile_spec(spec, arch)
    print(f"compiled sm_{arch}")
"""


def _compile_probe(tmp_path: Path, name: str, definition: str) -> subprocess.CompletedProcess:
    src = tmp_path / "probes"
    src.mkdir(exist_ok=True)
    (src / f"{name}.py").write_text(_PROBE.format(definition=definition))
    return _run(["-c", _COMPILE_PROBE, name], _env(tmp_path, pythonpath=src), timeout=300)


@pytest.mark.parametrize(
    "definition",
    [
        "_C = 0.5",
        # Triton rejects the annotation too (its error says so): not a fix for the above
        "_C: tl.constexpr = 0.5",
    ],
)
def test_guard_rejects_a_non_constexpr_global(tmp_path: Path, definition: str) -> None:
    """The bug class the guard exists for: a plain float global read inside the kernel fails to
    compile, and the error names the global (not, say, an import error in the probe)."""
    proc = _compile_probe(tmp_path, "aot_probe_global", definition)
    assert proc.returncode != 0, _output(proc)
    assert "compiled sm_" not in proc.stdout, _output(proc)
    assert re.search(r"global variable\W+_C\b", proc.stderr), _output(proc)


def test_guard_accepts_a_constexpr_global(tmp_path: Path) -> None:
    """The fix, `_C = tl.constexpr(0.5)` (as the kernel files write their constants), compiles
    for every target: the probes above fail for the global alone."""
    proc = _compile_probe(tmp_path, "aot_probe_constexpr", "_C = tl.constexpr(0.5)")
    assert proc.returncode == 0, _output(proc)
    assert proc.stdout.split() == [w for a in TARGETS for w in ("compiled", f"sm_{a}")]


# A pipelined bf16 tile product: 128 x 128 tiles of A and B, `num_stages` of them in flight.
_SMEM_PROBE = """
import triton
import triton.language as tl


@triton.jit
def _tile_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs[:, None] * K + (k + offs_k)[None, :])
        b = tl.load(b_ptr + (k + offs_k)[:, None] * BLOCK + offs[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)
"""

_COMPILE_SMEM_PROBE = """
import sys
from yan_kernels.aot import TARGETS, AotSpec, compile_spec
spec = AotSpec("_tile_kernel", {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32"},
               {"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=int(sys.argv[1]),
               module="aot_probe_smem")
for arch in TARGETS:
    try:
        print(f"sm_{arch}", compile_spec(spec, arch)["shared"])
    except RuntimeError as e:
        print(f"sm_{arch} refused: {e}")
"""


def test_guard_rejects_a_kernel_needing_more_shared_memory_than_the_target_has(
    tmp_path: Path,
) -> None:
    """Triton compiles a kernel whatever shared memory it needs; the GPU refuses to launch one
    that needs more than a block may have (227 KiB on sm_90, 163 KiB on sm_80). Six stages of
    the probe's tiles fit Hopper and not the A100, and the guard says so for sm_80 alone."""
    src = tmp_path / "probes"
    src.mkdir()
    (src / "aot_probe_smem.py").write_text(_SMEM_PROBE)
    proc = _run(["-c", _COMPILE_SMEM_PROBE, "6"], _env(tmp_path, pythonpath=src), timeout=600)
    assert proc.returncode == 0, _output(proc)
    rows = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert int(rows["sm_90"]) > 166_912, _output(proc)  # more than an A100 block may have
    assert re.fullmatch(r"refused: .*needs \d+ bytes of shared memory, sm_80 gives a block at "
                        r"most 166912", rows["sm_80"]), _output(proc)  # fmt: skip
