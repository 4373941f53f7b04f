"""Loss functions against closed forms, brute-force loops and finite differences.

Run: python -m pytest tests/flow/test_losses.py -q
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from yan_serve.flow.losses import (
    MMD_BANDWIDTHS,
    distill_mse,
    flow_matching_l2,
    gate_entropy,
    load_balance_kl,
    mmd2,
    moe_fm_nll,
    scale_loss,
    token_ce,
)
from yan_serve.flow.path import LinearPath


def _mask(B: int, L: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(L)[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("sigma", [0.1, 1.0, 3.0])
def test_k1_nll_is_vanilla_flow_matching(sigma: float) -> None:
    torch.manual_seed(0)
    B, L, d = 3, 7, 5
    u, target = torch.randn(B, L, 1, d), torch.randn(B, L, d)
    mask = _mask(B, L, [7, 4, 1])
    nll = moe_fm_nll(u, torch.randn(B, L, 1), target, mask, sigma)
    l2 = flow_matching_l2(u[:, :, 0], target, mask)
    const = 0.5 * d * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(nll, l2 / (2 * sigma**2) + const)


def test_nll_matches_a_loop_over_tokens_and_experts() -> None:
    torch.manual_seed(1)
    B, L, K, d, sigma = 2, 5, 4, 3, 0.7
    fields, logits, target = torch.randn(B, L, K, d), torch.randn(B, L, K), torch.randn(B, L, d)
    mask = _mask(B, L, [5, 2])
    total, count = 0.0, 0
    for b in range(B):
        for l in range(L):
            if not mask[b, l]:
                continue
            pi = torch.softmax(logits[b, l], -1)
            lik = 0.0
            for k in range(K):
                sq = ((fields[b, l, k] - target[b, l]) ** 2).sum()
                dens = math.exp(-sq / (2 * sigma**2)) / (2 * math.pi * sigma**2) ** (d / 2)
                lik += pi[k].item() * dens
            total += -math.log(lik)
            count += 1
    assert moe_fm_nll(fields, logits, target, mask, sigma).item() == pytest.approx(
        total / count, rel=1e-5
    )


def test_nll_ignores_padding_content() -> None:
    torch.manual_seed(2)
    fields, logits, target = torch.randn(2, 4, 3, 6), torch.randn(2, 4, 3), torch.randn(2, 4, 6)
    mask = _mask(2, 4, [4, 2])
    a = moe_fm_nll(fields, logits, target, mask, 0.5)
    fields[1, 2:] += 100.0
    target[1, 3] = float("nan")
    logits[1, 2:] = -50.0
    b = moe_fm_nll(fields.clone(), logits, target.nan_to_num(), mask, 0.5)
    torch.testing.assert_close(a, b)


def test_nll_gradients_match_finite_differences() -> None:
    torch.manual_seed(3)
    B, L, K, d = 2, 3, 3, 4
    fields = torch.randn(B, L, K, d, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, L, K, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, L, d, dtype=torch.float64, requires_grad=True)
    mask = _mask(B, L, [3, 2])
    assert torch.autograd.gradcheck(
        lambda f, g, t: moe_fm_nll(f, g, t, mask, 0.8), (fields, logits, target)
    )


def _mmd_loop(x: torch.Tensor, y: torch.Tensor) -> float:
    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * h * h)) for h in MMD_BANDWIDTHS)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_equals_brute_force_loop() -> None:
    torch.manual_seed(4)
    x, y = torch.randn(13, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64) + 0.5
    assert mmd2(x, y).item() == pytest.approx(_mmd_loop(x, y), rel=1e-9)


def test_mmd_near_zero_for_same_gaussian_and_grows_with_shift() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1500, 2, generator=g)
    same = mmd2(x, torch.randn(1500, 2, generator=g)).item()
    assert abs(same) < 5e-3
    shifts = [mmd2(x, torch.randn(1500, 2, generator=g) + s).item() for s in (0.25, 0.5, 1.0, 2.0)]
    assert shifts[0] > 5 * abs(same) + 1e-3
    assert all(a < b for a, b in itertools.pairwise(shifts)), shifts


def test_mmd_default_prior_and_subsampling() -> None:
    g = torch.Generator().manual_seed(6)
    prior_like = torch.randn(2500, 2, generator=g)
    assert abs(mmd2(prior_like, generator=g).item()) < 5e-3  # fresh N(0, I) draws, <= 2000 kept
    assert mmd2(prior_like * 0.2, generator=g).item() > 0.1
    with pytest.raises(ValueError):
        mmd2(torch.randn(4, 2, 2))


def test_token_ce_masks_and_matches_torch() -> None:
    torch.manual_seed(7)
    logits, tgt = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = _mask(2, 5, [5, 3])
    ref = F.cross_entropy(logits[mask], tgt[mask])
    torch.testing.assert_close(token_ce(logits, tgt, mask), ref)


def test_token_ce_weighted_mean() -> None:
    """A per-position weight gives sum(w * ce) / sum(w) over the masked tokens; uniform weights
    give the plain mean, and padded positions stay out whatever their weight."""
    torch.manual_seed(8)
    logits, tgt = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = _mask(2, 5, [5, 3])
    w = torch.rand(2, 5) + 0.5
    per = F.cross_entropy(logits[mask], tgt[mask], reduction="none")
    ref = (per * w[mask]).sum() / w[mask].sum()
    torch.testing.assert_close(token_ce(logits, tgt, mask, w), ref)
    torch.testing.assert_close(
        token_ce(logits, tgt, mask, torch.full((2, 5), 3.0)), token_ce(logits, tgt, mask)
    )
    w2 = w.clone()
    w2[1, 3:] = 1e6  # beyond sequence 1's length
    torch.testing.assert_close(token_ce(logits, tgt, mask, w2), ref)


def test_scale_entropy_balance_distill() -> None:
    mask = _mask(2, 3, [3, 1])
    z = torch.full((2, 3, 4), 2.0)
    z[1, 1:] = 100.0  # padding must not count
    assert scale_loss(z, mask).item() == pytest.approx(4.0)
    K = 5
    uniform = torch.zeros(2, 3, K)
    assert gate_entropy(uniform, mask).item() == pytest.approx(math.log(K))
    assert load_balance_kl(uniform, mask).item() == pytest.approx(0.0, abs=1e-7)
    onehot = torch.full((2, 3, K), -1e4)
    onehot[..., 0] = 0.0
    assert load_balance_kl(onehot, mask).item() == pytest.approx(math.log(K), rel=1e-4)
    assert distill_mse(z, z + 1.0, mask).item() == pytest.approx(4.0)


def test_linear_path_endpoints_and_velocity() -> None:
    x0, x1 = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    p = LinearPath()
    s = p.sample(x0, x1, torch.tensor([0.0, 1.0, 0.5, 0.25]))
    torch.testing.assert_close(s.x_t[0], x0[0])
    torch.testing.assert_close(s.x_t[1], x1[1])
    torch.testing.assert_close(s.x_t[2], 0.5 * (x0[2] + x1[2]))
    torch.testing.assert_close(s.dx_t, x1 - x0)


def test_linear_path_time_distribution() -> None:
    g = torch.Generator().manual_seed(8)
    t = LinearPath().sample_t(20000, generator=g)
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.01
    tb = LinearPath(2.0, 5.0).sample_t(20000, generator=g)
    assert abs(tb.mean().item() - 2 / 7) < 0.01  # Beta(2, 5) mean
    again = LinearPath(2.0, 5.0).sample_t(5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        again, LinearPath(2.0, 5.0).sample_t(5, generator=torch.Generator().manual_seed(1))
    )
