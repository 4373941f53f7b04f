"""`yan` command line. Subcommands: `params` (more land with the training issue).

Errors a user can cause (unknown preset, bad config file) end in one readable line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from yan_serve.config import YANConfig, preset_names
from yan_serve.model import YAN


def _load_config(spec: str) -> YANConfig:
    """A preset name, or a path to a config.json (or its directory)."""
    if spec in preset_names():
        return YANConfig.from_name(spec)
    if spec.endswith(".json") or "/" in spec:
        return YANConfig.load(spec)
    return YANConfig.from_name(spec)  # raises with the list of presets


def cmd_params(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    with torch.device("meta"):  # count without allocating 200M parameters
        model = YAN(cfg)
    total = model.num_parameters()
    print(f"{cfg.name}: d_model={cfg.d_model} vocab={cfg.vocab_size} experts={cfg.moe_n_experts}")
    width = max(len(k) for k in model.parameter_breakdown())
    for name, n in model.parameter_breakdown().items():
        print(f"  {name:<{width}}  {n / 1e6:9.3f}M  {100 * n / total:5.1f}%")
    print(f"  {'total':<{width}}  {total / 1e6:9.3f}M")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yan", description="YAN model tools")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("params", help="print a config's parameter count by component")
    sp.add_argument("config", help=f"preset ({', '.join(preset_names())}) or config.json path")
    sp.set_defaults(func=cmd_params)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"yan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
