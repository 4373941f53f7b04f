"""Training the AR baseline on YAN's data and task formats (`yan train ar`).

Same corpus, tokenizer, task formats, batch size and step counts as the YAN recipe, so the two
see the same examples, and the same loop (`yan_serve.train.trainer.Trainer`): `ARObjective` is
the baseline as its objective. Tasks: the YAN task names plus `infill-fim` (fill-in-the-middle
target: only the spans). The loss is next-token cross-entropy on target tokens only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import GPT2LMHeadModel

from yan_serve.ar.model import ar_sequence, fim_target, load_ar, save_ar
from yan_serve.tasks.corpus import Corpus, label_table
from yan_serve.tasks.formats import INFILL_RATE, TASKS, Example, TaskFormatter
from yan_serve.tokenizer import YANTokenizer
from yan_serve.train.data import mixture
from yan_serve.train.recipes import task_streams
from yan_serve.train.trainer import Objective
from yan_serve.weights import save_labels

AR_TASKS = (*TASKS, "infill-fim")


class ARBatch(NamedTuple):
    """Right-padded ids, attention mask, labels (-100 outside targets)."""

    ids: Tensor
    att: Tensor
    labels: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ARBatch:
        return ARBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> ARBatch:
        """The batch in page-locked host memory (the DataLoader's `pin_memory` calls this)."""
        return ARBatch(*(t.pin_memory() for t in self))


def collate_ar(seqs: Sequence[tuple[list[int], int]], pad: int) -> ARBatch:
    """(sequence, target start) pairs -> a right-padded batch with labels on the targets."""
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
        att[i, : len(s)] = 1
        labels[i, start : len(s)] = torch.as_tensor(s[start:])
    return ARBatch(ids, att, labels)


def target_loss(model: GPT2LMHeadModel, ids, att, labels) -> torch.Tensor:
    """Mean next-token CE over target tokens; the LM head runs on target positions only."""
    h = model.transformer(input_ids=ids, attention_mask=att).last_hidden_state
    nxt = labels[:, 1:]
    sel = nxt != -100
    logits = model.lm_head(h[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits.float(), nxt[sel])


class ARObjective(Objective):
    """The GPT-2 baseline for the trainer: source + BOS + target sequences over the task mixture
    (one task per batch; examples at most `max_len` tokens a side), loss on the target tokens.
    Checkpoints are Hugging Face GPT-2 directories with the YAN tokenizer (`save_ar`), plus the
    corpus's label table when the run trains classification."""

    name = "ar"
    default_lr = 1e-3
    log_file = "training_log_ar.jsonl"

    def __init__(
        self,
        model: GPT2LMHeadModel,
        tokenizer: YANTokenizer,
        max_len: int,
        tasks: tuple[str, ...] = AR_TASKS,
        corpus: Corpus | None = None,
        infill_rate: tuple[float, float] = INFILL_RATE,
    ) -> None:
        bad = [t for t in tasks if t not in AR_TASKS]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; choose from {', '.join(AR_TASKS)}")
        super().__init__(model)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.tasks = tuple(tasks)
        self.corpus = corpus
        self.infill_rate = infill_rate

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[ARBatch]:
        """Endless batches over the task mixture; the `infill-fim` stream draws infill examples
        and keeps only their spans as the target."""
        if self.corpus is None:
            raise ValueError(f"ar: no corpus to draw {split} batches from")
        sp = self.tokenizer.special
        names = {t: "infill" if t == "infill-fim" else t for t in self.tasks}
        fmt = TaskFormatter(self.tokenizer, infill_rate=self.infill_rate)
        streams = task_streams(self.corpus, fmt, split, names, batch_size, seed, self.max_len,
                               seed_order=AR_TASKS)  # fmt: skip

        def sequences(name: str, stream: Iterator[list[Example]]):
            for exs in stream:
                yield [ar_sequence(e.src, fim_target(e, sp.mask, sp.eos) if name == "infill-fim"
                                   else e.tgt, sp.bos) for e in exs]  # fmt: skip

        mixed = mixture({n: sequences(n, st) for n, st in streams.items()}, seed,
                        Counter(self.tasks))  # fmt: skip
        return (collate_ar(seqs, sp.pad) for seqs in mixed)

    def forward(
        self, batch: ARBatch, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The target-token loss; the baseline draws nothing random (`generator` is unused)."""
        return {"loss": target_loss(self.model, *batch)}

    def target_tokens(self, batch: ARBatch) -> int:
        return int((batch.labels != -100).sum())

    def save(self, out: Path, step: int) -> None:
        save_ar(self.model, self.tokenizer, out)
        if "classify" in self.tasks and self.corpus is not None:  # the server's label table
            save_labels(out, label_table(self.corpus))

    def load(self, out: Path, device: torch.device) -> None:
        self.model.load_state_dict(load_ar(out, device).state_dict())

    def settings(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "max_len": self.max_len}
