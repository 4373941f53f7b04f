"""argparse `type=` checkers shared by the command lines (`yan`, `yan-serve bench`, the scripts,
the load test): a bad value is refused when parsed, with one line naming it, before any work;
and the one-line error exit the scripts share."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= low."""

    def parse(text: str) -> int:
        try:
            v: int | None = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


positive_int = int_at_least(1)
count_int = int_at_least(0)  # zero allowed (a flag whose 0 means "none" or "the default")


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers, each >= 1 ("1,2,3")."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (e.g. 1,2,3), got {text!r}"
        )
    return vals


def task_mixture(text: str) -> tuple[str, ...]:
    """A training task mixture: comma-separated task names, each optionally NAME:W with an
    integer weight W >= 1 (its share of the batches), as the names repeated W times:
    "infill,qa:3" -> ("infill", "qa", "qa", "qa")."""
    out: list[str] = []
    for item in text.split(","):
        name, colon, w = item.strip().partition(":")
        try:
            weight = int(w) if colon else 1
        except ValueError:
            weight = 0
        if not name or weight < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated tasks, each NAME or NAME:WEIGHT with WEIGHT >= 1 "
                f"(e.g. infill,qa:3), got {text!r}"
            )
        out += [name] * weight
    return tuple(out)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def share(text: str) -> float:
    """A number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def output_file(text: str) -> str:
    """A file to write: its folder exists (checked before a run, not after minutes of work)
    and it is not itself a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no directory {str(path.parent)!r} to write {text!r} in")
    return text


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def fail(prog: str, msg: str) -> int:
    """One line `PROG: error: MSG` on stderr; exit status 2 (a bad argument or input, as
    argparse's)."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2
