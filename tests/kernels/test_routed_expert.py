"""Routed expert + Euler kernel against its pure-torch reference and the model's `Experts`.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_routed_expert.py
(no CUDA: the kernels run in Triton's CPU interpreter; GPU tests are marked `gpu`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.tolerances import TOL
from yan_serve.model.flow import Experts

pytest.importorskip("triton")

from yan_kernels.routed_expert import (
    Blocks,
    routed_expert_euler,
    routed_expert_euler_dense,
    routed_expert_euler_ref,
    tile_map,
    tile_map_fused,
)


def _weights(K: int, d: int, device, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """w1 [K, d, 4d], b1 [K, 4d], w2 [K, 4d, d], b2 [K, d]; Linear-like weights, biases of
    order 1 so that a dropped bias shows."""
    g = torch.Generator().manual_seed(seed)
    H = 4 * d

    def u(*shape: int, bound: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    w = [
        u(K, d, H, bound=d**-0.5),
        u(K, H, bound=0.5),
        u(K, H, d, bound=H**-0.5),
        u(K, d, bound=0.5),
    ]
    return [t.to(device, dtype) for t in w]


def _inputs(N: int, d: int, K: int, device, empty: tuple[int, ...] = (), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    z = torch.randn(N, d, generator=g)
    live = [k for k in range(K) if k not in empty]
    expert = torch.tensor(live)[torch.randint(0, len(live), (N,), generator=g)]
    return h.to(device), expert.to(device), z.to(device)


CASES = [  # (N, d, K, experts with no token)
    (37, 48, 3, ()),
    (37, 48, 3, (1,)),  # an expert that gets zero tokens
    (1, 48, 3, ()),  # one token
    (70, 32, 5, (0, 1, 3, 4)),  # every token on one expert
]


@pytest.mark.parametrize(("N", "d", "K", "empty"), CASES)
@pytest.mark.parametrize("dt", [0.37, 0.0])
def test_kernel_matches_reference(device, N, d, K, empty, dt) -> None:
    w1, b1, w2, b2 = _weights(K, d, device)
    h, e, z = _inputs(N, d, K, device, empty)
    out = routed_expert_euler(h, e, w1, b1, w2, b2, z, dt)
    ref = routed_expert_euler_ref(h, e, w1, b1, w2, b2, z, dt)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    if dt == 0.0:
        assert torch.equal(out, z)


@pytest.mark.parametrize(("N", "d", "K", "empty"), CASES[:2])
def test_field_only_when_z_is_none(device, N, d, K, empty) -> None:
    w1, b1, w2, b2 = _weights(K, d, device)
    h, e, _ = _inputs(N, d, K, device, empty)
    out = routed_expert_euler(h, e, w1, b1, w2, b2, None)
    torch.testing.assert_close(
        out, routed_expert_euler_ref(h, e, w1, b1, w2, b2), **TOL[torch.float32]
    )


def test_small_tiles_span_many_tiles_per_expert(device) -> None:
    """block_m=16 cuts each expert's rows into several tiles, the last one partial."""
    N, d, K = 83, 48, 3
    w1, b1, w2, b2 = _weights(K, d, device)
    h, e, z = _inputs(N, d, K, device)
    blocks = Blocks(16, 64, 16, 4, 1)
    out = routed_expert_euler(h, e, w1, b1, w2, b2, z, 0.5, blocks=blocks)
    ref = routed_expert_euler_ref(h, e, w1, b1, w2, b2, z, 0.5)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("with_z", [True, False])
def test_tma_descriptor_loads_match_reference(device, with_z) -> None:
    """TMA descriptor tiles (weights as [K * rows, cols], the down-projection's activations)
    on awkward shapes: d = 40 is not a multiple of the K tile, so the last weight tile of an
    expert runs into the next expert's rows (they must meet zero activations); F = 160 is not
    a multiple of the column tile; an expert gets no token; the down-projection has its own
    configuration."""
    N, d, K = 83, 40, 3
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # TMA takes 16-bit on a GPU
    w1, b1, w2, b2 = _weights(K, d, device, dtype)
    h, e, z = _inputs(N, d, K, device, empty=(1,))
    h, z = h.to(dtype), z.to(dtype)
    up, down = Blocks(16, 64, 32, 4, 1, tma=True), Blocks(16, 32, 32, 4, 1, tma=True)
    zz = z if with_z else None
    out = routed_expert_euler(h, e, w1, b1, w2, b2, zz, 0.5, blocks=up, down_blocks=down)
    ref = routed_expert_euler_ref(h, e, w1, b1, w2, b2, zz, 0.5)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_one_tile_map_serves_every_step(device) -> None:
    """With frozen routing the solver groups tokens once and reuses the map for each Euler step;
    a reused map gives the same result as a fresh one, for another h and z too."""
    N, d, K = 61, 32, 4
    w1, b1, w2, b2 = _weights(K, d, device)
    h, e, z = _inputs(N, d, K, device)
    blocks = Blocks(16, 64, 32, 4, 1)
    tiles = tile_map(e, K, blocks.block_m)
    for step in range(2):
        h2, z2 = h + step, z - step
        out = routed_expert_euler(h2, e, w1, b1, w2, b2, z2, 0.5, tiles=tiles, blocks=blocks)
        ref = routed_expert_euler_ref(h2, e, w1, b1, w2, b2, z2, 0.5)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_reference_is_the_models_routed_field() -> None:
    """The reference equals `Experts.routed` (the model's CPU path) bit for bit."""
    torch.manual_seed(0)
    ex = Experts(3, 16, 64)
    h = torch.randn(2, 9, 16)
    e = torch.randint(0, 3, (2, 9))
    with torch.no_grad():
        want = ex.routed(h, e).reshape(-1, 16)
        got = routed_expert_euler_ref(h.reshape(-1, 16), e.reshape(-1), ex.w1, ex.b1, ex.w2, ex.b2)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("N", "d", "K", "empty"), CASES)
@pytest.mark.parametrize("with_z", [True, False])
def test_dense_training_form_equals_the_reference_with_gradients(N, d, K, empty, with_z) -> None:
    """The sync-free form a GPU training step takes (every expert, then the routed one) gives
    the reference's outputs and the same gradients for h, z and every weight: an expert that
    routes no token gets none."""
    h, e, z = _inputs(N, d, K, "cpu", empty)
    h, z = h.double(), z.double()
    leaves = [t.double().requires_grad_() for t in (h, z, *_weights(K, d, "cpu"))]
    got_out = routed_expert_euler_dense(leaves[0], e, *leaves[2:], leaves[1] if with_z else None,
                                        0.37)  # fmt: skip
    grads_out = torch.randn(got_out.shape, generator=torch.Generator().manual_seed(5),
                            dtype=got_out.dtype)  # fmt: skip
    got = torch.autograd.grad(got_out, leaves, grads_out, allow_unused=True)
    want_out = routed_expert_euler_ref(leaves[0], e, *leaves[2:], leaves[1] if with_z else None,
                                       0.37)  # fmt: skip
    want = torch.autograd.grad(want_out, leaves, grads_out, allow_unused=True)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        if w is None:  # z unused
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for k in empty:  # experts with no token: zero gradient, as the reference's none
        assert not got[2][k].any() and not got[5][k].any()


@pytest.mark.gpu
def test_gpu_training_takes_the_dense_form_without_a_host_sync(monkeypatch) -> None:
    """With gradients on CUDA the facade takes the dense form (no `nonzero`): a training step
    never waits for the host there; its values and gradients are the reference's."""
    from yan_kernels import ops

    torch.manual_seed(0)
    ex = Experts(6, 64, 256).cuda()
    h = torch.randn(3, 50, 64, device="cuda", requires_grad=True)
    e = torch.randint(0, 6, (3, 50), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ex.routed(h, e)
        g_got = torch.autograd.grad(got.square().sum(), [h, ex.w1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with ops.force("ref"):
        h2 = h.detach().requires_grad_()
        flat = routed_expert_euler_ref(h2.reshape(-1, 64), e.reshape(-1), ex.w1, ex.b1, ex.w2,
                                       ex.b2)  # fmt: skip
        g_want = torch.autograd.grad(flat.square().sum(), [h2, ex.w1])
    torch.testing.assert_close(got.reshape(-1, 64), flat, **TOL[torch.float32])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("mutant", ["no_gelu", "tanh_gelu", "no_b1", "no_b2", "wrong_expert"])
def test_tolerance_rejects_plausible_bugs(device, mutant) -> None:
    """The fp32 tolerance is tight enough that each of these kernel bugs would fail the
    comparison above (the mutant is written in torch; the kernel must differ from it)."""
    N, d, K = 37, 48, 3
    w1, b1, w2, b2 = _weights(K, d, device)
    h, e, z = _inputs(N, d, K, device)
    out = routed_expert_euler(h, e, w1, b1, w2, b2, z, 0.37)
    act = {
        "no_gelu": lambda x: x,
        "tanh_gelu": lambda x: F.gelu(x, approximate="tanh"),
    }.get(mutant, F.gelu)
    bb1 = torch.zeros_like(b1) if mutant == "no_b1" else b1
    bb2 = torch.zeros_like(b2) if mutant == "no_b2" else b2
    ee = (e + 1) % K if mutant == "wrong_expert" else e
    field = torch.stack(
        [act(h[i] @ w1[ee[i]] + bb1[ee[i]]) @ w2[ee[i]] + bb2[ee[i]] for i in range(N)]
    )
    bad = z + 0.37 * field
    assert not torch.allclose(out, bad, **TOL[torch.float32])


def test_tile_map_covers_each_expert_once() -> None:
    e = torch.tensor([2, 0, 2, 2, 0, 2, 2, 2, 2, 2, 0])  # expert 1 empty
    order, tiles, total, block_m = tile_map(e, 3, 4)
    assert block_m == 4
    assert total == 3 + 3
    assert torch.equal(e[order], e.sort(stable=True).values)
    rows = []
    for t in range(total):
        k, r0, r1 = tiles[:, t].tolist()
        assert r1 - r0 <= 4
        if r1 > r0:
            assert (e[order[r0:r1]] == k).all()
            rows += list(range(r0, r1))
    assert sorted(rows) == list(range(len(e)))


@pytest.mark.parametrize(
    ("n", "K", "block_m", "empty"),
    [(11, 3, 4, (1,)), (2500, 6, 64, (2,)), (1, 6, 64, ()), (1030, 5, 128, (0, 1, 3, 4)),
     (5000, 7, 32, ())],
)  # fmt: skip
def test_one_launch_tile_map_equals_the_sorted_one(device, n, K, block_m, empty) -> None:
    """The one-program Triton grouping (counts, stable ranks by one-hot prefix sums, the tile
    table) is the sort-based `tile_map` exactly: chunks of 1024 tokens (n = 2500 spans three,
    the last partial), empty experts, K not a power of two, every token on one expert."""
    g = torch.Generator().manual_seed(n)
    live = [k for k in range(K) if k not in empty]
    e = torch.tensor(live)[torch.randint(0, len(live), (n,), generator=g)].to(device)
    want = tile_map(e, K, block_m)
    got = tile_map_fused(e, K, block_m)
    assert got.total == want.total and got.block_m == want.block_m
    assert torch.equal(got.order, want.order)
    assert torch.equal(got.tiles, want.tiles)


def test_launcher_rejects_bad_shapes(device) -> None:
    w1, b1, w2, b2 = _weights(3, 48, device)
    h, e, z = _inputs(5, 48, 3, device)
    with pytest.raises(AssertionError):
        routed_expert_euler(h[:, :32], e, w1, b1, w2, b2, z, 0.1)
    with pytest.raises(AssertionError):
        routed_expert_euler(h, e, w1, b1[:, :8], w2, b2, z, 0.1)
    with pytest.raises(AssertionError):
        routed_expert_euler(h, e.float(), w1, b1, w2, b2, z, 0.1)


# ------------------------------------------------------------------------------------- GPU
def _fp32_oracle(h, e, w1, b1, w2, b2, z, dt):
    up = [t.float() for t in (h, w1, b1, w2, b2)]
    return routed_expert_euler_ref(up[0], e, *up[1:], None if z is None else z.float(), dt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [1, 1000, 64 * 1024])
def test_paper_shapes_on_gpu(N, dtype) -> None:
    d, K = 512, 6
    dev = torch.device("cuda")
    w1, b1, w2, b2 = _weights(K, d, dev, dtype)
    h, e, z = _inputs(N, d, K, dev, empty=(4,))
    h, z = h.to(dtype), z.to(dtype)
    out = routed_expert_euler(h, e, w1, b1, w2, b2, z, 0.25)
    want = _fp32_oracle(h, e, w1, b1, w2, b2, z, 0.25)
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    field = routed_expert_euler(h, e, w1, b1, w2, b2)
    torch.testing.assert_close(
        field.float(), _fp32_oracle(h, e, w1, b1, w2, b2, None, 1.0), **TOL[dtype]
    )


@pytest.mark.gpu
def test_flow_experts_use_the_kernel_on_gpu(monkeypatch) -> None:
    from yan_kernels import force
    from yan_kernels import routed_expert as mod

    calls = []
    kernel = mod.routed_expert_euler
    monkeypatch.setattr(
        mod, "routed_expert_euler", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    torch.manual_seed(0)
    ex = Experts(6, 64, 256).cuda()
    h = torch.randn(3, 50, 64, device="cuda")
    e = torch.randint(0, 6, (3, 50), device="cuda")
    with torch.no_grad():
        with force("ref"):
            want = ex.routed(h, e)
        assert not calls
        with force("triton"):
            got = ex.routed(h, e)
        assert calls
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (9, 0)])
def test_every_gpu_choice_is_a_compiled_spec_within_its_targets_shared_memory(
    monkeypatch, cap
) -> None:
    """What the launcher picks on a GPU of capability `cap`, for every dtype, token count and
    projection, is among the configurations the compile guard compiles for that target (which
    checks each against the target's shared memory). Three stages of the large fp32 tiles need
    192 KiB: an A100 block may have 163, so before Hopper they run two."""
    from yan_kernels import aot
    from yan_kernels import routed_expert as m

    monkeypatch.setattr(m, "capability", lambda device: cap)
    arch = 90 if cap >= (9, 0) else 80
    specs = [s for s in m.aot_specs() if s.archs is None or arch in s.archs]
    compiled = {(s.kernel, s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"],
                 s.constexprs["BLOCK_K"], s.num_warps, s.num_stages, s.label.split()[0])
                for s in specs if s.kernel != "_tile_map_kernel"}  # fmt: skip
    cuda = torch.device("cuda", 0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = aot.TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        for n in (1, m.GPU_LARGE_N - 1, m.GPU_LARGE_N, 65_536):
            for kernel, down in (("_expert_up_kernel", False), ("_expert_down_kernel", True)):
                b = m.default_blocks(cuda, n, down=down, dtype=dtype)
                key = (kernel, b.block_m, b.block_n, b.block_k, b.num_warps, b.num_stages, name)
                assert key in compiled, (cap, key)
                if dtype == torch.float32 and n >= m.GPU_LARGE_N:
                    assert b.num_stages == (3 if arch == 90 else m.PRE_HOPPER_FP32_STAGES)
