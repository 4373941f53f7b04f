"""Flow matching pieces, each swappable: probability path, losses, frozen-routing Euler solver."""

from yan_serve.flow.path import LinearPath, PathSample
from yan_serve.flow.solver import FrozenRoutingEuler, MoEVectorField, SolveResult, time_grid

__all__ = [
    "FrozenRoutingEuler",
    "LinearPath",
    "MoEVectorField",
    "PathSample",
    "SolveResult",
    "time_grid",
]
