"""The MoE gate with its routing choice (one launch) against the pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_gate_route.py
(no CUDA: the Triton interpreter; the GPU test runs yan-paper's gate in bf16).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from yan_kernels import ops
from yan_kernels.gate_route import gate_route, gate_route_ref


def _problem(B, L, D, G, K, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g)
    row = torch.randn(B, G, generator=g)
    w1 = torch.randn(G, D, generator=g) / D**0.5
    w2 = torch.randn(K, G, generator=g) / G**0.5 * 3
    b2 = torch.randn(K, generator=g)
    u = torch.rand(B, L, generator=g)
    return [t.to(device, dtype) for t in (h, row, w1, w2, b2)] + [u.to(device)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("routing", ["argmax", "sample"])
@pytest.mark.parametrize("B,L,D,G,K", [(1, 1, 16, 16, 2), (2, 37, 24, 100, 6), (3, 20, 70, 64, 3)])
def test_matches_the_reference(device, dtype, routing, B, L, D, G, K) -> None:
    """Token counts that cut the row block, hidden widths across two slices and mid-slice,
    reductions across tiles, K = 2 .. 6 experts padded to 16; temperature 0.5."""
    h, row, w1, w2, b2, u = _problem(B, L, D, G, K, device, dtype)
    probs, expert = gate_route(h, row, w1, w2, b2, 0.5, routing, u)
    want_p, want_e = gate_route_ref(h, row, w1, w2, b2, 0.5, routing, u)
    assert probs.shape == (B, L, K) and probs.dtype == torch.float32 and expert.shape == (B, L)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(probs, want_p, atol=tol, rtol=tol)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, L, device=device))
    if dtype == torch.float32:
        assert torch.equal(expert, want_e)
    else:  # 16-bit hidden rounding may flip a near tie: nearly every token agrees
        assert (expert == want_e).float().mean() > 0.9


def test_sampling_follows_the_uniforms(device) -> None:
    """u below the first expert's mass picks expert 0; u past every boundary (2: whatever the
    rounding of the last cumulative sum) the last expert, never an index beyond it; u just past
    the second boundary the third (the inverse CDF rule)."""
    h, row, w1, w2, b2, _ = _problem(1, 3, 16, 16, 4, device, torch.float32, seed=3)
    probs, _ = gate_route_ref(h, row, w1, w2, b2, 1.0, "argmax")
    cdf = probs.cumsum(-1)
    u = torch.stack([cdf[0, 0, 0] * 0.5, torch.tensor(2.0, device=device), cdf[0, 2, 1] + 1e-5])
    _, expert = gate_route(h, row, w1, w2, b2, 1.0, "sample", u[None])
    assert expert[0].tolist() == [0, 3, 2]


def test_facade_and_bad_arguments(device) -> None:
    h, row, w1, w2, b2, u = _problem(2, 5, 16, 32, 3, device, torch.float32)
    with ops.force("triton"):
        a = ops.gate_route(h, row, w1, w2, b2, 1.0, "sample", u)
    with ops.force("ref"):
        b = ops.gate_route(h, row, w1, w2, b2, 1.0, "sample", u)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(a[1], b[1])
    with pytest.raises(AssertionError, match="routing"):
        gate_route(h, row, w1, w2, b2, 1.0, "top2", u)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("N", [128, 65536])
def test_paper_gate_on_gpu(N) -> None:
    """yan-paper's gate (d = gate dim = 512, 6 experts) in bf16."""
    h, row, w1, w2, b2, u = _problem(N // 128, 128, 512, 512, 6, torch.device("cuda"),
                                     torch.bfloat16)  # fmt: skip
    for routing in ("argmax", "sample"):
        probs, expert = gate_route(h, row, w1, w2, b2, 1.0, routing, u)
        want_p, want_e = gate_route_ref(h, row, w1, w2, b2, 1.0, routing, u)
        torch.testing.assert_close(probs, want_p, atol=2e-2, rtol=2e-2)
        assert (expert == want_e).float().mean() > 0.97
