"""Fixed-step Euler solver with trajectory-level frozen routing.

The solver knows nothing about Transformers: it drives any `MoEVectorField` (YAN's `FlowNet`,
the 2-D toy field). Randomness comes in from the caller (`uniforms` for expert draws), so a
solve is a deterministic function of its inputs and per-request generators stay with the
caller, which makes results independent of batch composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

Routing = Literal["sample", "argmax"]


class MoEVectorField(Protocol):
    """A mixture of K expert vector fields sharing one trunk evaluation per (z, t)."""

    @property
    def n_experts(self) -> int: ...

    def trunk(self, z: Tensor, t: Tensor, cond: Any) -> Any:
        """One trunk evaluation at z [B, L, d], t [B]; the returned state feeds the rest."""

    def gate_logits(self, state: Any) -> Tensor:
        """[B, L, K] routing logits (temperature applied)."""

    def expert_fields(self, state: Any) -> Tensor:
        """Every expert's field: [B, L, K, d]."""

    def routed_field(self, state: Any, expert: Tensor) -> Tensor:
        """The field of expert[b, l] at each token: [B, L, d]."""


@dataclass
class SolveResult:
    z: Tensor  # [B, L, d] the state at t = 1
    expert: Tensor  # [B, L] the frozen per-token expert
    gate_probs: Tensor  # [B, L, K] pi(z_0, 0)
    trajectory: list[Tensor] = field(default_factory=list)  # T states z(t_0..t_{T-1}) if asked


def time_grid(
    steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """`steps` time points linspace(0, 1, steps): T points, T - 1 Euler steps."""
    if steps < 1:
        raise ValueError(f"steps counts time points and must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps, device=device, dtype=dtype)


def select_experts(probs: Tensor, routing: Routing, uniforms: Tensor | None = None) -> Tensor:
    """Pick one expert per token from probs [B, L, K] -> [B, L] long.

    "sample" draws by inverse CDF from `uniforms` [B, L] in [0, 1); "argmax" takes the mode.
    """
    if routing == "argmax":
        return probs.argmax(-1)
    if routing != "sample":
        raise ValueError(f"routing must be 'sample' or 'argmax', got {routing!r}")
    if uniforms is None:
        raise ValueError("routing='sample' needs uniforms [B, L]")
    cdf = probs.float().cumsum(-1)[..., :-1]  # [B, L, K-1]
    idx = (uniforms[..., None].to(cdf) >= cdf).sum(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


class FrozenRoutingEuler:
    """Euler on t = linspace(0, 1, T) with each token's expert drawn once at (z_0, t = 0).

    The t = 0 trunk pass gives both the gate and every expert's field at z_0, so the first Euler
    step reuses it: T - 1 trunk evaluations in all (the reference implementation spends T).
    """

    def solve(
        self,
        field: MoEVectorField,
        z0: Tensor,  # [B, L, d]
        cond: Any,
        steps: int,
        routing: Routing = "sample",
        uniforms: Tensor | None = None,  # [B, L]
        return_trajectory: bool = False,
        step_hook: Any = None,
    ) -> SolveResult:
        """Integrate from z0 to t = 1. Differentiable: call under no_grad for inference.
        `step_hook(i, z)`, if given, is called with the state at time point i = 0..T-1."""
        B = z0.shape[0]
        ts = time_grid(steps, z0.device, z0.dtype)
        z = z0
        state = field.trunk(z, ts[0].expand(B), cond)
        probs = torch.softmax(field.gate_logits(state).float(), dim=-1)
        expert = select_experts(probs, routing, uniforms)
        traj = [z] if return_trajectory else []
        if step_hook is not None:
            step_hook(0, z)
        for i in range(steps - 1):
            if i > 0:
                state = field.trunk(z, ts[i].expand(B), cond)
            z = z + (ts[i + 1] - ts[i]) * field.routed_field(state, expert)
            if return_trajectory:
                traj.append(z)
            if step_hook is not None:
                step_hook(i + 1, z)
        return SolveResult(z=z, expert=expert, gate_probs=probs, trajectory=traj)

    def solve_naive(
        self,
        field: MoEVectorField,
        z0: Tensor,
        cond: Any,
        steps: int,
        routing: Routing = "sample",
        uniforms: Tensor | None = None,
    ) -> SolveResult:
        """The reference's schedule: a gate pass at t = 0, then a fresh trunk pass for every step
        (T passes in all), reading the routed expert out of all K fields. Oracle for `solve`."""
        B = z0.shape[0]
        ts = time_grid(steps, z0.device, z0.dtype)
        probs = torch.softmax(field.gate_logits(field.trunk(z0, ts[0].expand(B), cond)).float(), -1)
        expert = select_experts(probs, routing, uniforms)
        z = z0
        for i in range(steps - 1):
            fields = field.expert_fields(field.trunk(z, ts[i].expand(B), cond))  # [B, L, K, d]
            u = fields.gather(2, expert[..., None, None].expand(-1, -1, 1, fields.shape[-1]))
            z = z + (ts[i + 1] - ts[i]) * u.squeeze(2)
        return SolveResult(z=z, expert=expert, gate_probs=probs)
