"""The question-answering datasets: NarrativeQA (and its summaries as text), SQuAD, bAbI."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from yan_serve.tasks.datasets.files import (
    SPLIT_NAMES,
    SPLITS,
    PathLike,
    bad_line,
    csv_rows,
    numbered_lines,
    reading,
    require_file,
    resolve_files,
    split_filter,
    take,
)
from yan_serve.tasks.records import QARecord, TextRecord

# --------------------------------------------------------------------------- NarrativeQA


def _narrativeqa_files(path: PathLike) -> tuple[Path, Path]:
    """(qaps.csv, summaries.csv) under a NarrativeQA checkout (or a folder holding both)."""
    root = Path(path).expanduser()
    if root.is_file():
        root = root.parent
    if not root.exists():
        raise FileNotFoundError(f"NarrativeQA directory not found: {root}")
    qaps = root / "qaps.csv"
    candidates = [root / "summaries.csv", root / "third_party" / "wikipedia" / "summaries.csv"]
    summaries = next((c for c in candidates if c.is_file()), None)
    if not qaps.is_file():
        raise FileNotFoundError(f"NarrativeQA qaps.csv not found in {root}")
    if summaries is None:
        raise FileNotFoundError(
            f"NarrativeQA summaries.csv not found: looked for {', '.join(map(str, candidates))}"
        )
    return qaps, summaries


def _narrativeqa_summaries(
    path: Path, split: str | None
) -> Iterator[tuple[str, str, str]]:  # (document_id, set, summary)
    for lineno, row in csv_rows(path, ("document_id", "set", "summary")):
        doc_id, part = row["document_id"].strip(), row["set"].strip()
        if not doc_id:
            raise bad_line(path, lineno, "empty document_id")
        if split is None or part == split:
            yield doc_id, part, row["summary"].strip()


def _distinct(values: Iterator[str]) -> list[str]:
    """The non-empty values, stripped, repeats dropped, in order."""
    kept: list[str] = []
    for v in values:
        v = v.strip()
        if v and v not in kept:
            kept.append(v)
    return kept


def load_narrativeqa(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[QARecord]:
    """NarrativeQA question/answer pairs over the story summaries.

    `path`: the directory of the public release, holding `qaps.csv` (columns document_id, set,
    question, answer1, answer2, ...) and `summaries.csv` (document_id, set, summary, ...), the
    latter either beside it or under `third_party/wikipedia/`. Rows are joined on document_id;
    `split` filters the `set` column (train, valid, test). Record: context = the summary,
    answers = [answer1, answer2] (empty and repeated ones dropped), id = "{document_id}-{k}" with
    k the question's index within its document.
    """
    qaps, summaries_csv = _narrativeqa_files(path)
    want = split_filter(split)
    summaries = {doc: text for doc, _, text in _narrativeqa_summaries(summaries_csv, want)}

    def records() -> Iterator[QARecord]:
        per_doc: dict[str, int] = {}
        columns = ("document_id", "set", "question", "answer1", "answer2")
        for lineno, row in csv_rows(qaps, columns):
            doc_id = row["document_id"].strip()
            if want is not None and row["set"].strip() != want:
                continue
            if doc_id not in summaries:
                missing = f"document_id {doc_id} has no summary in {summaries_csv}"
                raise bad_line(qaps, lineno, missing)
            answers = _distinct(row[col] for col in ("answer1", "answer2"))
            if not answers:
                raise bad_line(qaps, lineno, "both answers are empty")
            k = per_doc.get(doc_id, 0)
            per_doc[doc_id] = k + 1
            yield QARecord(
                context=summaries[doc_id],
                question=row["question"].strip(),
                answers=answers,
                id=f"{doc_id}-{k}",
            )

    return take(records(), limit)


def load_narrativeqa_summaries(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[TextRecord]:
    """NarrativeQA summaries as plain text (the paper infills them).

    `path`: the NarrativeQA directory (see `load_narrativeqa`) or `summaries.csv` itself
    (columns document_id, set, summary, ...); `split` filters the `set` column. Record: text =
    summary, id = document_id, meta = {"set": set}.
    """
    p = Path(path).expanduser()
    csv_path = require_file(p, "summaries.csv") if p.is_file() else _narrativeqa_files(p)[1]
    rows = _narrativeqa_summaries(csv_path, split_filter(split))
    return take((TextRecord(text=t, id=d, meta={"set": s}) for d, s, t in rows), limit)


# --------------------------------------------------------------------------- SQuAD


def load_squad(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[QARecord]:
    """SQuAD v1.1 questions.

    `path`: the official JSON (`train-v1.1.json`, `dev-v1.1.json`, or a directory holding them):
    {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text", "answer_start"}, ...]}]}]}]}. Record: context, question, answers = the
    answer texts in file order with repeats dropped (the dev set lists up to three), id = the
    question id. Questions without answers (SQuAD 2.0 unanswerables) are skipped.
    """
    patterns = {"train": ("train-v1.1.json",), "valid": ("dev-v1.1.json",)}
    p = resolve_files(path, split, ("json",), patterns)[0]
    with reading(p), p.open(encoding="utf-8-sig") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{p}: bad JSON: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{p}: expected a JSON object with a 'data' list (SQuAD format)")

    def get(obj: Any, key: str, kind: type, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise bad_line(p, where, f"missing {key!r}")
        if not isinstance(obj[key], kind):
            raise bad_line(p, where, f"{key!r} should be a {kind.__name__}")
        return obj[key]

    def records() -> Iterator[QARecord]:
        for i, article in enumerate(doc["data"]):
            for j, para in enumerate(get(article, "paragraphs", list, f"data[{i}]")):
                where = f"data[{i}].paragraphs[{j}]"
                context = get(para, "context", str, where)
                for k, qa in enumerate(get(para, "qas", list, where)):
                    qwhere = f"{where}.qas[{k}]"
                    question = get(qa, "question", str, qwhere)
                    listed = get(qa, "answers", list, qwhere)
                    answers = _distinct(
                        get(a, "text", str, f"{qwhere}.answers[{m}]") for m, a in enumerate(listed)
                    )
                    if answers:
                        qid = str(get(qa, "id", object, qwhere))
                        yield QARecord(context, question.strip(), answers, qid)

    return take(records(), limit)


# --------------------------------------------------------------------------- bAbI

_BABI_LINE = re.compile(r"^(\d+) (.*)$")


def _babi_lines(p: Path) -> Iterator[tuple[int, int, str]]:
    """(line number, bAbI line number N, body) for each non-blank line of a bAbI file."""
    with reading(p), p.open(encoding="utf-8") as f:
        for lineno, line in numbered_lines(f):
            m = _BABI_LINE.match(line)
            if m is None:
                raise bad_line(p, lineno, "expected 'N text' (a line number, a space, then "
                               f"text), got {line[:60]!r}")  # fmt: skip
            yield lineno, int(m.group(1)), m.group(2)


def load_babi(path: PathLike, split: str | None = None, limit: int | None = None) -> list[QARecord]:
    """bAbI (Weston et al.) stories and questions.

    `path`: a task file such as `qa2_two-supporting-facts_train.txt`, or a directory, where
    `split` selects every `*_{split}.txt` in it (read in name order). Lines are `N statement` or
    `N question?<TAB>answer<TAB>supporting ids`; N == 1 starts a new story. Record: context =
    the story's statements so far (numbers removed) joined by spaces, question, answers =
    [answer] (kept verbatim, e.g. "apple,football"), id = "{file stem}:{story}:{N}" with story
    counted from 0 within the file.
    """
    patterns = {s: tuple(f"*_{n}.txt" for n in SPLIT_NAMES[s]) for s in SPLITS}
    files = resolve_files(path, split, ("txt",), patterns)

    def records() -> Iterator[QARecord]:
        for p in files:
            story: list[str] = []
            story_idx = -1
            for lineno, num, body in _babi_lines(p):
                if num == 1:
                    story, story_idx = [], story_idx + 1
                elif story_idx < 0:
                    raise bad_line(p, lineno, f"first story starts at {num}, not 1")
                if "\t" not in body:
                    story.append(body.strip())
                    continue
                parts = body.split("\t")
                if len(parts) < 2 or not parts[1].strip():
                    needs = "question line needs 'N question<TAB>answer<TAB>supporting ids'"
                    raise bad_line(p, lineno, needs)
                support = parts[2].split() if len(parts) > 2 else []
                if not all(s.isdigit() for s in support):
                    raise bad_line(p, lineno, f"supporting ids must be numbers, got {parts[2]!r}")
                yield QARecord(
                    context=" ".join(story),
                    question=parts[0].strip(),
                    answers=[parts[1].strip()],
                    id=f"{p.stem}:{story_idx}:{num}",
                )

    return take(records(), limit)
