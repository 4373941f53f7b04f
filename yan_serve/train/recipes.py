"""What each stage trains on: corpus directory -> batch streams, and model/tokenizer set-up.

A corpus directory holds `train.jsonl` and `val.jsonl` (and `test.jsonl` for evaluation), one
JSON object per line: `text` rows feed infilling and completion, and also classification when
they carry `section` (the KJV builder writes it) or `label` + `label_name`; `context` +
`question` + `answers` rows feed QA. A corpus without QA rows gets bAbI-style stories from the
generator. `yan data import` writes such directories from the paper's datasets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from yan_serve.config import YANConfig
from yan_serve.model import YAN
from yan_serve.tasks.babi import babi_splits
from yan_serve.tasks.corpus import Corpus
from yan_serve.tasks.corpus import label_table as label_table  # yan_serve.ar.evaluate's import
from yan_serve.tasks.formats import TASKS, Example, TaskFormatter
from yan_serve.tasks.kjv import section_record
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord
from yan_serve.tokenizer import YANTokenizer, train_bpe
from yan_serve.train.data import (
    Batch,
    batches,
    collate,
    collate_stage1,
    mixture,
    stage1_maker,
    task_maker,
)


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


def load_corpus(
    data_dir: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    babi_sizes: tuple[int, int, int] = (4000, 200, 300),
    seed: int = 0,
) -> Corpus:
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
            sp = babi_splits(task, *babi_sizes, seed=seed)
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
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"{split}.jsonl").open("w") as f:
            for r in recs:
                row = asdict(r)
                row.pop("meta", None)
                f.write(json.dumps(row) + "\n")
        counts[split] = len(recs)
        if single_file:  # one file holds one split: write it as test
            (out / f"{split}.jsonl").rename(out / "test.jsonl")
            counts = {"test": counts.pop(split)}
            break
    if not counts:
        raise FileNotFoundError(f"no train/val/test files for {name} under {path}")
    return counts


def tokenizer_for(corpus: Corpus, tokenizer_dir: str | None, vocab_size: int) -> YANTokenizer:
    """A given tokenizer directory, else a byte-level BPE trained on the training text."""
    if tokenizer_dir:
        return YANTokenizer.load(tokenizer_dir)
    return train_bpe((r.text for r in corpus.text["train"]), vocab_size=vocab_size)


def config_for_tokenizer(cfg: YANConfig, tok: YANTokenizer) -> YANConfig:
    """Align the config's vocabulary and special ids with the tokenizer."""
    sp = tok.special
    d = cfg.to_dict()
    d.update(vocab_size=max(cfg.vocab_size, tok.vocab_size), pad_token_id=sp.pad,
             bos_token_id=sp.bos, eos_token_id=sp.eos, mask_token_id=sp.mask)  # fmt: skip
    return YANConfig.from_dict(d)


def _batches_of(stream: Iterator, pad: int, stage1: bool) -> Iterator[Batch]:
    fn = collate_stage1 if stage1 else collate
    for exs in stream:
        yield fn(exs, pad)


def stage_batches(
    stage: str,
    corpus: Corpus,
    tok: YANTokenizer,
    model: YAN,
    split: str,
    batch_size: int,
    seed: int,
    tasks: tuple[str, ...] = TASKS,
    slack: float = 0.0,
) -> Iterator[Batch]:
    """Endless batches for a stage: stage1 = corrupted text, stage2 = infilling, finetune = the
    task mixture (one task per batch; a `slack` share of targets get serving length slack)."""
    fmt = TaskFormatter(tok)
    L = model.config.max_length
    pad = tok.special.pad
    if stage == "stage1":
        return _batches_of(
            batches(corpus.text[split], stage1_maker(fmt, max_len=L), batch_size, seed), pad, True
        )
    chosen = ("infill",) if stage == "stage2" else tasks
    streams = task_streams(corpus, fmt, split, {t: t for t in chosen}, batch_size, seed, L,
                           slack if stage == "finetune" else 0.0)  # fmt: skip
    return _batches_of(mixture(streams, seed), pad, False)


def task_streams(
    corpus: Corpus,
    fmt: TaskFormatter,
    split: str,
    tasks: dict[str, str],
    batch_size: int,
    seed: int,
    max_len: int,
    slack: float = 0.0,
    seed_order: Sequence[str] = TASKS,
) -> dict[str, Iterator[list[Example]]]:
    """One endless stream of example batches per name in `tasks`, which maps a stream's name to
    the task whose records and format it draws (several names may share a task). A stream's
    seed is `seed + 101 * seed_order.index(name)`, so a task's data order does not depend on
    which other tasks are mixed in."""
    streams = {}
    for name, task in tasks.items():
        recs = corpus.records(task, split)
        if not recs:
            raise ValueError(f"no {split} records for task {task!r} in this corpus")
        streams[name] = batches(recs, task_maker(fmt, task, max_len, max_len, slack), batch_size,
                                seed + 101 * seed_order.index(name))  # fmt: skip
    return streams
