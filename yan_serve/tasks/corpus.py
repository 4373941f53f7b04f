"""A corpus directory (train/val/test.jsonl as `yan data` writes them) and the corpus in memory:
its records by kind and split (`load_corpus`); training draws from it and evaluation reads its
test split. `import_dataset` writes a paper dataset's local files as such a directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from yan_serve.tasks.babi import babi_splits
from yan_serve.tasks.formats import TASKS
from yan_serve.tasks.kjv import section_record
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord
from yan_serve.tasks.splitfiles import split_writers


@dataclass
class Corpus:
    text: dict[str, list[TextRecord]]
    classes: dict[str, list[ClassRecord]]
    qa: dict[str, list[QARecord]]

    def records(self, task: str, split: str) -> list:
        """The records a task draws from: text for infill/complete, QA, or classes."""
        by_task = {"infill": self.text, "complete": self.text, "qa": self.qa,
                   "classify": self.classes}  # fmt: skip
        if task not in by_task:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        return by_task[task][split]


def label_table(corpus: Corpus, split: str = "train") -> dict[int, str]:
    """{label id: name} of the corpus's classification records."""
    return {int(r.label): r.label_name for r in corpus.records("classify", split)}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"no {path}")
    rows = []
    for i, ln in enumerate(path.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i} is not a JSON object")
        if "text" not in row and not {"context", "question", "answers"} <= set(row):
            raise ValueError(f"{path}:{i} has neither 'text' nor 'context'/'question'/'answers'")
        rows.append(row)
    return rows


def _class_record(r: dict) -> ClassRecord | None:
    if "section" in r:
        return section_record(r)
    if "label" in r and "label_name" in r:
        return ClassRecord(r["text"], int(r["label"]), str(r["label_name"]), r.get("id", ""))
    return None


# the seed of the generated bAbI stories: one fixed corpus, whatever seed a run orders its
# batches with; a per-run seed would draw other stories, some of them another seed's test items
BABI_SEED = 0


def load_corpus(
    data_dir: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    babi_sizes: tuple[int, int, int] = (4000, 200, 300),
) -> Corpus:
    """The corpus directory's `splits`. Without QA rows it gets the generated bAbI stories
    (`babi_sizes` train/val/test per task), always the same ones (`BABI_SEED`), so that every
    training run and `yan eval` see one set of disjoint splits."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"corpus directory {d} does not exist (yan data kjv --out {d})")
    text, classes, qa = {}, {}, {}
    for s in splits:
        rows = read_jsonl(d / f"{s}.jsonl")
        text[s] = [TextRecord(r["text"], r.get("id", "")) for r in rows if "text" in r]
        classes[s] = [c for r in rows if "text" in r and (c := _class_record(r)) is not None]
        qa[s] = [QARecord(r["context"], r["question"], list(r["answers"]), r.get("id", ""))
                 for r in rows if "question" in r]  # fmt: skip
    if not any(qa.values()):
        for task in ("single", "two"):
            sp = babi_splits(task, *babi_sizes, seed=BABI_SEED)
            for s in splits:
                qa[s] += sp[s]
    return Corpus(text, classes, qa)


def import_dataset(name: str, path: str | Path, out_dir: str | Path,
                   limit: int | None = None) -> dict[str, int]:  # fmt: skip
    """Write a paper dataset's local files as a corpus directory (train/val/test.jsonl).

    Splits the files do not provide are skipped; returns the row count per written split.
    """
    from dataclasses import asdict

    from yan_serve.tasks.datasets import load_dataset

    out = Path(out_dir)
    counts: dict[str, int] = {}
    single_file = Path(path).is_file()
    for split in ("train", "val", "test"):
        try:
            recs = load_dataset(name, path, split=split, limit=limit)
        except FileNotFoundError:
            if single_file:
                raise
            continue
        name_as = "test" if single_file else split  # one file holds one split: written as test
        with split_writers(out, (name_as,)) as files:
            for r in recs:
                row = asdict(r)
                row.pop("meta", None)
                files[name_as].write(json.dumps(row) + "\n")
        counts[name_as] = len(recs)
        if single_file:
            break
    if not counts:
        raise FileNotFoundError(f"no train/val/test files for {name} under {path}")
    return counts
