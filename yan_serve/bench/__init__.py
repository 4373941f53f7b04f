"""Benchmarks, apart from the tests: `python -m yan_serve.bench <command> [--device DEVICE]`.

One module per command (kernels, sampler, scan, versus, train), each registering its parser
through an `add_<name>(subparsers)` function listed in `COMMANDS`; `yan_serve.bench.common` holds
the timers, the run header, the device and flag handling and the test models they share.

`--device auto` (the default) takes CUDA when present, else the CPU; `--device cuda` without
CUDA (or without triton) prints one line and exits with status 2, as does a size or count that
is not a positive integer or a --json path whose folder does not exist (checked before anything
runs); a measurement that raises is reported in its table and the command exits 1. CPU timings
are wall-clock medians (`time.perf_counter`) after one warm-up call, stopping early (after at
least one timed call) once a measurement's timed calls pass `CPU_BUDGET_S` seconds.
"""

from __future__ import annotations

import argparse

from yan_serve.bench import kernels, sampler, scan, train, versus

SUITES = (kernels, sampler, scan, versus, train)
COMMANDS = [
    kernels.add_kernels,
    sampler.add_sampler,
    scan.add_scan,
    versus.add_versus,
    train.add_train,
]


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser (`main` parses with it; tests check flags against it)."""
    parser = argparse.ArgumentParser(
        prog="python -m yan_serve.bench",
        description="\n\n".join(
            doc.strip() for doc in (__doc__, *(m.__doc__ for m in SUITES)) if doc
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
