"""The plain-text datasets: ROCStories, SimpleStories, and generic text and JSON-lines files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from yan_serve.tasks.datasets.files import (
    PathLike,
    bad_line,
    csv_header,
    csv_rows,
    field,
    jsonl_objects,
    reading,
    resolve_files,
    take,
)
from yan_serve.tasks.records import TextRecord

_CLOZE_ENDINGS = ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding")


def _story_cloze(p: Path) -> Iterator[TextRecord]:
    """A Story Cloze val/test CSV: four sentences and the right one of two endings."""
    cols = ("InputStoryid", *[f"InputSentence{i}" for i in range(1, 5)], *_CLOZE_ENDINGS)
    for lineno, row in csv_rows(p, cols):
        right = row["AnswerRightEnding"].strip()
        if right not in ("1", "2"):
            raise bad_line(p, lineno, f"AnswerRightEnding must be 1 or 2, got {right!r}")
        sents = [row[f"InputSentence{i}"] for i in range(1, 5)]
        sents.append(row[f"RandomFifthSentenceQuiz{right}"])
        text = " ".join(s.strip() for s in sents if s.strip())
        yield TextRecord(text=text, id=row["InputStoryid"].strip())


def _rocstories(p: Path) -> Iterator[TextRecord]:
    cols = ("storyid", *[f"sentence{i}" for i in range(1, 6)])
    for _, row in csv_rows(p, cols):
        sents = [row[f"sentence{i}"].strip() for i in range(1, 6)]
        meta = {"title": row["storytitle"].strip()} if row.get("storytitle") else {}
        yield TextRecord(text=" ".join(s for s in sents if s), id=row["storyid"].strip(), meta=meta)


def load_rocstories(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[TextRecord]:
    """ROCStories five-sentence stories.

    `path`: a ROCStories CSV with header storyid, storytitle, sentence1 .. sentence5 (the
    training release). The Story Cloze val/test CSVs (InputStoryid, InputSentence1..4,
    RandomFifthSentenceQuiz1/2, AnswerRightEnding) are read too, with the right ending as the
    fifth sentence. Record: text = the five sentences joined by spaces, id = storyid,
    meta = {"title": storytitle} (when present).
    """
    p = resolve_files(path, split, ("csv",))[0]

    def records() -> Iterator[TextRecord]:
        cloze = "InputStoryid" in csv_header(p)
        yield from (_story_cloze if cloze else _rocstories)(p)

    return take(records(), limit)


def _jsonl_texts(
    path: PathLike,
    split: str | None,
    limit: int | None,
    exts: tuple[str, ...],
    text_fields: tuple[str, ...],
    id_field: str | None,
) -> list[TextRecord]:
    """One record per object of a JSON-lines file: the first of `text_fields` (ends stripped),
    id = the `id_field` value if present and not null, else the line number."""
    p = resolve_files(path, split, exts)[0]

    def record(lineno: int, obj: dict[str, Any]) -> TextRecord:
        text = field(p, lineno, obj, text_fields).strip()
        has_id = id_field and obj.get(id_field) is not None
        return TextRecord(text=text, id=str(obj[id_field]) if has_id else str(lineno))

    return take((record(n, obj) for n, obj in jsonl_objects(p)), limit)


def load_simplestories(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[TextRecord]:
    """SimpleStories as JSON lines.

    `path`: a JSONL file, one object per line with the story under `story` (or `text`); blank
    lines are skipped. Record: text = the story (ends stripped, inner layout kept), id = the
    object's `id` if any, else "{line number}".
    """
    return _jsonl_texts(path, split, limit, ("jsonl", "json"), ("story", "text"), "id")


def load_text(
    path: PathLike, split: str | None = None, limit: int | None = None, per_line: bool = False
) -> list[TextRecord]:
    """Plain UTF-8 text.

    `path`: a text file (or a directory holding `{split}.txt`). By default one record per
    paragraph (blocks separated by blank lines, their lines joined by single spaces); with
    `per_line=True` one record per non-blank line. Record: text, id = the 1-based line number
    where it starts.
    """
    p = resolve_files(path, split, ("txt",))[0]

    def records() -> Iterator[TextRecord]:
        block: list[str] = []
        start = 0
        with reading(p), p.open(encoding="utf-8-sig") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if per_line:
                    if line:
                        yield TextRecord(text=line, id=str(lineno))
                    continue
                if line:
                    if not block:
                        start = lineno
                    block.append(line)
                elif block:
                    yield TextRecord(text=" ".join(block), id=str(start))
                    block = []
        if block:
            yield TextRecord(text=" ".join(block), id=str(start))

    return take(records(), limit)


def load_jsonl(
    path: PathLike,
    split: str | None = None,
    limit: int | None = None,
    text_field: str = "text",
    id_field: str | None = "id",
) -> list[TextRecord]:
    """JSON lines with the text under `text_field`.

    `path`: a JSONL file (or a directory holding `{split}.jsonl`), one object per line; blank
    lines are skipped. Record: text (ends stripped), id = the `id_field` value if present, else
    the line number.
    """
    return _jsonl_texts(path, split, limit, ("jsonl",), (text_field,), id_field)
