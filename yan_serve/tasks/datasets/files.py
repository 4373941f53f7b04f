"""Reading the datasets' public files: split names, the file(s) a path and split name, CSV and
JSON-lines rows, and the `ValueError`s that name the file, the line and the problem."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")
PathLike = str | Path

SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid"}
# File names (or glob patterns) per canonical split, for a directory `path`.
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "valid": ("valid", "validation", "dev", "val"),
    "test": ("test",),
}

# The public CSVs hold long fields (NarrativeQA summaries, DBpedia abstracts).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def normalize_split(split: str) -> str:
    """Map a split name to `train`, `valid` or `test` (`validation`, `dev`, `val` -> `valid`)."""
    name = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
    if name not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of train, valid (dev), test")
    return name


def split_filter(split: str | None) -> str | None:
    return None if split is None else normalize_split(split)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


def take(records: Iterable[R], limit: int | None) -> list[R]:
    check_limit(limit)
    return list(islice(records, limit))


def bad_line(path: Path, line: int | str, problem: str) -> ValueError:
    """The error for a malformed entry: `{path}: line {line}: {problem}`; a string `line` names
    a JSON entry instead (`data[0].paragraphs[1]`)."""
    where = line if isinstance(line, str) else f"line {line}"
    return ValueError(f"{path}: {where}: {problem}")


def require_file(path: PathLike, what: str = "file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p}: expected a {what}, found a directory")
    return p


def resolve_files(
    path: PathLike,
    split: str | None,
    exts: tuple[str, ...],
    patterns: dict[str, tuple[str, ...]] | None = None,
) -> list[Path]:
    """The file(s) to read: `path` itself, or the file(s) for `split` in directory `path`.

    `patterns[split]` lists glob patterns tried in order before the generic `{split}.{ext}`
    names; the first pattern that matches anything wins (all its matches, sorted).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path not found: {p}")
    if p.is_file():
        return [p]
    if split is None:
        raise ValueError(f"{p} is a directory: pass split=... to pick a file, or the file itself")
    canon = normalize_split(split)
    tried = list((patterns or {}).get(canon, ()))
    tried += [f"{name}.{ext}" for name in SPLIT_NAMES[canon] for ext in exts]
    for pattern in tried:
        found = sorted(f for f in p.glob(pattern) if f.is_file())
        if found:
            return found
    raise FileNotFoundError(f"no {canon} file in {p}: looked for {', '.join(tried)}")


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn decoding and CSV-syntax errors raised while reading `path` into a short ValueError."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV: {e}") from None


def clean(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV file."""
    with reading(path), path.open(encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise ValueError(f"{path}: empty file (expected a CSV header)")
    return header


def csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for a CSV with a header; checks `required` columns exist."""
    header = csv_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} in header {', '.join(header)}"
        )
    with reading(path), path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or any(row[c] is None for c in required):
                fields = f"expected {len(header)} fields ({', '.join(header)})"
                raise bad_line(path, reader.line_num, fields)
            yield reader.line_num, row


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    with reading(path), path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad_line(path, lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                kind = type(obj).__name__
                raise bad_line(path, lineno, f"expected a JSON object, got {kind}")
            yield lineno, obj


def field(path: Path, lineno: int, obj: dict[str, Any], names: tuple[str, ...]) -> str:
    """The first of `names` present in `obj`, as a string."""
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str):
                kind = type(value).__name__
                raise bad_line(path, lineno, f"field {name!r} is {kind}, expected a string")
            return value
    wanted = " or ".join(repr(n) for n in names)
    raise bad_line(path, lineno, f"no {wanted} field (keys: {', '.join(obj)})")


def numbered_lines(lines: Iterable[str], first: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, line without its line break) for each non-blank line of an open text file,
    numbered from `first`."""
    for lineno, raw in enumerate(lines, start=first):
        line = raw.rstrip("\r\n")
        if line.strip():
            yield lineno, line
