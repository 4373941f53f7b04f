"""Loaders for the paper's datasets, read from local files in their public formats.

Nothing here downloads: every loader takes a path to files you already have. Each returns a list
of records (`TextRecord`, `QARecord` or `ClassRecord`) and reports a malformed file as a
`ValueError` (a missing one as `FileNotFoundError`) whose message names the file, the line or
entry and the problem.

`path` may be a file or, for the datasets whose public release names its files by split, a
directory: `split` then picks the file (`train`, `valid`/`validation`/`dev`, `test`). Given a
single file, `split` is ignored (one file holds one split), except for NarrativeQA, whose CSVs
hold every split in a `set` column that `split` filters on.

    records = load_dataset("squad", "data/squad/dev-v1.1.json", limit=100)
    records = load_dataset("narrativeqa", "data/narrativeqa", split="test")
"""

from __future__ import annotations

import csv
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord

R = TypeVar("R")
PathLike = str | Path

AG_NEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
DBPEDIA_LABELS: tuple[str, ...] = (
    "Company",
    "EducationalInstitution",
    "Artist",
    "Athlete",
    "OfficeHolder",
    "MeanOfTransportation",
    "Building",
    "NaturalPlace",
    "Village",
    "Animal",
    "Plant",
    "Album",
    "Film",
    "WrittenWork",
)
SST2_LABELS: tuple[str, ...] = ("negative", "positive")

SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid"}
# File names (or glob patterns) per canonical split, for a directory `path`.
_SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "valid": ("valid", "validation", "dev", "val"),
    "test": ("test",),
}

# The public CSVs hold long fields (NarrativeQA summaries, DBpedia abstracts).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# --------------------------------------------------------------------------- helpers


def normalize_split(split: str) -> str:
    """Map a split name to `train`, `valid` or `test` (`validation`, `dev`, `val` -> `valid`)."""
    name = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
    if name not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of train, valid (dev), test")
    return name


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


def _take(records: Iterable[R], limit: int | None) -> list[R]:
    _check_limit(limit)
    return list(islice(records, limit))


def _require_file(path: PathLike, what: str = "file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p}: expected a {what}, found a directory")
    return p


def _resolve_files(
    path: PathLike, split: str | None, exts: tuple[str, ...], patterns: dict[str, tuple[str, ...]]
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
    tried = list(patterns.get(canon, ()))
    tried += [f"{name}.{ext}" for name in _SPLIT_NAMES[canon] for ext in exts]
    for pattern in tried:
        found = sorted(f for f in p.glob(pattern) if f.is_file())
        if found:
            return found
    raise FileNotFoundError(f"no {canon} file in {p}: looked for {', '.join(tried)}")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn decoding and CSV-syntax errors raised while reading `path` into a short ValueError."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV: {e}") from None


def _clean(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for a CSV with a header; checks `required` columns exist."""
    with _reading(path), path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is None:
            raise ValueError(f"{path}: empty file (expected a CSV header)")
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)} in header {', '.join(header)}"
            )
        for row in reader:
            if None in row or any(row[c] is None for c in required):
                raise ValueError(
                    f"{path}: line {reader.line_num}: expected {len(header)} fields "
                    f"({', '.join(header)})"
                )
            yield reader.line_num, row


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    with _reading(path), path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: line {lineno}: bad JSON: {e.msg} (column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def _field(path: Path, lineno: int, obj: dict[str, Any], names: tuple[str, ...]) -> str:
    """The first of `names` present in `obj`, as a string."""
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}: line {lineno}: field {name!r} is {type(value).__name__}, "
                    "expected a string"
                )
            return value
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"{path}: line {lineno}: no {wanted} field (keys: {', '.join(obj)})")


def _record_id(obj: dict[str, Any], id_field: str | None, fallback: str) -> str:
    if id_field and id_field in obj and obj[id_field] is not None:
        return str(obj[id_field])
    return fallback


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


def _split_filter(split: str | None) -> str | None:
    return None if split is None else normalize_split(split)


def _narrativeqa_summaries(
    path: Path, split: str | None
) -> Iterator[tuple[str, str, str]]:  # (document_id, set, summary)
    for lineno, row in _csv_rows(path, ("document_id", "set", "summary")):
        doc_id, part = row["document_id"].strip(), row["set"].strip()
        if not doc_id:
            raise ValueError(f"{path}: line {lineno}: empty document_id")
        if split is None or part == split:
            yield doc_id, part, row["summary"].strip()


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
    want = _split_filter(split)
    summaries = {doc: text for doc, _, text in _narrativeqa_summaries(summaries_csv, want)}

    def records() -> Iterator[QARecord]:
        per_doc: dict[str, int] = {}
        columns = ("document_id", "set", "question", "answer1", "answer2")
        for lineno, row in _csv_rows(qaps, columns):
            doc_id = row["document_id"].strip()
            if want is not None and row["set"].strip() != want:
                continue
            if doc_id not in summaries:
                raise ValueError(
                    f"{qaps}: line {lineno}: document_id {doc_id} has no summary in {summaries_csv}"
                )
            answers: list[str] = []
            for col in ("answer1", "answer2"):
                ans = row[col].strip()
                if ans and ans not in answers:
                    answers.append(ans)
            if not answers:
                raise ValueError(f"{qaps}: line {lineno}: both answers are empty")
            k = per_doc.get(doc_id, 0)
            per_doc[doc_id] = k + 1
            yield QARecord(
                context=summaries[doc_id],
                question=row["question"].strip(),
                answers=answers,
                id=f"{doc_id}-{k}",
            )

    return _take(records(), limit)


def load_narrativeqa_summaries(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[TextRecord]:
    """NarrativeQA summaries as plain text (the paper infills them).

    `path`: the NarrativeQA directory (see `load_narrativeqa`) or `summaries.csv` itself
    (columns document_id, set, summary, ...); `split` filters the `set` column. Record: text =
    summary, id = document_id, meta = {"set": set}.
    """
    p = Path(path).expanduser()
    csv_path = _require_file(p, "summaries.csv") if p.is_file() else _narrativeqa_files(p)[1]
    rows = _narrativeqa_summaries(csv_path, _split_filter(split))
    return _take((TextRecord(text=t, id=d, meta={"set": s}) for d, s, t in rows), limit)


# --------------------------------------------------------------------------- stories


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
    p = _resolve_files(path, split, ("csv",), {})[0]

    def records() -> Iterator[TextRecord]:
        with _reading(p), p.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
        if header is None:
            raise ValueError(f"{p}: empty file (expected a CSV header)")
        if "InputStoryid" in header:
            cols = ("InputStoryid", *[f"InputSentence{i}" for i in range(1, 5)])
            cols += ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding")
            for lineno, row in _csv_rows(p, cols):
                right = row["AnswerRightEnding"].strip()
                if right not in ("1", "2"):
                    raise ValueError(
                        f"{p}: line {lineno}: AnswerRightEnding must be 1 or 2, got {right!r}"
                    )
                sents = [row[f"InputSentence{i}"] for i in range(1, 5)]
                sents.append(row[f"RandomFifthSentenceQuiz{right}"])
                text = " ".join(s.strip() for s in sents if s.strip())
                yield TextRecord(text=text, id=row["InputStoryid"].strip())
            return
        cols = ("storyid", *[f"sentence{i}" for i in range(1, 6)])
        for _, row in _csv_rows(p, cols):
            sents = [row[f"sentence{i}"].strip() for i in range(1, 6)]
            meta = {"title": row["storytitle"].strip()} if row.get("storytitle") else {}
            yield TextRecord(
                text=" ".join(s for s in sents if s), id=row["storyid"].strip(), meta=meta
            )

    return _take(records(), limit)


def load_simplestories(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[TextRecord]:
    """SimpleStories as JSON lines.

    `path`: a JSONL file, one object per line with the story under `story` (or `text`); blank
    lines are skipped. Record: text = the story (ends stripped, inner layout kept), id = the
    object's `id` if any, else "{line number}".
    """
    p = _resolve_files(path, split, ("jsonl", "json"), {})[0]
    rows = _jsonl_objects(p)
    return _take(
        (
            TextRecord(
                text=_field(p, n, obj, ("story", "text")).strip(),
                id=_record_id(obj, "id", str(n)),
            )
            for n, obj in rows
        ),
        limit,
    )


# --------------------------------------------------------------------------- QA


def _squad_fail(path: Path, where: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {where}: {problem}")


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
    p = _resolve_files(path, split, ("json",), patterns)[0]
    with _reading(p), p.open(encoding="utf-8-sig") as f:
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
            raise _squad_fail(p, where, f"missing {key!r}")
        if not isinstance(obj[key], kind):
            raise _squad_fail(p, where, f"{key!r} should be a {kind.__name__}")
        return obj[key]

    def records() -> Iterator[QARecord]:
        for i, article in enumerate(doc["data"]):
            for j, para in enumerate(get(article, "paragraphs", list, f"data[{i}]")):
                where = f"data[{i}].paragraphs[{j}]"
                context = get(para, "context", str, where)
                for k, qa in enumerate(get(para, "qas", list, where)):
                    qwhere = f"{where}.qas[{k}]"
                    question = get(qa, "question", str, qwhere)
                    answers: list[str] = []
                    for m, ans in enumerate(get(qa, "answers", list, qwhere)):
                        text = get(ans, "text", str, f"{qwhere}.answers[{m}]").strip()
                        if text and text not in answers:
                            answers.append(text)
                    if not answers:
                        continue
                    yield QARecord(
                        context=context,
                        question=question.strip(),
                        answers=answers,
                        id=str(get(qa, "id", object, qwhere)),
                    )

    return _take(records(), limit)


_BABI_LINE = re.compile(r"^(\d+) (.*)$")


def load_babi(path: PathLike, split: str | None = None, limit: int | None = None) -> list[QARecord]:
    """bAbI (Weston et al.) stories and questions.

    `path`: a task file such as `qa2_two-supporting-facts_train.txt`, or a directory, where
    `split` selects every `*_{split}.txt` in it (read in name order). Lines are `N statement` or
    `N question?<TAB>answer<TAB>supporting ids`; N == 1 starts a new story. Record: context =
    the story's statements so far (numbers removed) joined by spaces, question, answers =
    [answer] (kept verbatim, e.g. "apple,football"), id = "{file stem}:{story}:{N}" with story
    counted from 0 within the file.
    """
    patterns = {s: tuple(f"*_{n}.txt" for n in _SPLIT_NAMES[s]) for s in SPLITS}
    files = _resolve_files(path, split, ("txt",), patterns)

    def records() -> Iterator[QARecord]:
        for p in files:
            story: list[str] = []
            story_idx = -1
            with _reading(p), p.open(encoding="utf-8") as f:
                for lineno, raw in enumerate(f, start=1):
                    line = raw.rstrip("\r\n")
                    if not line.strip():
                        continue
                    m = _BABI_LINE.match(line)
                    if m is None:
                        raise ValueError(
                            f"{p}: line {lineno}: expected 'N text' (a line number, a space, "
                            f"then text), got {line[:60]!r}"
                        )
                    num, body = int(m.group(1)), m.group(2)
                    if num == 1:
                        story, story_idx = [], story_idx + 1
                    elif story_idx < 0:
                        raise ValueError(f"{p}: line {lineno}: first story starts at {num}, not 1")
                    if "\t" not in body:
                        story.append(body.strip())
                        continue
                    parts = body.split("\t")
                    if len(parts) < 2 or not parts[1].strip():
                        raise ValueError(
                            f"{p}: line {lineno}: question line needs "
                            "'N question<TAB>answer<TAB>supporting ids'"
                        )
                    support = parts[2].split() if len(parts) > 2 else []
                    if not all(s.isdigit() for s in support):
                        raise ValueError(
                            f"{p}: line {lineno}: supporting ids must be numbers, got {parts[2]!r}"
                        )
                    yield QARecord(
                        context=" ".join(story),
                        question=parts[0].strip(),
                        answers=[parts[1].strip()],
                        id=f"{p.stem}:{story_idx}:{num}",
                    )

    return _take(records(), limit)


# --------------------------------------------------------------------------- classification


def _headerless_class_csv(
    path: Path, names: tuple[str, ...], dataset: str
) -> Iterator[ClassRecord]:
    """Rows `class index (1-based), title, body` of the AG News / DBpedia CSVs.

    A header row (first field not a number, on line 1) is skipped, for re-exports that add one.
    """
    with _reading(path), path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            lineno = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != 3:
                raise ValueError(
                    f"{path}: line {lineno}: expected 3 fields (class index, title, text), "
                    f"got {len(row)}"
                )
            label_s = row[0].strip()
            if not label_s.lstrip("-").isdigit():
                if lineno == 1:
                    continue  # a header
                raise ValueError(f"{path}: line {lineno}: class index {label_s!r} is not a number")
            label = int(label_s)
            if not 1 <= label <= len(names):
                raise ValueError(
                    f"{path}: line {lineno}: class index {label} outside 1..{len(names)} "
                    f"for {dataset}"
                )
            # The AG News CSVs mark line breaks with a literal backslash.
            title, body = (_clean(c.replace("\\", " ")) for c in row[1:])
            yield ClassRecord(
                text=f"{title} {body}".strip(),
                label=label,
                label_name=names[label - 1],
                id=str(lineno),
            )


def load_ag_news(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[ClassRecord]:
    """AG News topic classification.

    `path`: `train.csv` / `test.csv` of the public `ag_news_csv` release (or its directory):
    no header, rows `"class index","title","description"` with class 1-4 = World, Sports,
    Business, Sci/Tech. Record: text = title + " " + description (whitespace collapsed,
    backslash line marks removed), label = the file's 1-based index, label_name, id = line
    number.
    """
    p = _resolve_files(path, split, ("csv",), {})[0]
    return _take(_headerless_class_csv(p, AG_NEWS_LABELS, "AG News"), limit)


def load_dbpedia(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[ClassRecord]:
    """DBpedia-14 ontology classification.

    `path`: `train.csv` / `test.csv` of the public `dbpedia_csv` release (or its directory):
    no header, rows `class index,title,content` with class 1-14 = Company, ...,
    WrittenWork (`DBPEDIA_LABELS`). Record: text = title + " " + content, label = the file's
    1-based index, label_name, id = line number.
    """
    p = _resolve_files(path, split, ("csv",), {})[0]
    return _take(_headerless_class_csv(p, DBPEDIA_LABELS, "DBpedia"), limit)


def load_sst2(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[ClassRecord]:
    """SST-2 sentiment (GLUE format).

    `path`: GLUE's `SST-2/train.tsv` or `dev.tsv` (or the directory): a header `sentence<TAB>
    label`, then one sentence per line with label 0 (negative) or 1 (positive); columns are
    found by name. GLUE's test.tsv has no labels and is refused. Record: text = sentence,
    label, label_name, id = line number.
    """
    p = _resolve_files(path, split, ("tsv",), {})[0]

    def records() -> Iterator[ClassRecord]:
        with _reading(p), p.open(encoding="utf-8-sig") as f:
            header = f.readline().rstrip("\r\n").split("\t")
            if "sentence" not in header or "label" not in header:
                why = " (GLUE's test split is unlabeled)" if "sentence" in header else ""
                raise ValueError(
                    f"{p}: header must name 'sentence' and 'label' columns{why}, got {header!r}"
                )
            si, li = header.index("sentence"), header.index("label")
            for lineno, raw in enumerate(f, start=2):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != len(header):
                    raise ValueError(
                        f"{p}: line {lineno}: expected {len(header)} tab-separated fields, "
                        f"got {len(parts)}"
                    )
                label_s = parts[li].strip()
                if label_s not in ("0", "1"):
                    raise ValueError(f"{p}: line {lineno}: label must be 0 or 1, got {label_s!r}")
                label = int(label_s)
                yield ClassRecord(
                    text=parts[si].strip(),
                    label=label,
                    label_name=SST2_LABELS[label],
                    id=str(lineno),
                )

    return _take(records(), limit)


# --------------------------------------------------------------------------- generic


def load_text(
    path: PathLike, split: str | None = None, limit: int | None = None, per_line: bool = False
) -> list[TextRecord]:
    """Plain UTF-8 text.

    `path`: a text file (or a directory holding `{split}.txt`). By default one record per
    paragraph (blocks separated by blank lines, their lines joined by single spaces); with
    `per_line=True` one record per non-blank line. Record: text, id = the 1-based line number
    where it starts.
    """
    p = _resolve_files(path, split, ("txt",), {})[0]

    def records() -> Iterator[TextRecord]:
        block: list[str] = []
        start = 0
        with _reading(p), p.open(encoding="utf-8-sig") as f:
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

    return _take(records(), limit)


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
    p = _resolve_files(path, split, ("jsonl",), {})[0]
    rows = _jsonl_objects(p)
    return _take(
        (
            TextRecord(
                text=_field(p, n, obj, (text_field,)).strip(), id=_record_id(obj, id_field, str(n))
            )
            for n, obj in rows
        ),
        limit,
    )


# --------------------------------------------------------------------------- registry

Loader = Callable[..., list[Any]]

LOADERS: dict[str, Loader] = {
    "narrativeqa": load_narrativeqa,
    "narrativeqa_summaries": load_narrativeqa_summaries,
    "rocstories": load_rocstories,
    "simplestories": load_simplestories,
    "squad": load_squad,
    "babi": load_babi,
    "ag_news": load_ag_news,
    "dbpedia": load_dbpedia,
    "sst2": load_sst2,
    "text": load_text,
    "jsonl": load_jsonl,
}


def load_dataset(
    name: str, path: PathLike, split: str | None = None, limit: int | None = None, **options: Any
) -> list[Any]:
    """Load dataset `name` (a key of `LOADERS`; `-` and case are ignored) from local `path`.

    `split` picks the file in a directory `path` (or filters NarrativeQA's `set` column);
    `limit` keeps the first records; `options` go to the loader (e.g. `per_line=True` for
    "text", `text_field="story"` for "jsonl").
    """
    key = name.strip().lower().replace("-", "_")
    key = {"ag": "ag_news", "agnews": "ag_news", "sst_2": "sst2"}.get(key, key)
    if key not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(LOADERS))}")
    _check_limit(limit)
    loader = LOADERS[key]
    accepted = set(inspect.signature(loader).parameters) - {"path", "split", "limit"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"dataset {key!r} has no option(s) {', '.join(unknown)} (takes: {takes})")
    return loader(path, split=split, limit=limit, **options)
