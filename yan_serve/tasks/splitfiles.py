"""Writing a corpus directory's split files so that a failure loses nothing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

SPLITS = ("train", "val", "test")


@contextmanager
def split_writers(out: Path, splits: Sequence[str] = SPLITS) -> Iterator[dict[str, TextIO]]:
    """One open file per split (UTF-8), written as `.SPLIT.jsonl.part` in `out`. When the block
    ends cleanly each replaces `SPLIT.jsonl`; when it raises they are removed, and `out` too if
    this made it, so a build or import that fails leaves `out` as it was."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    parts = {s: out / f".{s}.jsonl.part" for s in splits}
    files: dict[str, TextIO] = {}
    try:
        for s, p in parts.items():
            files[s] = p.open("w", encoding="utf-8")
        yield files
    except BaseException:
        for f in files.values():
            f.close()
        for p in parts.values():
            p.unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise
    for f in files.values():
        f.close()
    for s, p in parts.items():
        p.replace(out / f"{s}.jsonl")
