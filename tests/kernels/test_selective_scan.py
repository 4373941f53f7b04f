"""Selective-scan fast paths against the sequential oracle: the Triton kernel, the mamba-ssm
adapter (with a stand-in `mamba_ssm` on CPU), the facade's choice, and the Mamba modules.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_selective_scan.py
(no CUDA: the kernel runs in Triton's CPU interpreter; GPU tests are marked `gpu`).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from yan_kernels import chunked_scan as cs
from yan_kernels import ops
from yan_kernels.chunked_scan import selective_scan_ref
from yan_kernels.chunked_scan import selective_scan_sequential as oracle

from tests.kernels.tolerances import TOL
from yan_serve.model.mamba import BiMamba, Mamba

pytest.importorskip("triton")

from yan_kernels import selective_scan as ss
from yan_kernels.selective_scan import selective_scan, selective_scan_mamba_ssm

F32 = TOL[torch.float32]


def _inputs(Bt: int, L: int, Di: int, N: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """u, delta, A, B, C, D, z with the model's ranges: delta > 0 (softplus), A < 0."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bt, L, Di, generator=g)
    delta = F.softplus(torch.randn(Bt, L, Di, generator=g) - 1)
    A = -torch.exp(torch.randn(Di, N, generator=g))
    B = torch.randn(Bt, L, N, generator=g)
    C = torch.randn(Bt, L, N, generator=g)
    D = torch.randn(Di, generator=g)
    z = torch.randn(Bt, L, Di, generator=g)
    acts = [t.to(device, dtype) for t in (u, delta)]
    bc = [t.to(device, dtype) for t in (B, C)]
    return acts[0], acts[1], A.to(device), bc[0], bc[1], D.to(device), z.to(device, dtype)


def _want(u, delta, A, B, C, D=None, z=None):
    """The model's sequential oracle in fp32, then the gate: what every fast path computes."""
    f = [t.float() for t in (u, delta, A, B, C)]
    y = oracle(*f, None if D is None else D.float())
    return y if z is None else y * F.silu(z.float())


# Interpreter default BLOCK_D is 64; the cases cover a partial last block, one block wider
# than Di, N not a power of two, and a single position.
CASES = [  # (Bt, L, Di, N, block_d)
    (3, 37, 40, 16, 16),
    (3, 37, 40, 16, None),
    (2, 11, 24, 7, 16),
    (2, 1, 40, 16, 32),
]


@pytest.mark.parametrize(("Bt", "L", "Di", "N", "block_d"), CASES)
def test_kernel_matches_oracle(device, Bt, L, Di, N, block_d) -> None:
    u, delta, A, B, C, D, z = _inputs(Bt, L, Di, N, device, seed=L + N)
    out = selective_scan(u, delta, A, B, C, D, z, block_d=block_d)
    assert out.shape == (Bt, L, Di) and out.dtype == torch.float32
    torch.testing.assert_close(out, _want(u, delta, A, B, C, D, z), **F32)


@pytest.mark.parametrize(("use_D", "use_z"), [(False, False), (True, False), (False, True)])
def test_optional_skip_and_gate(device, use_D, use_z) -> None:
    u, delta, A, B, C, D, z = _inputs(3, 37, 40, 16, device, seed=3)
    D, z = (D if use_D else None), (z if use_z else None)
    out = selective_scan(u, delta, A, B, C, D, z, block_d=32)
    torch.testing.assert_close(out, _want(u, delta, A, B, C, D, z), **F32)


def test_strided_inputs_as_the_module_makes_them(device) -> None:
    """u the transposed [Bt, Di, L] conv output, B and C slices of x_proj's output, z half of
    in_proj's output, A transposed: the kernel reads every stride as given."""
    Bt, L, Di, N, R = 2, 13, 40, 16, 3
    u0, delta, A0, B0, C0, D, z0 = _inputs(Bt, L, Di, N, device, seed=5)
    u = u0.transpose(1, 2).contiguous().transpose(1, 2)  # stride (Di*L, 1, L)
    xp = torch.cat([torch.randn(Bt, L, R, device=device), B0, C0], -1)  # [Bt, L, R + 2N]
    _, B, C = xp.split([R, N, N], dim=-1)
    z = torch.cat([torch.randn_like(z0), z0], -1).chunk(2, dim=-1)[1]
    A = A0.t().contiguous().t()
    assert u.stride(-1) != 1 and B.stride(1) != N and z.stride(1) != Di and A.stride(0) == 1
    out = selective_scan(u, delta, A, B, C, D, z, block_d=32)
    torch.testing.assert_close(out, _want(u0, delta, A0, B0, C0, D, z0), **F32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_scanned_in_fp32(device, dtype) -> None:
    u, delta, A, B, C, D, z = _inputs(2, 19, 40, 16, device, dtype, seed=7)
    out = selective_scan(u, delta, A, B, C, D, z)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _want(u, delta, A, B, C, D, z), **TOL[dtype])


def test_empty_sequence(device) -> None:
    u, delta, A, B, C, D, z = _inputs(2, 0, 8, 4, device)
    assert selective_scan(u, delta, A, B, C, D, z).shape == (2, 0, 8)


def _bad(name: str, args: list) -> list:
    u, delta, A, B, C, D, z = args
    return {
        "u 2-d": [u[0], delta, A, B, C, D, z],
        "delta shape": [u, delta[:, :-1], A, B, C, D, z],
        "A rows": [u, delta, A[:-1], B, C, D, z],
        "B states": [u, delta, A, B[..., :-1], C, D, z],
        "C length": [u, delta, A, B, C[:, :-1], D, z],
        "D size": [u, delta, A, B, C, D[:-1], z],
        "z shape": [u, delta, A, B, C, D, z[:1]],
        "u dtype": [u.double(), delta, A, B, C, D, z],
        "delta dtype": [u, delta.bfloat16(), A, B, C, D, z],
        "z dtype": [u, delta, A, B, C, D, z.half()],
        "A dtype": [u, delta, A.double(), B, C, D, z],
        "device": [u, delta, A.to("meta"), B, C, D, z],
    }[name]


BAD = {
    "u 2-d": r"u must be \[Bt, L, Di\]",
    "delta shape": r"delta must have shape \[2, 5, 8\]",
    "A rows": r"A must be \[Di, N\] = \[8, N\]",
    "B states": r"B must have shape \[2, 5, 4\]",
    "C length": r"C must have shape \[2, 5, 4\]",
    "D size": r"D must have shape \[8\]",
    "z shape": r"z must have shape \[2, 5, 8\]",
    "u dtype": r"u must be float32, bfloat16 or float16, got torch.float64",
    "delta dtype": r"delta must have u's dtype torch.float32, got torch.bfloat16",
    "z dtype": r"z must have u's dtype",
    "A dtype": r"A must be float32, bfloat16 or float16",
    "device": r"all inputs must be on one device",
}


@pytest.mark.parametrize("name", list(BAD))
def test_launchers_reject_bad_inputs(device, name) -> None:
    args = _bad(name, list(_inputs(2, 5, 8, 4, device)))
    for fn in (selective_scan, selective_scan_ref):  # the adapter: test_mamba_ssm_adapter_layout
        with pytest.raises(ValueError, match=BAD[name]):
            fn(*args)
    with pytest.raises(ValueError, match="power of two"):
        selective_scan(*_inputs(2, 5, 8, 4, device), block_d=24)


@pytest.mark.parametrize("mutant", ["euler_A", "no_delta_on_B", "sigmoid_gate", "D_after_gate"])
def test_tolerance_rejects_plausible_bugs(device, mutant) -> None:
    """Each bug, written in torch, differs from the kernel by more than the fp32 tolerance."""
    u, delta, A, B, C, D, z = _inputs(2, 13, 40, 16, device, seed=11)
    out = selective_scan(u, delta, A, B, C, D, z)
    h = torch.zeros(2, 40, 16, device=device)
    ys = []
    for t in range(13):
        dA = delta[:, t, :, None] * A
        dA = 1 + dA if mutant == "euler_A" else torch.exp(dA)
        step = u[:, t] if mutant == "no_delta_on_B" else delta[:, t] * u[:, t]
        h = dA * h + step[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    gate = torch.sigmoid(z) if mutant == "sigmoid_gate" else F.silu(z)
    bad = y * gate + D * u if mutant == "D_after_gate" else (y + D * u) * gate
    torch.testing.assert_close(_want(u, delta, A, B, C, D, z), out, **F32)  # control
    assert not torch.allclose(out, bad, **F32)


def test_reference_equals_the_models_oracle() -> None:
    """The kernel file's reference (chunked scan + gate) against the sequential oracle."""
    u, delta, A, B, C, D, z = _inputs(2, 70, 12, 5, seed=13)  # more than one 64-step chunk
    got = selective_scan_ref(u, delta, A, B, C, D, z)
    torch.testing.assert_close(got, _want(u, delta, A, B, C, D, z), **F32)
    got = selective_scan_ref(u, delta, A, B, C)
    torch.testing.assert_close(got, oracle(u, delta, A, B, C), **F32)


# ------------------------------------------------------------------------- the facade's choice


@pytest.fixture
def fresh_scan(monkeypatch):
    """Forget the cached env decision and mamba_ssm probe (and again afterwards)."""
    ops._scan_env.cache_clear()
    ops.mamba_ssm_available.cache_clear()
    yield monkeypatch
    ops._scan_env.cache_clear()
    ops.mamba_ssm_available.cache_clear()


def _spy(monkeypatch, name: str, module=ss) -> list[int]:
    calls: list[int] = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


@pytest.mark.parametrize(("env", "want"), [("ref", "ref"), ("Triton", "triton"), ("", "auto")])
def test_scan_env(fresh_scan, env, want) -> None:
    fresh_scan.setenv("YAN_MAMBA_SCAN", env)
    assert ops.scan_backend() == want


def test_scan_env_errors(fresh_scan) -> None:
    fresh_scan.setenv("YAN_MAMBA_SCAN", "cuda")
    with pytest.raises(ValueError, match="YAN_MAMBA_SCAN"):
        ops.scan_backend()
    ops._scan_env.cache_clear()
    fresh_scan.setitem(sys.modules, "mamba_ssm", None)  # `import mamba_ssm` raises ImportError
    fresh_scan.setenv("YAN_MAMBA_SCAN", "mamba_ssm")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        ops.scan_backend()
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        ops.set_backend("mamba_ssm", op="selective_scan")
    with pytest.raises(ValueError):
        ops.set_backend("fast", op="selective_scan")
    with pytest.raises(ValueError, match="op must be"):
        ops.set_backend("ref", op="decoder_argmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be"):
        ops.set_backend("mamba_ssm")  # the scan's own path, not the kernels switch


def test_facade_paths(device, fresh_scan) -> None:
    fresh_scan.delenv("YAN_MAMBA_SCAN", raising=False)
    args = _inputs(2, 6, 40, 16, device)
    kernel, ref = _spy(fresh_scan, "selective_scan"), _spy(fresh_scan, "selective_scan_ref", cs)
    with ops.force("ref", op="selective_scan"):
        want = ops.selective_scan(*args)
    with ops.force("triton", op="selective_scan"):
        with ops.force("ref", op="selective_scan"):
            assert ops.scan_path(*args) == "ref"
        got = ops.selective_scan(*args)
    assert ops.scan_backend() == "auto"
    assert (len(kernel), len(ref)) == (1, 1)
    torch.testing.assert_close(got, want, **F32)
    # "auto" follows the kernels switch (YAN_KERNELS / force) where mamba-ssm is not taken
    first = "mamba_ssm" if args[0].is_cuda and ops.mamba_ssm_available() else None
    with ops.force("triton"):
        assert ops.scan_path(*args) == (first or "triton")
    with ops.force("ref"):
        assert ops.scan_path(*args) == (first or "ref")


def test_facade_falls_back_under_autograd_and_mixed_dtypes(device, fresh_scan) -> None:
    u, delta, A, B, C, D, z = _inputs(2, 6, 8, 4, device)
    kernel = _spy(fresh_scan, "selective_scan")
    with ops.force("triton", op="selective_scan"):
        Dg = D.clone().requires_grad_()
        assert ops.scan_path(u, delta, A, B, C, Dg, z) == "ref"
        ops.selective_scan(u, delta, A, B, C, Dg, z).sum().backward()  # the reference has a grad
        assert Dg.grad is not None
        with torch.no_grad():
            assert ops.scan_path(u, delta, A, B, C, Dg, z) == "triton"
        assert ops.scan_path(u, delta, A, B.double(), C, D, z) == "ref"  # mixed activations
        half = [t.bfloat16() for t in (u, delta, B, C, z)]
        assert ops.scan_path(*half[:2], A, *half[2:4], D, half[4]) == "triton"  # fp32 A, D: fine
    assert not kernel


# ----------------------------------------------------------------------- the mamba-ssm adapter


def _fake_mamba_ssm(calls: list[dict]) -> types.ModuleType:
    """A stand-in for `mamba_ssm.ops.selective_scan_interface` whose `selective_scan_fn` does
    the documented math in the documented layout (u, delta, z [B, D, L]; A [D, N];
    B, C [B, N, L]; D [D]) and makes the CUDA extension's dtype and stride checks."""

    def selective_scan_fn(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
        return_last_state=False,
    ):  # fmt: skip
        Bsz, Dm, L = u.shape
        N = A.shape[1]
        assert delta.shape == u.shape and A.shape == (Dm, N), (u.shape, delta.shape, A.shape)
        assert B.shape == C.shape == (Bsz, N, L), (B.shape, C.shape)
        assert A.dtype == torch.float32 and (D is None or D.dtype == torch.float32)
        assert delta.dtype == B.dtype == C.dtype == u.dtype
        for t in (u, delta, B, C, z):
            assert t is None or t.stride(-1) == 1
        if z is not None:
            assert z.shape == u.shape and z.dtype == u.dtype
        calls.append({"delta_bias": delta_bias, "delta_softplus": delta_softplus})
        dt = delta.float()
        if delta_bias is not None:
            dt = dt + delta_bias.float()[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        uf, Bf, Cf = u.float(), B.float(), C.float()
        h = torch.zeros(Bsz, Dm, N, device=u.device)
        ys = []
        for t in range(L):
            dBu = (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[:, None, :, t]  # [B, D, N]
            h = torch.exp(dt[:, :, t, None] * A) * h + dBu
            ys.append((h * Cf[:, None, :, t]).sum(-1))
        y = torch.stack(ys, -1)  # [B, D, L]
        if D is not None:
            y = y + D[:, None] * uf
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(u.dtype)

    mod = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    mod.selective_scan_fn = selective_scan_fn  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def fake_mamba_ssm(fresh_scan) -> list[dict]:
    calls: list[dict] = []
    iface = _fake_mamba_ssm(calls)
    fresh_scan.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    fresh_scan.setitem(sys.modules, "mamba_ssm.ops", types.ModuleType("mamba_ssm.ops"))
    fresh_scan.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", iface)
    return calls


@pytest.mark.parametrize(("use_D", "use_z"), [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_adapter_layout(fake_mamba_ssm, use_D, use_z, dtype) -> None:
    """The adapter's transposes and argument mapping: with the stand-in it equals the oracle,
    also for strided inputs and a bf16 D (cast to fp32 as the extension demands)."""
    u0, delta, A, B, C, D, z = _inputs(3, 17, 40, 16, dtype=dtype, seed=17)
    u = u0.transpose(1, 2).contiguous().transpose(1, 2)
    D = D.to(dtype) if use_D else None
    z = z if use_z else None
    out = selective_scan_mamba_ssm(u, delta, A, B, C, D, z)
    assert out.shape == (3, 17, 40) and out.dtype == dtype
    assert fake_mamba_ssm == [{"delta_bias": None, "delta_softplus": False}]
    torch.testing.assert_close(out.float(), _want(u0, delta, A, B, C, D, z), **TOL[dtype])
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_mamba_ssm(u, delta, A, B.transpose(1, 2), C, D, z)


def test_mamba_ssm_is_taken_only_on_cuda(fake_mamba_ssm) -> None:
    args = _inputs(2, 6, 8, 4)
    assert ops.mamba_ssm_available()
    with ops.force("mamba_ssm", op="selective_scan"):
        assert ops.scan_path(*args) == "ref"  # CPU tensors: its CUDA kernel cannot run them
        ops.selective_scan(*args)
    assert ops.scan_path(*args) != "mamba_ssm"
    assert not fake_mamba_ssm


# --------------------------------------------------------------------------------- the module


def _padded_batch(d: int, lengths: list[int], L: int, device="cpu"):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(len(lengths), L, d, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return x.to(device), mask.to(device)


def test_bimamba_fused_triton_equals_reference(device, monkeypatch) -> None:
    """Eval mode, a right-padded batch: the fused path (Triton scan + gate) gives the
    reference module's output, and the kernel runs once per direction."""
    torch.manual_seed(0)
    mix = BiMamba(24).to(device).eval()  # Di 48, N 16
    x, mask = _padded_batch(24, [12, 7, 1], 12, device)
    kernel = _spy(monkeypatch, "selective_scan")
    with torch.no_grad():
        want = mix(x, mask, scan="ref")
        with ops.force("triton", op="selective_scan"):
            got = mix(x, mask)
    assert len(kernel) == 2
    torch.testing.assert_close(got, want, **F32)
    assert not got[~mask].any()


def test_mamba_auto_scan_goes_through_the_facade(monkeypatch) -> None:
    """The default ("auto") calls the facade, which alone picks the path: on the reference
    path it equals the module's chunked scan, on the Triton path it runs the kernel."""
    calls: list[int] = []
    facade = ops.selective_scan
    monkeypatch.setattr(ops, "selective_scan", lambda *a: calls.append(1) or facade(*a))
    kernel = _spy(monkeypatch, "selective_scan")
    torch.manual_seed(0)
    m = Mamba(16).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        with ops.force("ref", op="selective_scan"):
            y = m(x)
        assert (len(calls), len(kernel)) == (1, 0)
        torch.testing.assert_close(y, m(x, scan="chunked"), rtol=0, atol=0)
        torch.testing.assert_close(y, m(x, scan="ref"), **F32)
        with ops.force("triton", op="selective_scan"):
            torch.testing.assert_close(m(x), y, **F32)
        assert (len(calls), len(kernel)) == (2, 1)
    with pytest.raises(ValueError, match="unknown scan"):
        m(x, scan="fast")


# ---------------------------------------------------------------------------------------- GPU
# Paper shapes (yan-mamba-paper: d 512 -> Di 1024, N 16) at Bt 8, L 1024. The fp32 entry is
# looser than TOL's: 1024 sequential steps with the GPU's approximate exp; not yet calibrated
# (no GPU run so far). bf16 inputs are compared to an fp32 oracle of the same rounded inputs.
GPU_TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: TOL[torch.bfloat16],
}


def _paper_inputs(dtype: torch.dtype):
    """Model-like values: S4D-real A = -(1..16), step sizes softplus(~N(-4, 1)) ~ 0.02."""
    Bt, L, Di, N = 8, 1024, 1024, 16
    u, _, _, B, C, D, z = _inputs(Bt, L, Di, N, "cuda", seed=23)
    g = torch.Generator().manual_seed(1)
    delta = F.softplus(torch.randn(Bt, L, Di, generator=g) - 4).cuda()
    A = -torch.arange(1, N + 1, dtype=torch.float32, device="cuda").repeat(Di, 1)
    acts = [t.to(dtype) for t in (u, delta, B, C, z)]
    return acts[0], acts[1], A, acts[2], acts[3], D, acts[4]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paper_shapes_on_gpu(dtype) -> None:
    u, delta, A, B, C, D, z = _paper_inputs(dtype)
    want = _want(u, delta, A, B, C, D, z)
    out = selective_scan(u, delta, A, B, C, D, z)
    torch.testing.assert_close(out.float(), want, **GPU_TOL[dtype])
    plain = selective_scan(u, delta, A, B, C)
    torch.testing.assert_close(plain.float(), _want(u, delta, A, B, C), **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_paper_shapes_on_gpu(dtype) -> None:
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    u, delta, A, B, C, D, z = _paper_inputs(dtype)
    out = selective_scan_mamba_ssm(u, delta, A, B, C, D, z)
    torch.testing.assert_close(out.float(), _want(u, delta, A, B, C, D, z), **GPU_TOL[dtype])


@pytest.mark.gpu
def test_bimamba_on_gpu_takes_the_fused_path(monkeypatch) -> None:
    """yan-mamba-paper's mixer (d 512), a padded batch: every path equals the reference."""
    calls: list[int] = []
    facade = ops.selective_scan
    monkeypatch.setattr(ops, "selective_scan", lambda *a: calls.append(1) or facade(*a))
    torch.manual_seed(0)
    mix = BiMamba(512).cuda().eval()
    x, mask = _padded_batch(512, [300, 17, 1, 256], 300, "cuda")
    with torch.no_grad():
        want = mix(x, mask, scan="ref")
        assert not calls
        paths = ["triton", "ref"] + (["mamba_ssm"] if ops.mamba_ssm_available() else [])
        for path in paths:
            with ops.force(path, op="selective_scan"):
                got = mix(x, mask)  # "auto": the fused facade on CUDA without autograd
            torch.testing.assert_close(got, want, **GPU_TOL[torch.float32], msg=path)
    assert len(calls) == 2 * len(paths)  # one call per direction
