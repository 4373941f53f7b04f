"""The backend switch: decided once from hardware and `YAN_KERNELS`, overridable for tests, and
the facades' fallbacks (autograd, mixed dtypes).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_ops.py
"""

from __future__ import annotations

import pytest
import torch
from yan_kernels import ops

pytest.importorskip("triton")


@pytest.fixture
def fresh_decision(monkeypatch):
    """Forget the cached decision (and restore it afterwards)."""
    ops._decided.cache_clear()
    yield monkeypatch
    ops._decided.cache_clear()


@pytest.mark.parametrize(("env", "want"), [("ref", False), ("triton", True), ("REF", False)])
def test_env_overrides_the_hardware(fresh_decision, env, want) -> None:
    fresh_decision.setenv("YAN_KERNELS", env)
    assert ops.use_triton() is want


def test_auto_follows_cuda(fresh_decision) -> None:
    fresh_decision.delenv("YAN_KERNELS", raising=False)
    assert ops.use_triton() is torch.cuda.is_available()


def test_bad_env_is_a_clear_error(fresh_decision) -> None:
    fresh_decision.setenv("YAN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="YAN_KERNELS"):
        ops.use_triton()


def test_decided_once(fresh_decision) -> None:
    fresh_decision.setenv("YAN_KERNELS", "ref")
    assert not ops.use_triton()
    fresh_decision.setenv("YAN_KERNELS", "triton")
    assert not ops.use_triton()  # the process keeps its first answer


def test_force_nests_and_restores() -> None:
    before = ops.use_triton()
    with ops.force("triton"):
        assert ops.use_triton()
        with ops.force("ref"):
            assert not ops.use_triton()
        assert ops.use_triton()
    assert ops.use_triton() is before
    with pytest.raises(ValueError):
        ops.set_backend("fast")  # type: ignore[arg-type]


def _spy(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def _routed_args(device, dtype=torch.float32, grad: bool = False):
    K, d, N = 3, 16, 10
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(K, d, 4 * d, generator=g), torch.randn(K, 4 * d, generator=g)
    w2, b2 = torch.randn(K, 4 * d, d, generator=g), torch.randn(K, d, generator=g)
    h, e = torch.randn(N, d, generator=g), torch.randint(0, K, (N,), generator=g)
    ws = [t.to(device, dtype).requires_grad_(grad) for t in (w1, b1, w2, b2)]
    return h.to(device, dtype), e.to(device), *ws


def test_facades_dispatch(device, monkeypatch) -> None:
    from yan_kernels import decoder_argmax as dec
    from yan_kernels import routed_expert as rex

    kernel_calls = _spy(monkeypatch, rex, "routed_expert_euler")
    ref_calls = _spy(monkeypatch, rex, "routed_expert_euler_ref")
    args = _routed_args(device)
    with ops.force("ref"):
        want = ops.routed_expert(*args)
    assert (len(kernel_calls), len(ref_calls)) == (0, 1)
    with ops.force("triton"):
        got = ops.routed_expert(*args)
    assert (len(kernel_calls), len(ref_calls)) == (1, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    dk = _spy(monkeypatch, dec, "decoder_argmax")
    x, w, b = torch.randn(4, 16), torch.randn(30, 16), torch.randn(30)
    with ops.force("triton"):
        res = ops.decoder_argmax(x.to(device), w.to(device), b.to(device))
    assert len(dk) == 1 and res.token.shape == (4,)


def test_autograd_and_mixed_dtypes_fall_back_to_the_reference(device, monkeypatch) -> None:
    from yan_kernels import routed_expert as rex

    kernel_calls = _spy(monkeypatch, rex, "routed_expert_euler")
    with ops.force("triton"):
        h, e, w1, b1, w2, b2 = _routed_args(device, grad=True)
        out = ops.routed_expert(h, e, w1, b1, w2, b2)
        out.sum().backward()  # the reference is differentiable
        assert w1.grad is not None
        h, e, w1, b1, w2, b2 = _routed_args(device)
        z = torch.zeros(h.shape, dtype=torch.float64, device=device)
        ops.routed_expert_euler(h, e, w1, b1, w2, b2, z, 0.5)  # z's dtype differs
    assert not kernel_calls


def test_side_tensors_must_share_the_device_not_the_dtype(device, monkeypatch) -> None:
    """A kernel's side tensors (indices, decoding state, fp32 uniforms beside bf16 activations)
    keep it from running only when they sit on another device."""
    from yan_kernels import greedy_select as gs

    x = torch.randn(2, 8, device=device, dtype=torch.bfloat16)
    fp32 = torch.rand(2, device=device)
    elsewhere = torch.zeros(2, dtype=torch.long, device="meta")
    with ops.force("triton"):
        assert ops._take_triton(x, op="gate_route", also=(fp32, None))
        assert not ops._take_triton(x, fp32, op="gate_route")  # mixed floating inputs
        assert not ops._take_triton(x, op="gate_route", also=(elsewhere,))
        kernel = _spy(monkeypatch, gs, "greedy_select")
        ref = _spy(monkeypatch, gs, "greedy_select_ref")
        B, V = 2, 11
        state = dict(out_tok=torch.zeros(B, 4, dtype=torch.long), out_p=torch.zeros(B, 4),
                     slot=torch.zeros(1, dtype=torch.long), done=torch.zeros(B, dtype=torch.bool),
                     left=torch.full((B,), 3), stop_eos=torch.ones(B, dtype=torch.bool),
                     eos=torch.tensor([2]), tok=torch.zeros(B, dtype=torch.long),
                     pos=torch.zeros(B, dtype=torch.long))  # fmt: skip
        logits = torch.randn(B, V, device=device)
        ops.greedy_select(logits, **{k: v.to(device) for k, v in state.items()})
        assert (len(kernel), len(ref)) == (1, 0)


def test_kernels_off_sets_single_ops_aside(device, monkeypatch) -> None:
    """`YAN_KERNELS_OFF` sends the named ops to their references, the others still run Triton;
    a name that is not an op is an error, not a silent no-op; every facade is switchable."""
    from yan_kernels import decoder_argmax as dec
    from yan_kernels import routed_expert as rex

    routed_kernel = _spy(monkeypatch, rex, "routed_expert_euler")
    routed_ref = _spy(monkeypatch, rex, "routed_expert_euler_ref")
    dec_kernel = _spy(monkeypatch, dec, "decoder_argmax")
    monkeypatch.setenv("YAN_KERNELS_OFF", " routed_expert_euler, gate_route")
    assert ops.kernels_off() == {"routed_expert_euler", "gate_route"}
    x, w, b = torch.randn(4, 16), torch.randn(30, 16), torch.randn(30)
    with ops.force("triton"):
        ops.routed_expert(*_routed_args(device))
        assert ops.expert_tiles(torch.zeros(3, dtype=torch.long), 2, x[:3]) is None
        ops.decoder_argmax(x.to(device), w.to(device), b.to(device))
    assert (len(routed_kernel), len(routed_ref), len(dec_kernel)) == (0, 1, 1)
    monkeypatch.setenv("YAN_KERNELS_OFF", "gate_rout")
    with pytest.raises(ValueError, match=r"unknown op.*gate_rout"):
        ops.kernels_off()
    facades = {n for n in ops.KERNEL_OPS if callable(getattr(ops, n, None))}
    assert facades == set(ops.KERNEL_OPS)


def test_one_switch_for_every_op() -> None:
    """`force(backend, op=None)` drives the kernels; `op="selective_scan"` the scan's own
    setting; each restores only its own."""
    before = ops.use_triton()
    with ops.force("ref", op="selective_scan"):
        assert ops.scan_backend() == "ref"
        assert ops.use_triton() is before
        with ops.force("triton"):
            assert ops.use_triton() and ops.scan_backend() == "ref"
        assert ops.use_triton() is before
    assert ops.scan_backend() == "auto"
    with pytest.raises(ValueError, match="op must be"):
        ops.set_backend("ref", op="routed_expert")  # type: ignore[arg-type]


def test_triton_selected_only_for_cuda_models() -> None:
    """Models use the kernels on CUDA only; the CPU interpreter never makes their default."""
    with ops.force("triton"):
        assert not ops.triton_selected(torch.device("cpu"))
        assert ops.triton_selected(torch.device("cuda"))
    with ops.force("ref"):
        assert not ops.triton_selected(torch.device("cuda"))


def test_scan_reference_widens_mixed_dtypes() -> None:
    """Mixed activation dtypes (autocast: fp32 delta, bf16 u) take the reference on fp32 copies,
    rounded to u's dtype, with gradients; the strict reference itself rejects them."""
    from yan_kernels.chunked_scan import selective_scan_ref

    g = torch.Generator().manual_seed(0)
    u, z = torch.randn(2, 7, 6, generator=g), torch.randn(2, 7, 6, generator=g)
    delta = torch.rand(2, 7, 6, generator=g).requires_grad_()
    A, D = -torch.rand(6, 4, generator=g), torch.rand(6, generator=g)
    B, C = torch.randn(2, 7, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    y = ops.selective_scan(u.bfloat16(), delta, A, B.bfloat16(), C.bfloat16(), D, z.bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert delta.grad is not None
    wide = [t.bfloat16().float() for t in (u, B, C, z)]
    want = selective_scan_ref(wide[0], delta.detach(), A, wide[1], wide[2], D, wide[3])
    torch.testing.assert_close(y, want.bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="delta must have u's dtype"):
        selective_scan_ref(u.bfloat16(), delta, A, B.bfloat16(), C.bfloat16(), D, z.bfloat16())
