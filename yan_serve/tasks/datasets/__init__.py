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

The loaders live by kind: `qa` (NarrativeQA, SQuAD, bAbI), `text` (ROCStories, SimpleStories,
plain text, JSON lines), `classes` (AG News, DBpedia, SST-2); `files` reads the formats.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from yan_serve.tasks.datasets.classes import (
    AG_NEWS_LABELS,
    DBPEDIA_LABELS,
    SST2_LABELS,
    load_ag_news,
    load_dbpedia,
    load_sst2,
)
from yan_serve.tasks.datasets.files import SPLITS, PathLike, check_limit, normalize_split
from yan_serve.tasks.datasets.qa import (
    load_babi,
    load_narrativeqa,
    load_narrativeqa_summaries,
    load_squad,
)
from yan_serve.tasks.datasets.text import load_jsonl, load_rocstories, load_simplestories, load_text

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
    check_limit(limit)
    loader = LOADERS[key]
    accepted = set(inspect.signature(loader).parameters) - {"path", "split", "limit"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"dataset {key!r} has no option(s) {', '.join(unknown)} (takes: {takes})")
    return loader(path, split=split, limit=limit, **options)


__all__ = [
    "AG_NEWS_LABELS",
    "DBPEDIA_LABELS",
    "LOADERS",
    "SPLITS",
    "SST2_LABELS",
    "load_ag_news",
    "load_babi",
    "load_dataset",
    "load_dbpedia",
    "load_jsonl",
    "load_narrativeqa",
    "load_narrativeqa_summaries",
    "load_rocstories",
    "load_simplestories",
    "load_squad",
    "load_sst2",
    "load_text",
    "normalize_split",
]
