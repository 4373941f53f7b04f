"""The one device resolver: what `--device` means everywhere (server, trainer, bench, CLI)."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` is the first CUDA device when torch sees one, else the CPU. Anything else is taken
    as given (`cpu`, `cuda`, `cuda:1`), except that asking for CUDA on a machine without it is a
    `ValueError` naming the flag, raised here rather than at the first kernel launch."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device {spec}: not a device torch knows ({e})") from None
