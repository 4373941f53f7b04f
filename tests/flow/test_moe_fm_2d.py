"""Tests of the 2-D MoE flow-matching experiment (yan_serve/experiments/moe_fm_2d.py).

Run: python -m pytest tests/flow/test_moe_fm_2d.py -q        (add -m "not slow" to skip training)
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from yan_serve.experiments.moe_fm_2d import (
    GRID_STD,
    MOONS_NOISE,
    MOONS_SCALE,
    MOONS_SHIFT,
    TOY_SCHEDULE,
    ExperimentConfig,
    ToyMoEField,
    evaluate,
    gate_mutual_information,
    grid_centers,
    main,
    make_dataset,
    sample,
    torch_threads,
    train_field,
)
from yan_serve.flow.solver import FrozenRoutingEuler


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls: a second OpenMP thread only costs time, badly so on a shared 2-core box."""
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------------ datasets


def test_grid_centers_are_a_centred_4x4_lattice() -> None:
    c = grid_centers()
    assert c.shape == (16, 2)
    assert sorted(set(c[:, 0].tolist())) == [-3.0, -1.0, 1.0, 3.0]
    assert torch.allclose(c.mean(0), torch.zeros(2))
    assert len({tuple(p) for p in c.tolist()}) == 16


def test_grid_points_sit_on_16_equally_likely_modes() -> None:
    n = 16_000
    x = make_dataset("grid", n, seed=0)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    d = torch.cdist(x, grid_centers())  # [n, 16]
    nearest, which = d.min(1)
    # every point is a small Gaussian perturbation of its mode: |N(0, s^2 I_2)| < 5 s whp
    assert nearest.max() < 5 * GRID_STD
    assert abs(nearest.pow(2).mean().item() / (2 * GRID_STD**2) - 1.0) < 0.05
    counts = torch.bincount(which, minlength=16).float() / n
    assert counts.min() > 1 / 16 - 0.01 and counts.max() < 1 / 16 + 0.01


def test_two_moons_lie_on_two_interleaved_half_circles() -> None:
    n = 10_000
    x = make_dataset("moons", n, seed=1)
    assert x.shape == (n, 2)
    raw = x / MOONS_SCALE + torch.tensor(MOONS_SHIFT)
    r_up = raw.norm(dim=1)  # upper moon: unit circle about (0, 0), y >= 0
    r_lo = (raw - torch.tensor([1.0, 0.5])).norm(dim=1)  # lower: about (1, 0.5), y <= 0.5
    on_up = (r_up - 1).abs() < 5 * MOONS_NOISE
    on_lo = (r_lo - 1).abs() < 5 * MOONS_NOISE
    assert bool((on_up | on_lo).all())
    up_only, lo_only = on_up & ~on_lo, on_lo & ~on_up
    assert bool((raw[up_only, 1] > -5 * MOONS_NOISE).all())
    assert bool((raw[lo_only, 1] < 0.5 + 5 * MOONS_NOISE).all())
    # both moons equally likely, and the arcs are covered end to end (th ~ U(0, pi))
    assert abs(up_only.float().mean().item() - lo_only.float().mean().item()) < 0.05
    assert raw[up_only, 0].min() < -0.9 and raw[up_only, 0].max() > 0.9
    assert raw[lo_only, 0].min() < 0.1 and raw[lo_only, 0].max() > 1.9


def test_datasets_are_seeded() -> None:
    for name in ("grid", "moons"):
        assert torch.equal(make_dataset(name, 100, 7), make_dataset(name, 100, 7))
        assert not torch.equal(make_dataset(name, 100, 7), make_dataset(name, 100, 8))
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("spirals", 10, 0)


# ----------------------------------------------------------------------------- the toy field


@pytest.mark.parametrize("k", [1, 3])
def test_toy_field_satisfies_the_moe_vector_field_protocol(k: int) -> None:
    torch.manual_seed(0)
    f = ToyMoEField(k, hidden=32, expert_hidden=16)
    B, L = 5, 3  # the experiment uses L = 1; the field must not depend on it
    z, t = torch.randn(B, L, 2), torch.rand(B)
    s = f.trunk(z, t, None)
    assert f.n_experts == k
    logits, fields = f.gate_logits(s), f.expert_fields(s)
    assert logits.shape == (B, L, k)
    assert fields.shape == (B, L, k, 2)
    if k == 1:
        assert torch.equal(logits, torch.zeros(B, L, 1))  # no gate: log pi = 0
    else:
        assert logits.std() > 0  # the gate depends on its input
    expert = torch.randint(k, (B, L))
    routed = f.routed_field(s, expert)
    assert routed.shape == (B, L, 2)
    for b in range(B):
        for l in range(L):
            assert torch.equal(routed[b, l], fields[b, l, expert[b, l]])
    # tokens are independent 2-D points: a token's field depends only on its own z
    z2 = z.clone()
    z2[:, 1] += 1.0
    s2 = f.trunk(z2, t, None)
    assert torch.allclose(f.expert_fields(s2)[:, 0], fields[:, 0])
    assert not torch.allclose(f.expert_fields(s2)[:, 1], fields[:, 1])


def test_frozen_routing_solve_on_toy_field_matches_naive_and_hand_euler() -> None:
    torch.manual_seed(1)
    f = ToyMoEField(4, hidden=32, expert_hidden=16).eval()
    z0, u = torch.randn(64, 1, 2), torch.rand(64, 1)
    solver = FrozenRoutingEuler()
    with torch.no_grad():
        fast = solver.solve(f, z0, None, steps=5, routing="sample", uniforms=u)
        naive = solver.solve_naive(f, z0, None, steps=5, routing="sample", uniforms=u)
        assert torch.equal(fast.expert, naive.expert)
        torch.testing.assert_close(fast.z, naive.z)
        # 4 Euler steps of size 1/4 with each point's expert frozen at t = 0
        z = z0
        for i in range(4):
            s = f.trunk(z, torch.full((64,), i / 4), None)
            z = z + 0.25 * f.routed_field(s, fast.expert)
    torch.testing.assert_close(fast.z, z)
    assert len(set(fast.expert.flatten().tolist())) > 1  # "sample" routing actually mixes


def test_sample_counts_euler_steps_not_time_points() -> None:
    f = ToyMoEField(2, hidden=16, expert_hidden=8)
    res = sample(f, 10, euler_steps=4, generator=torch.Generator().manual_seed(0),
                 return_trajectory=True)  # fmt: skip
    assert len(res.trajectory) == 5  # T = 5 points = 4 Euler steps
    assert res.z.shape == (10, 1, 2) and torch.equal(res.trajectory[-1], res.z)
    again = sample(f, 10, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again.z, res.z)  # a solve is a function of its seed


def test_training_lowers_the_moe_nll() -> None:
    short = replace(TOY_SCHEDULE, steps=150, batch_size=128)
    cfg = ExperimentConfig(schedule=short, hidden=32, expert_hidden=16)
    data = make_dataset("moons", 2000, 0)
    _, first = train_field(data, 2, 0.3, replace(cfg, schedule=replace(short, steps=1)), 0)
    _, last = train_field(data, 2, 0.3, cfg, 0)
    assert math.isfinite(last) and last < first - 1.0


def test_gate_mutual_information_bounds() -> None:
    k = 4
    assert gate_mutual_information(torch.full((100, k), 1 / k)) == pytest.approx(0.0, abs=1e-9)
    one_hot = torch.eye(k).repeat(25, 1)  # z_0 decides the expert, experts equally used
    assert gate_mutual_information(one_hot) == pytest.approx(math.log(k), rel=1e-6)
    same = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(50, 1)  # skewed but z_0-independent
    assert gate_mutual_information(same) == pytest.approx(0.0, abs=1e-9)


def test_module_imports_without_matplotlib() -> None:
    code = (
        "import sys; import yan_serve.experiments.moe_fm_2d; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_prints_table_and_writes_figure(tmp_path, capsys) -> None:
    out = tmp_path / "fig.png"
    main(["--out", str(out), "--steps", "20", "--datasets", "moons", "--experts", "1", "2",
          "--euler-steps", "4", "--eval-seeds", "2"])  # fmt: skip
    text = capsys.readouterr().out
    assert "| moons   | 1    | -" in text and "| moons   | 2    | 0.1" in text
    assert "E=4 (T=5)" in text
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ the claim


@pytest.mark.slow
def test_moe_beats_vanilla_fm_at_4_euler_steps_on_two_moons() -> None:
    """The paper's claim, measured: MoE-FM (K=8, sigma=0.1) has lower MMD^2 to held-out two
    moons than vanilla FM (K=1) at 4 Euler steps (T = 5 time points).

    Margin chosen from run seeds 0..5 at this exact config (docs/moe_fm_2d.md): MoE/vanilla
    ratio 0.24..0.53 (vanilla 63..93e-3, MoE 20..35e-3); we assert ratio < 0.75.
    """
    cfg = ExperimentConfig(schedule=replace(TOY_SCHEDULE, steps=1500), euler_steps=(4,),
                           eval_seeds=3)  # fmt: skip
    seed = 0
    train = make_dataset("moons", cfg.n_train, seed * 1_000_003 + 1)
    heldout = make_dataset("moons", cfg.n_eval, seed * 1_000_003 + 3)
    mmd: dict[int, float] = {}
    for k in (1, 8):
        model, _ = train_field(train, k, 0.1, cfg, seed)
        vals, usage, _ = evaluate(model, heldout, cfg, seed)
        mmd[k] = sum(vals[4]) / len(vals[4])
        if k > 1:
            assert min(usage) > 0.05, usage  # frozen routing really uses every expert
    assert mmd[8] < 0.75 * mmd[1], mmd
