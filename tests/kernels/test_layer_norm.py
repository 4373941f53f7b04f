"""Residual add + LayerNorm (one launch) against the unfused pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_layer_norm.py
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from yan_kernels import layer_norm as m
from yan_kernels import ops

from tests.kernels.tolerances import TOL

# every combination of the optional inputs: (y, bias, weight, shift); bias only comes with y
FLAGS = [f for f in itertools.product((True, False), repeat=4) if f[0] or not f[1]]


def _inputs(N: int, D: int, dtype: torch.dtype, device, flags, seed: int = 0, stride: int = 0):
    """x and y [N, D] (rows `stride` apart when stride > D: views into wider buffers), an
    offset and a spread per row so that a wrong mean or variance shows, and the [D] vectors."""
    has_y, has_bias, has_w, has_s = flags
    g = torch.Generator().manual_seed(seed)

    def rows() -> torch.Tensor:
        t = torch.randn(N, max(stride, D), generator=g) * (1 + torch.rand(N, 1, generator=g) * 3)
        t = t + torch.randn(N, 1, generator=g) * 2
        return t.to(device, dtype)[:, :D]

    def vec(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(D, generator=g) * scale).to(device, dtype)

    x = rows()
    y = rows() if has_y else None
    bias = vec(0.5) if has_bias else None
    weight = (1 + vec(0.3)) if has_w else None
    shift = vec() if has_s else None
    return x, y, weight, shift, bias


def _check(got, want, dtype, has_y: bool, x) -> None:
    (res, out), (res_ref, out_ref) = got, want
    assert res.dtype == out.dtype == dtype and out.shape == out_ref.shape
    if has_y:
        torch.testing.assert_close(res, res_ref, **TOL[dtype])
    else:
        assert res is x  # no add: res is x itself, nothing written
    torch.testing.assert_close(out.float(), out_ref.float(), **TOL[dtype])


@pytest.mark.parametrize(
    "flags", FLAGS, ids=lambda f: "".join("ybws"[i] for i in range(4) if f[i]) or "plain"
)
@pytest.mark.parametrize(("N", "D"), [(1, 1), (3, 33), (17, 70), (5, 130)])
def test_matches_the_reference_fp32(device, flags, N, D) -> None:
    """Widths that leave most of the padded row empty (33 of 64, 70 of 128, 130 of 256: the
    padding must not enter the mean or the variance), row counts that cut BLOCK_N."""
    args = _inputs(N, D, torch.float32, device, flags)
    want = m.add_layer_norm_ref(*args)
    got = m.add_layer_norm(*args)
    _check(got, want, torch.float32, flags[0], args[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, True, True)])
def test_16_bit_rounds_the_residual_and_holds_an_fp32_oracle(device, dtype, flags) -> None:
    """16-bit inputs: the residual is rounded to the input dtype before the norm reads it (as
    the unfused code does); the output is held against the fp32 norm of that residual."""
    x, y, w, s, b = _inputs(9, 70, dtype, device, flags, seed=1)
    res, out = m.add_layer_norm(x, y, w, s, b)
    res_ref = m.add_layer_norm_ref(x, y, w, s, b)[0]
    torch.testing.assert_close(res, res_ref, **TOL[dtype])
    f32 = [None if t is None else t.float() for t in (w, s)]
    out_ref = m.add_layer_norm_ref(res.float(), None, *f32)[1]
    torch.testing.assert_close(out.float(), out_ref, **TOL[dtype])


def test_wide_rows_strided_inputs_and_no_rows(device) -> None:
    """A row wider than a power of two (1,025 of 2,048) with 8 warps, rows that are views with
    a stride past their width, and N = 0 (nothing launched, empty outputs)."""
    flags = (True, True, True, True)
    args = _inputs(3, 1025, torch.float32, device, flags, seed=2)
    _check(m.add_layer_norm(*args), m.add_layer_norm_ref(*args), torch.float32, True, args[0])
    args = _inputs(6, 40, torch.float32, device, flags, seed=3, stride=72)
    assert args[0].stride(0) == 72 and args[1].stride(0) == 72
    _check(m.add_layer_norm(*args), m.add_layer_norm_ref(*args), torch.float32, True, args[0])
    x = torch.empty(0, 16, device=device)
    res, out = m.add_layer_norm(x, x, None, None)
    assert res.shape == out.shape == (0, 16)


def test_eps_reaches_the_kernel(device) -> None:
    """A constant row has zero variance: its output is 0 / sqrt(eps), so eps decides nothing
    there; a row with a tiny spread is where eps shows."""
    x = (torch.arange(24.0).reshape(3, 8) * 1e-3).to(device)
    for eps in (1e-5, 1e-1):
        got = m.add_layer_norm(x, None, None, None, eps=eps)[1]
        want = m.add_layer_norm_ref(x, None, None, None, eps=eps)[1]
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    a = m.add_layer_norm(x, None, None, None, eps=1e-5)[1]
    b = m.add_layer_norm(x, None, None, None, eps=1e-1)[1]
    assert (a - b).abs().max() > 0.1


def test_facade_runs_the_kernel_only_when_selected(device, monkeypatch) -> None:
    calls = {"kernel": 0, "ref": 0}
    for name, key in (("add_layer_norm", "kernel"), ("add_layer_norm_ref", "ref")):
        fn = getattr(m, name)

        def spy(*a, _fn=fn, _key=key, **k):
            calls[_key] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(m, name, spy)
    args = _inputs(4, 24, torch.float32, device, (True, True, True, True), seed=4)
    with ops.force("triton"):
        got = ops.add_layer_norm(*args)
    assert calls == {"kernel": 1, "ref": 0}
    with ops.force("ref"):
        want = ops.add_layer_norm(*args)
    assert calls == {"kernel": 1, "ref": 1}
    monkeypatch.setenv("YAN_KERNELS_OFF", "add_layer_norm")
    with ops.force("triton"):
        ops.add_layer_norm(*args)
    assert calls == {"kernel": 1, "ref": 2}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])
