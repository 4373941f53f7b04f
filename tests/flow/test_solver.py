"""The frozen-routing Euler solver on analytic fields and on a real YAN trunk.

Run: python -m pytest tests/flow/test_solver.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.conftest import micro_config
from yan_serve.flow.solver import FrozenRoutingEuler, select_experts, time_grid
from yan_serve.model import YAN


@dataclass
class _State:
    z: torch.Tensor
    t: torch.Tensor


class AffineExperts:
    """Expert k: u_k(z, t) = a_k * z + c_k (exact Euler answers are known in closed form).

    The gate prefers expert (token index mod K) at t = 0. Counts trunk evaluations.
    """

    def __init__(self, a: list[float], c: torch.Tensor) -> None:
        self.a = torch.tensor(a)
        self.c = c  # [K, d]
        self.calls = 0

    @property
    def n_experts(self) -> int:
        return len(self.a)

    def trunk(self, z, t, cond):
        self.calls += 1
        return _State(z, t)

    def gate_logits(self, s):
        B, L, _ = s.z.shape
        pref = torch.arange(L) % self.n_experts
        return 10.0 * torch.nn.functional.one_hot(pref, self.n_experts).float().expand(B, L, -1)

    def expert_fields(self, s):
        return self.a[:, None] * s.z[:, :, None] + self.c  # [B, L, K, d]

    def routed_field(self, s, expert):
        return self.a[expert][..., None] * s.z + self.c[expert]


def test_time_grid_counts_points() -> None:
    torch.testing.assert_close(time_grid(3), torch.tensor([0.0, 0.5, 1.0]))
    assert time_grid(1).tolist() == [0.0]
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_euler_matches_closed_form(steps: int) -> None:
    """Constant field: z1 = z0 + c_e exactly; linear field: z0 * (1 + dt)^(T-1)."""
    K, d = 3, 4
    field = AffineExperts([0.0, 1.0, 0.0], torch.randn(K, d))
    z0 = torch.randn(2, 6, d)
    res = FrozenRoutingEuler().solve(field, z0, None, steps, routing="argmax")
    expert = torch.arange(6) % K
    assert torch.equal(res.expert, expert.expand(2, -1))
    n, dt = steps - 1, 1.0 / max(steps - 1, 1)
    for l in range(6):
        e = int(expert[l])
        if e == 1:
            c = field.c[1]
            # z' = z + c, Euler: z_{n} = (1+dt)^n (z0 + c) - c
            expect = (1 + dt) ** n * (z0[:, l] + c) - c
        else:
            expect = z0[:, l] + (field.c[e] if n else 0)
        torch.testing.assert_close(res.z[:, l], expect, rtol=1e-5, atol=1e-5)
    assert field.calls == max(steps - 1, 1)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_t0_reuse_saves_one_trunk_pass_and_changes_nothing(steps: int) -> None:
    field = AffineExperts([0.5, -1.0], torch.randn(2, 3))
    z0, u = torch.randn(2, 5, 3), torch.rand(2, 5)
    fast = FrozenRoutingEuler().solve(field, z0, None, steps, "sample", u)
    fast_calls, field.calls = field.calls, 0
    naive = FrozenRoutingEuler().solve_naive(field, z0, None, steps, "sample", u)
    assert fast_calls == max(steps - 1, 1) and field.calls == steps
    torch.testing.assert_close(fast.z, naive.z)
    assert torch.equal(fast.expert, naive.expert)


def test_select_experts_sampling_follows_the_gate() -> None:
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3]).expand(1, 40000, 4)
    idx = select_experts(
        probs, "sample", torch.rand(1, 40000, generator=torch.Generator().manual_seed(0))
    )
    freq = torch.bincount(idx.flatten(), minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.0, 0.3]), atol=0.01, rtol=0)
    assert torch.equal(select_experts(probs[:, :3], "argmax"), torch.ones(1, 3, dtype=torch.long))
    edge = select_experts(torch.tensor([[[0.5, 0.5]]]), "sample", torch.tensor([[0.999999]]))
    assert edge.item() == 1
    with pytest.raises(ValueError):
        select_experts(probs, "sample")
    with pytest.raises(ValueError):
        select_experts(probs, "top2")  # type: ignore[arg-type]


def test_trajectory_holds_every_time_point() -> None:
    field = AffineExperts([1.0], torch.zeros(1, 2))
    z0 = torch.ones(1, 1, 2)
    res = FrozenRoutingEuler().solve(field, z0, None, 4, "argmax", return_trajectory=True)
    assert len(res.trajectory) == 4
    for i, z in enumerate(res.trajectory):
        torch.testing.assert_close(z, z0 * (4 / 3) ** i)
    torch.testing.assert_close(res.trajectory[-1], res.z)


def _yan_inputs(model: YAN, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 61, (2, 6), generator=g)
    sm = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)
    tm = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    cond = model.condition(model.encode(src, sm), sm, tm)
    z0 = torch.randn(2, 5, model.config.d_model, generator=g) * tm[..., None]
    return cond, z0, torch.rand(2, 5, generator=g)


def test_unrolled_solve_gradient_matches_finite_differences() -> None:
    """Gradient through every Euler step of the real trunk (float64, routing frozen)."""
    torch.manual_seed(0)
    model = YAN(micro_config(d_model=16, attention_heads=2, n_trf_blocks=2, cross_att_idx=(1,)))
    model = model.double().eval()
    cond, z0, u = _yan_inputs(model)
    cond.src, cond.src_pooled = cond.src.double().detach(), cond.src_pooled.double().detach()
    cond.pos = cond.pos.detach()
    z0 = z0.double().requires_grad_(True)

    def f(z):
        return FrozenRoutingEuler().solve(model.flow, z, cond, 4, "sample", u).z.sin().sum()

    assert torch.autograd.gradcheck(f, (z0,), eps=1e-6, atol=1e-5)
    # and the trunk's own parameters receive gradient from the solve
    f(z0).backward()
    w = model.flow.trf_blocks[0].self_att.W_q.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
