"""Probability path of YAN's latent flow: the linear (rectified-flow) interpolant."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PathSample:
    t: Tensor  # [B]
    x_t: Tensor  # [B, ...]
    dx_t: Tensor  # [B, ...] target velocity u* = x_1 - x_0


@dataclass
class LinearPath:
    """z_t = (1 - t) z_0 + t z_1, u* = z_1 - z_0, with t ~ Beta(a, b) per sequence."""

    beta_a: float = 1.0
    beta_b: float = 1.0

    def sample_t(
        self,
        batch: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw one time per sequence: [batch] in [0, 1]."""
        if self.beta_a == 1.0 and self.beta_b == 1.0:
            gdev = generator.device if generator is not None else device
            return torch.rand(batch, generator=generator, device=gdev).to(device)
        beta = torch.distributions.Beta(torch.tensor(self.beta_a), torch.tensor(self.beta_b))
        if generator is None:
            return beta.sample((batch,)).to(device)
        # torch.distributions takes no generator: seed a forked global stream from it instead
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return beta.sample((batch,)).to(device)

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """x_0, x_1: [B, ...], t: [B] -> PathSample."""
        tt = t.view(-1, *([1] * (x_0.dim() - 1))).to(x_0.dtype)
        return PathSample(t=t, x_t=(1 - tt) * x_0 + tt * x_1, dx_t=x_1 - x_0)
