"""What each stage trains on: corpus directory -> batch streams, and model/tokenizer set-up.

A corpus directory holds `train.jsonl` and `val.jsonl` (and `test.jsonl` for evaluation), one
JSON object per line: `text` rows feed infilling and completion, and also classification when
they carry `section` (the KJV builder writes it) or `label` + `label_name`; `context` +
`question` + `answers` rows feed QA. A corpus without QA rows gets bAbI-style stories from the
generator. `yan data import` writes such directories from the paper's datasets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from yan_serve.config import YANConfig
from yan_serve.model import YAN
from yan_serve.tasks.corpus import Corpus
from yan_serve.tasks.formats import INFILL_RATE, TASKS, Example, TaskFormatter
from yan_serve.tasks.serving import QA_TEMPLATE
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


def tokenizer_texts(corpus: Corpus) -> Iterator[str]:
    """What the BPE is trained on: the training split's text passages and its QA stories as the
    model reads and writes them (the QA template with the answer after it). Without the stories
    a KJV-trained BPE cuts every bAbI answer into 2-4 pieces ("k" "it" "ch" "en"), which a model
    that writes all positions at once must then get right together; with them each answer is one
    token, and the KJV's own text takes 0.6% more tokens (measured on the KJV corpus)."""
    yield from (r.text for r in corpus.text["train"])
    for r in corpus.qa.get("train", []):
        yield QA_TEMPLATE.format(ctx=r.context, q=r.question) + r.answers[0]


def tokenizer_for(corpus: Corpus, tokenizer_dir: str | None, vocab_size: int) -> YANTokenizer:
    """A given tokenizer directory, else a byte-level BPE trained on `tokenizer_texts`."""
    if tokenizer_dir:
        return YANTokenizer.load(tokenizer_dir)
    if not any(r.text.strip() for r in corpus.text["train"]):
        raise ValueError("the corpus has no training text to train a tokenizer on")
    return train_bpe(tokenizer_texts(corpus), vocab_size=vocab_size)


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
    infill_rate: tuple[float, float] = INFILL_RATE,
) -> Iterator[Batch]:
    """Endless batches for a stage: stage1 = corrupted text, stage2 = infilling, finetune = the
    task mixture (one task per batch, a task named w times in `tasks` taking w batches of each
    round; a `slack` share of targets get serving length slack; infill passages masked at a
    share drawn from `infill_rate`)."""
    fmt = TaskFormatter(tok, model.config.infill_masks, infill_rate)
    L = model.config.max_length
    pad = tok.special.pad
    if stage == "stage1":
        return _batches_of(
            batches(corpus.text[split], stage1_maker(fmt, max_len=L), batch_size, seed), pad, True
        )
    chosen = ("infill",) if stage == "stage2" else tasks
    streams = task_streams(corpus, fmt, split, {t: t for t in chosen}, batch_size, seed, L,
                           slack if stage == "finetune" else 0.0)  # fmt: skip
    return _batches_of(mixture(streams, seed, Counter(chosen)), pad, False)


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
