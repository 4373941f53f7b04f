"""Training data: record streams, per-stage example builders, padding collation.

Examples are rebuilt from records every time they are drawn, so masks and spans are fresh each
epoch. Batches are length-bucketed (sorted inside a pool of `pool` batches) to waste little
compute on padding. Each rank of a distributed run draws from its own seeded stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from yan_serve.tasks.formats import Example, TaskFormatter, expand_masks, mask_spans

MakeFn = Callable[[object, random.Random], Example | None]


@dataclass
class Batch:
    src: Tensor  # [B, Lx] long
    src_mask: Tensor  # [B, Lx] bool
    tgt: Tensor  # [B, Ly] long
    tgt_mask: Tensor  # [B, Ly] bool
    task: str = ""
    focus: Tensor | None = None  # [B, Ly] bool: the positions the task asks for (`Example.focus`)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (the DataLoader's `pin_memory` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> Batch:
        focus = None if self.focus is None else fn(self.focus)
        return Batch(*(fn(t) for t in (self.src, self.src_mask, self.tgt, self.tgt_mask)),
                     task=self.task, focus=focus)  # fmt: skip


def pad_stack(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Right-pad integer sequences: -> ids [B, L] long, mask [B, L] bool."""
    L = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    src, src_mask = pad_stack([e.src for e in examples], pad_id)
    tgt, tgt_mask = pad_stack([e.tgt for e in examples], pad_id)
    focus = None
    if any(e.focus for e in examples):
        focus = torch.zeros_like(tgt_mask)
        for i, e in enumerate(examples):
            focus[i, e.focus] = True
    return Batch(src, src_mask, tgt, tgt_mask, task=examples[0].task, focus=focus)


def collate_stage1(examples: Sequence[Example], pad_id: int) -> Batch:
    """Stage 1 wants the corrupted source over the target's positions: pad src to tgt length."""
    tgt, tgt_mask = pad_stack([e.tgt for e in examples], pad_id)
    src, _ = pad_stack([e.src for e in examples], pad_id, length=tgt.shape[1])
    return Batch(src, tgt_mask.clone(), tgt, tgt_mask, task="stage1")


def stage1_maker(fmt: TaskFormatter, rate: float = 0.08, max_len: int = 256) -> MakeFn:
    """Text record -> (corrupted, clean + EOS) with ~8% of tokens masked in spans of 1..3, each
    masked run written in the formatter's infill layout: one <mask> (the paper's corruption) or,
    for a `per_position` model, one <mask> per masked token, so that the encoder learns the very
    sources the model is fine-tuned and served with (the source then stays position-aligned
    with the target)."""
    sp = fmt.sp

    def make(rec, rng: random.Random) -> Example | None:
        clean = [*fmt.tok.encode(rec.text)[: max_len - 1], sp.eos]
        src, fills = mask_spans(clean, rng, rate, 3, sp.mask, frozenset({sp.eos}))
        if fmt.per_position:
            src = expand_masks(src, [len(f) for f in fills], sp.mask)
        return Example("stage1", src, clean, rec.text, rec.id, fills)

    return make


def task_maker(
    fmt: TaskFormatter, task: str, max_src: int, max_tgt: int, slack: float = 0.0
) -> MakeFn:
    """Record -> Example for a task; drops examples longer than the model allows. With
    probability `slack` the target gets a random length slack (`TaskFormatter.add_slack`)."""

    def make(rec, rng: random.Random) -> Example | None:
        ex = fmt.make(task, rec, rng)
        if ex is None or len(ex.src) > max_src or len(ex.tgt) > max_tgt:
            return None
        if slack > 0 and rng.random() < slack:
            ex = fmt.add_slack(ex, rng, max_tgt)
        return ex

    return make


def batches(
    records: Sequence[object],
    make: MakeFn,
    batch_size: int,
    seed: int,
    pool: int = 32,
) -> Iterator[list[Example]]:
    """Endless length-bucketed batches of freshly made examples (reshuffled every epoch)."""
    if not records:
        raise ValueError("no training records")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        buf: list[Example] = []
        misses = 0
        while len(buf) < batch_size * pool:
            if not order:
                order = list(range(len(records)))
                rng.shuffle(order)
            ex = make(records[order.pop()], rng)
            if ex is None:
                misses += 1
                if misses > 100 * batch_size * pool:
                    raise ValueError("every record was filtered out (too long for the model?)")
                continue
            buf.append(ex)
        buf.sort(key=lambda e: (len(e.tgt), len(e.src)))
        chunks = [buf[i : i + batch_size] for i in range(0, len(buf), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def mixture(
    streams: dict[str, Iterator[list[Example]]],
    seed: int,
    weights: Mapping[str, int] | None = None,
) -> Iterator[list[Example]]:
    """Round-robin over task streams in a seeded random order (one task per batch). A stream
    with weight w (default 1) gives w batches of each round, so `{"qa": 3}` beside three other
    tasks makes QA 3 of every 6 batches; with every weight 1 the order is the unweighted one."""
    weights = weights or {}
    bad = sorted(n for n, w in weights.items() if n not in streams or w < 1)
    if bad:
        raise ValueError(f"mixture weight for {bad[0]!r}: not a stream, or below 1")
    rng = random.Random(seed)
    names = [n for n in sorted(streams) for _ in range(weights.get(n, 1))]
    while True:
        rng.shuffle(names)
        for n in names:
            yield next(streams[n])
