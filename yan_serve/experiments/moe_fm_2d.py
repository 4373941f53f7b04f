"""MoE flow matching vs vanilla flow matching on 2-D toy data (the paper's Fig. 2 claim).

Claim under test: with few Euler steps, a mixture of K expert vector fields with trajectory-level
frozen routing (expert drawn once from pi(z_0, 0), kept for the whole solve) samples a multimodal
2-D distribution better than vanilla flow matching (K = 1), measured by MMD^2 to held-out data.

Everything reuses the project's pieces: `LinearPath` for (z_t, u*), `moe_fm_nll` (Eq. 5) as the
only training loss for every K (K = 1 is vanilla FM up to scale and a constant), `mmd2` as the
metric and `FrozenRoutingEuler` as the sampler. Points are sequences of one 2-D token: [B, 1, 2].

Step counting: `FrozenRoutingEuler.solve(steps=T)` takes T time points, i.e. T - 1 Euler steps.
This module speaks in Euler steps E and passes steps = E + 1 ("4 Euler steps" is T = 5).

Run: python -m yan_serve.experiments.moe_fm_2d --out docs/img/moe_fm_2d.png
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from yan_serve.flow.losses import mmd2, moe_fm_nll
from yan_serve.flow.path import LinearPath
from yan_serve.flow.solver import FrozenRoutingEuler, Routing, SolveResult
from yan_serve.train.trainer import Schedule

Log = Callable[[str], None]

# ------------------------------------------------------------------------------------ datasets

GRID_SIDE = 4
GRID_SPACING = 2.0  # centres at {-3, -1, 1, 3}^2: modes well apart at the metric's bandwidths
GRID_STD = 0.1
MOONS_NOISE = 0.05
MOONS_SHIFT = (0.5, 0.25)  # centre of the raw moons' bounding box
MOONS_SCALE = 1.5  # raw moons span ~3 x 1.5; scaled to roughly the prior's extent


def grid_centers(side: int = GRID_SIDE, spacing: float = GRID_SPACING) -> Tensor:
    """Centres of a side x side grid, symmetric about the origin: [side * side, 2]."""
    c = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    return torch.cartesian_prod(c, c)


def grid_of_gaussians(
    n: int,
    generator: torch.Generator,
    side: int = GRID_SIDE,
    spacing: float = GRID_SPACING,
    std: float = GRID_STD,
) -> Tensor:
    """n points from an equal-weight mixture of isotropic Gaussians on a grid: [n, 2]."""
    centers = grid_centers(side, spacing)
    idx = torch.randint(len(centers), (n,), generator=generator)
    return centers[idx] + std * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator: torch.Generator, noise: float = MOONS_NOISE) -> Tensor:
    """n points from two interleaved half circles (equal odds), centred and scaled: [n, 2].

    Raw moons: upper (cos th, sin th), lower (1 - cos th, 0.5 - sin th), th ~ U(0, pi), plus
    N(0, noise^2) jitter; then (raw - MOONS_SHIFT) * MOONS_SCALE.
    """
    lower = torch.rand(n, generator=generator) < 0.5
    th = torch.rand(n, generator=generator) * math.pi
    upper_pts = torch.stack([th.cos(), th.sin()], -1)
    lower_pts = torch.stack([1.0 - th.cos(), 0.5 - th.sin()], -1)
    raw = torch.where(lower[:, None], lower_pts, upper_pts)
    raw = raw + noise * torch.randn(n, 2, generator=generator)
    return (raw - torch.tensor(MOONS_SHIFT)) * MOONS_SCALE


DATASETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "grid": grid_of_gaussians,
    "moons": two_moons,
}


def make_dataset(name: str, n: int, seed: int) -> Tensor:
    """n points of dataset `name` from a generator seeded with `seed`: [n, 2]."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- model


class SinusoidalTime(nn.Module):
    """t [B] in [0, 1] -> [B, 2 * n_freq] sin/cos at frequencies pi * 2^k."""

    def __init__(self, n_freq: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))

    def forward(self, t: Tensor) -> Tensor:
        a = t[:, None].float() * self.freqs
        return torch.cat([a.sin(), a.cos()], -1)


@dataclass
class ToyState:
    """One trunk evaluation of the toy field."""

    h: Tensor  # [B, L, H] trunk features
    t_emb: Tensor  # [B, T] time embedding


class ToyMoEField(nn.Module):
    """A small 2-D MoE vector field implementing `yan_serve.flow.solver.MoEVectorField`.

    trunk: MLP on [z, t_emb]; experts: K stacked FFNs H -> E -> d on the trunk features;
    gate: MLP on [h, t_emb] -> K logits (mirrors YAN's gate, minus the source pooling). With
    K = 1 there is no gate (its logits are identically 0, so it would get no gradient).
    """

    def __init__(
        self,
        n_experts: int,
        dim: int = 2,
        hidden: int = 128,
        expert_hidden: int = 64,
        time_dim: int = 32,
        gate_hidden: int = 64,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.time_emb = nn.Sequential(SinusoidalTime(), nn.Linear(16, time_dim), nn.GELU())
        self.net = nn.Sequential(
            nn.Linear(dim + time_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
        )  # fmt: skip
        # stacked experts so all-K training is two einsums
        k = n_experts
        self.w1 = nn.Parameter(torch.empty(k, hidden, expert_hidden))
        self.b1 = nn.Parameter(torch.empty(k, expert_hidden))
        self.w2 = nn.Parameter(torch.empty(k, expert_hidden, dim))
        self.b2 = nn.Parameter(torch.empty(k, dim))
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default init, per expert
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.gate: nn.Module | None = None
        if k > 1:
            self.gate = nn.Sequential(
                nn.Linear(hidden + time_dim, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, k)
            )

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def trunk(self, z: Tensor, t: Tensor, cond: object = None) -> ToyState:
        """z [B, L, d], t [B] -> ToyState (h [B, L, H]); `cond` is unused (unconditional)."""
        t_emb = self.time_emb(t)  # [B, T]
        x = torch.cat([z, t_emb[:, None].expand(-1, z.shape[1], -1)], -1)
        return ToyState(h=self.net(x), t_emb=t_emb)

    def gate_logits(self, s: ToyState) -> Tensor:
        """[B, L, K] routing logits."""
        B, L, _ = s.h.shape
        if self.gate is None:
            return s.h.new_zeros(B, L, 1)
        return self.gate(torch.cat([s.h, s.t_emb[:, None].expand(B, L, -1)], -1))

    def expert_fields(self, s: ToyState) -> Tensor:
        """Every expert's field: [B, L, K, d]."""
        a = F.gelu(torch.einsum("blh,khe->blke", s.h, self.w1) + self.b1)
        return torch.einsum("blke,ked->blkd", a, self.w2) + self.b2

    def routed_field(self, s: ToyState, expert: Tensor) -> Tensor:
        """Field of expert[b, l] at each token: [B, L, d]. Computes all K and gathers: the toy
        is tiny, and reading out of `expert_fields` keeps it trivially consistent with training."""
        fields = self.expert_fields(s)
        idx = expert[..., None, None].expand(-1, -1, 1, fields.shape[-1])
        return fields.gather(2, idx).squeeze(2)


# ----------------------------------------------------------------------------------- training


# The documented run's optimization of each field (Adam, warm-up then cosine decay).
TOY_SCHEDULE = Schedule(steps=2000, batch_size=512, lr=2e-3, warmup=100)


@dataclass
class ExperimentConfig:
    """Everything that defines one run of the experiment (defaults: the documented run)."""

    datasets: tuple[str, ...] = ("grid", "moons")
    experts: tuple[int, ...] = (1, 4, 8)  # K = 1 is the vanilla flow-matching baseline
    sigmas: tuple[float, ...] = (0.1,)  # Eq. 5 sigma for the MoE runs; K = 1 uses the first
    schedule: Schedule = field(default_factory=lambda: replace(TOY_SCHEDULE))
    n_train: int = 50_000
    hidden: int = 128
    expert_hidden: int = 64
    seed: int = 0
    euler_steps: tuple[int, ...] = (1, 2, 4, 8, 32)  # reported; 4 is the headline
    n_eval: int = 2000  # samples per MMD^2 (= mmd2's default max_samples)
    eval_seeds: int = 5
    routing: Routing = "sample"
    # intra-op threads: the matmuls here are tiny, and on a shared 2-core box a second OpenMP
    # thread that gets descheduled stalls every op (measured: 300 steps took 4 s on 1 thread,
    # 100 s on 2 while another process held a core)
    threads: int = 1


@dataclass
class RunResult:
    """One trained model's measurements."""

    dataset: str
    n_experts: int
    sigma: float | None  # None for K = 1 (sigma only rescales its loss)
    n_params: int
    train_seconds: float
    final_loss: float
    mmd: dict[int, list[float]] = field(default_factory=dict)  # Euler steps -> MMD^2 per seed
    usage: list[float] = field(default_factory=list)  # fraction of samples per frozen expert
    gate_mi: float = 0.0  # I(z_0; expert) at t = 0, nats


def _gen(seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible generator per (run seed, purpose)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


# generator streams: training data, training noise, held-out data, per-seed evaluation
# (model samples at _EVAL + s, fresh true samples for the noise floor at _FLOOR + s)
_TRAIN_DATA, _TRAIN_NOISE, _HELDOUT, _EVAL, _FLOOR = 1, 2, 3, 100, 150


def train_field(
    data: Tensor,  # [N, 2] training set
    n_experts: int,
    sigma: float,
    cfg: ExperimentConfig,
    seed: int,
    log: Log | None = None,
) -> tuple[ToyMoEField, float]:
    """Train a ToyMoEField with the MoE-FM NLL on the linear path; returns (model, final loss).

    Adam, linear warmup then cosine decay; minibatches and (z_0, t) drawn from a seeded stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # init only; the global RNG is left untouched
        model = ToyMoEField(n_experts, hidden=cfg.hidden, expert_hidden=cfg.expert_hidden)
    sch = cfg.schedule
    opt = torch.optim.Adam(model.parameters(), lr=sch.lr)

    def lr_at(step: int) -> float:
        if step < sch.warmup:
            return (step + 1) / sch.warmup
        p = (step - sch.warmup) / max(1, sch.steps - sch.warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = _gen(seed, _TRAIN_NOISE)
    path = LinearPath()
    B = sch.batch_size
    mask = torch.ones(B, 1, dtype=torch.bool)
    ema = float("nan")
    for step in range(sch.steps):
        x1 = data[torch.randint(len(data), (B,), generator=gen)][:, None]  # [B, 1, 2]
        x0 = torch.randn(x1.shape, generator=gen)
        ps = path.sample(x0, x1, path.sample_t(B, generator=gen))
        s = model.trunk(ps.x_t, ps.t)
        loss = moe_fm_nll(model.expert_fields(s), model.gate_logits(s), ps.dx_t, mask, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if step == 0 else 0.98 * ema + 0.02 * loss.item()
        if log is not None and (step + 1) % max(1, sch.steps // 4) == 0:
            log(f"    step {step + 1:5d}/{sch.steps}  NLL(ema) {ema:9.3f}")
    model.eval()
    return model, ema


@torch.no_grad()
def sample(
    model: ToyMoEField,
    n: int,
    euler_steps: int,
    generator: torch.Generator,
    routing: Routing = "sample",
    return_trajectory: bool = False,
) -> SolveResult:
    """Draw n points: z_0 ~ N(0, I) [n, 1, 2], experts frozen at t = 0, `euler_steps` steps."""
    z0 = torch.randn(n, 1, model.dim, generator=generator)
    u = torch.rand(n, 1, generator=generator)
    return FrozenRoutingEuler().solve(
        model, z0, None, euler_steps + 1, routing, u, return_trajectory=return_trajectory
    )


def gate_mutual_information(probs: Tensor) -> float:
    """I(z_0; expert) in nats from gate probabilities [N, K] at t = 0: H(mean p) - mean H(p).

    0 means the draw at t = 0 ignores z_0 (a random label); log K means z_0 decides it.
    """
    p = probs.double().clamp_min(1e-12)
    ent = -(p * p.log()).sum(-1)
    pm = p.mean(0)
    return float(-(pm * pm.log()).sum() - ent.mean())


def evaluate(
    model: ToyMoEField, heldout: Tensor, cfg: ExperimentConfig, seed: int
) -> tuple[dict[int, list[float]], list[float], float]:
    """MMD^2 of n_eval samples to the held-out set [M, 2], per Euler step count and eval seed.

    Returns ({euler_steps: [mmd2 per seed]}, fraction of samples per frozen expert, and the
    gate's I(z_0; expert) at t = 0), the last two at eval seed 0.
    """
    out: dict[int, list[float]] = {}
    for e in cfg.euler_steps:
        vals = []
        for s in range(cfg.eval_seeds):
            res = sample(model, cfg.n_eval, e, _gen(seed, _EVAL + s), cfg.routing)
            vals.append(mmd2(res.z[:, 0], heldout).item())
        out[e] = vals
    # experts are drawn at t = 0, so one Euler step gives the same draw as any other count
    res = sample(model, cfg.n_eval, 1, _gen(seed, _EVAL), cfg.routing)
    counts = torch.bincount(res.expert.reshape(-1), minlength=model.n_experts).float()
    return (
        out,
        (counts / res.expert.numel()).tolist(),
        gate_mutual_information(res.gate_probs[:, 0]),
    )


def data_floor(
    dataset: str, heldout: Tensor, cfg: ExperimentConfig, seed: int
) -> dict[int, list[float]]:
    """MMD^2 of fresh true samples to the held-out set: the metric's noise floor at n_eval."""
    vals = [
        mmd2(make_dataset(dataset, cfg.n_eval, seed * 1_000_003 + _FLOOR + s), heldout).item()
        for s in range(cfg.eval_seeds)
    ]
    return {e: vals for e in cfg.euler_steps}


@dataclass
class Experiment:
    """Results plus what the figure needs."""

    cfg: ExperimentConfig
    results: list[RunResult]
    floors: dict[str, dict[int, list[float]]]
    models: dict[tuple[str, int, float | None], ToyMoEField]
    heldout: dict[str, Tensor]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, restoring the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_experiment(cfg: ExperimentConfig, log: Log | None = None) -> Experiment:
    """Train every (dataset, K, sigma) of `cfg` and measure it."""
    with torch_threads(cfg.threads):
        return _run_experiment(cfg, log)


def _run_experiment(cfg: ExperimentConfig, log: Log | None) -> Experiment:
    results: list[RunResult] = []
    floors: dict[str, dict[int, list[float]]] = {}
    models: dict[tuple[str, int, float | None], ToyMoEField] = {}
    heldouts: dict[str, Tensor] = {}
    seed = cfg.seed
    for ds in cfg.datasets:
        train = make_dataset(ds, cfg.n_train, seed * 1_000_003 + _TRAIN_DATA)
        heldout = make_dataset(ds, cfg.n_eval, seed * 1_000_003 + _HELDOUT)
        heldouts[ds] = heldout
        floors[ds] = data_floor(ds, heldout, cfg, seed)
        for k in cfg.experts:
            for sigma in cfg.sigmas if k > 1 else cfg.sigmas[:1]:
                if log is not None:
                    sig = f"sigma={sigma:g}" if k > 1 else "vanilla FM"
                    log(f"[{ds}] training K={k} ({sig}), {cfg.schedule.steps} steps")
                t0 = time.perf_counter()
                # same init / data stream seed for every K: differences come from K, not luck
                model, loss = train_field(train, k, sigma, cfg, seed, log)
                secs = time.perf_counter() - t0
                mmd, usage, gate_mi = evaluate(model, heldout, cfg, seed)
                key_sigma = sigma if k > 1 else None
                models[(ds, k, key_sigma)] = model
                results.append(
                    RunResult(
                        dataset=ds,
                        n_experts=k,
                        sigma=key_sigma,
                        n_params=sum(p.numel() for p in model.parameters()),
                        train_seconds=secs,
                        final_loss=loss,
                        mmd=mmd,
                        usage=usage,
                        gate_mi=gate_mi,
                    )
                )
                if log is not None:
                    m4 = mmd.get(4, next(iter(mmd.values())))
                    log(f"    done in {secs:.1f}s; MMD^2 @4 Euler steps {_fmt(m4)} (x1e-3)")
    return Experiment(cfg, results, floors, models, heldouts)


# -------------------------------------------------------------------------------- reporting


def _fmt(vals: Sequence[float]) -> str:
    """mean +- std of MMD^2 values, in units of 1e-3."""
    t = torch.tensor(vals, dtype=torch.float64) * 1e3
    std = t.std().item() if len(vals) > 1 else 0.0
    return f"{t.mean().item():6.2f} ± {std:4.2f}"


def format_table(exp: Experiment) -> str:
    """Markdown table: one row per trained model (plus the data floor), one column per E."""
    es = exp.cfg.euler_steps
    head = ["dataset", "K", "sigma", "params", *[f"E={e} (T={e + 1})" for e in es]]
    rows = [head, ["---"] * len(head)]
    for ds in exp.cfg.datasets:
        rows.append([ds, "data", "-", "-", *[_fmt(exp.floors[ds][e]) for e in es]])
        for r in exp.results:
            if r.dataset != ds:
                continue
            sig = "-" if r.sigma is None else f"{r.sigma:g}"
            rows.append([ds, str(r.n_experts), sig, str(r.n_params), *[_fmt(r.mmd[e]) for e in es]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    )


def plot(exp: Experiment, out: Path, euler_steps: int = 4, n_traj: int = 40) -> None:
    """Fig. 2-style picture: per dataset, target | vanilla FM | MoE-FM (largest K, first sigma),
    samples at `euler_steps` Euler steps plus a few trajectories (MoE colored by frozen expert)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = exp.cfg
    k_moe = max(cfg.experts)
    sigma = cfg.sigmas[0]
    fig, axes = plt.subplots(
        len(cfg.datasets), 3, figsize=(12, 4 * len(cfg.datasets)), squeeze=False
    )
    cmap = plt.get_cmap("tab10")
    for row, ds in enumerate(cfg.datasets):
        lim = 4.2 if ds == "grid" else 3.2
        ax = axes[row, 0]
        tgt = exp.heldout[ds]
        ax.scatter(tgt[:, 0], tgt[:, 1], s=2, c="k", alpha=0.5)
        ax.set_title(f"{ds}: target (held-out)")
        panels = [(1, None, "vanilla FM (K=1)"), (k_moe, sigma, f"MoE-FM (K={k_moe})")]
        for col, (k, sig, name) in enumerate(panels, start=1):
            ax = axes[row, col]
            model = exp.models.get((ds, k, sig))
            if model is None:
                ax.set_axis_off()
                continue
            res = sample(model, cfg.n_eval, euler_steps, _gen(cfg.seed, _EVAL), cfg.routing, True)
            z = res.z[:, 0]
            traj = torch.stack(res.trajectory)[:, :n_traj, 0]  # [T, n_traj, 2]
            colors = [cmap(int(e) % 10) for e in res.expert[:, 0]] if k > 1 else "tab:blue"
            ax.scatter(z[:, 0], z[:, 1], s=2, c=colors, alpha=0.5)
            for j in range(traj.shape[1]):
                c = cmap(int(res.expert[j, 0]) % 10) if k > 1 else "tab:red"
                ax.plot(traj[:, j, 0], traj[:, j, 1], "-", c=c, lw=0.8, alpha=0.9)
                ax.plot(traj[0, j, 0], traj[0, j, 1], "o", c=c, ms=2)
            r = next(x for x in exp.results if (x.dataset, x.n_experts, x.sigma) == (ds, k, sig))
            mmd_txt = (
                f"MMD² = ({_fmt(r.mmd[euler_steps]).strip()})·1e-3" if euler_steps in r.mmd else ""
            )
            ax.set_title(f"{name}, {euler_steps} Euler steps\n{mmd_txt}")
        for ax in axes[row]:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
    fig.suptitle(
        "Trajectory-level frozen routing: MoE experts colored by the expert drawn at t=0",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI


def _parse(argv: Sequence[str] | None) -> tuple[ExperimentConfig, Path | None]:
    d = ExperimentConfig()
    p = argparse.ArgumentParser(
        prog="python -m yan_serve.experiments.moe_fm_2d",
        description="Vanilla FM (K=1) vs MoE-FM on 2-D toy data; MMD^2 to held-out samples.",
    )
    p.add_argument("--out", type=Path, default=None, help="PNG path for the figure")
    p.add_argument("--steps", type=int, default=d.schedule.steps, help="training steps per model")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--datasets", nargs="+", default=list(d.datasets), choices=sorted(DATASETS))
    p.add_argument("--experts", nargs="+", type=int, default=list(d.experts), help="K values")
    p.add_argument("--sigmas", nargs="+", type=float, default=list(d.sigmas))
    p.add_argument("--euler-steps", nargs="+", type=int, default=list(d.euler_steps))
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds)
    p.add_argument("--batch-size", type=int, default=d.schedule.batch_size)
    p.add_argument("--lr", type=float, default=d.schedule.lr)
    p.add_argument("--hidden", type=int, default=d.hidden, help="trunk width")
    p.add_argument("--expert-hidden", type=int, default=d.expert_hidden, help="expert FFN width")
    p.add_argument("--routing", choices=["sample", "argmax"], default=d.routing)
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    a = p.parse_args(argv)
    cfg = ExperimentConfig(
        datasets=tuple(a.datasets),
        experts=tuple(a.experts),
        sigmas=tuple(a.sigmas),
        schedule=replace(d.schedule, steps=a.steps, batch_size=a.batch_size, lr=a.lr),
        hidden=a.hidden,
        expert_hidden=a.expert_hidden,
        seed=a.seed,
        euler_steps=tuple(a.euler_steps),
        eval_seeds=a.eval_seeds,
        routing=a.routing,
        threads=a.threads,
    )
    return cfg, a.out


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out = _parse(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    exp = run_experiment(cfg, log)
    print(
        f"\nMMD^2 to {cfg.n_eval} held-out samples (x1e-3, mean ± std over {cfg.eval_seeds} "
        f"sampling seeds); E = Euler steps, T = E + 1 solver time points; routing={cfg.routing}; "
        f"train steps={cfg.schedule.steps}, seed={cfg.seed}\n"
    )
    print(format_table(exp))
    print("\nrouting at t=0: I(z_0; expert) in nats (log K = z_0 decides) | fraction per expert")
    for r in exp.results:
        if r.n_experts > 1:
            print(
                f"  {r.dataset:5s} K={r.n_experts:<2d} sigma={r.sigma:<4g} "
                f"I={r.gate_mi:.3f} (log K={math.log(r.n_experts):.2f}) | "
                + " ".join(f"{u:.2f}" for u in r.usage)
            )
    if out is not None:
        with torch_threads(cfg.threads):
            plot(exp, out)
        print(f"\nfigure: {out}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
