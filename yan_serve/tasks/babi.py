"""A seeded generator of bAbI-style question-answering stories with exact answers.

Two tasks, after the first two bAbI tasks:

* ``"single"`` (one supporting fact): people move between locations; the question asks where
  a person is, and the answer is that person's latest location.
* ``"two"`` (two supporting facts): people also pick up and drop objects; the question asks
  where an object is: the location of the person holding it, or, once dropped, the location of
  the person who dropped it at the time they dropped it.

The world is kept consistent: an object can only be picked up when nobody holds it and it lies
where the person is (or has never been placed), only its holder drops it, and only people whose
location is known pick things up. Questions are only asked about entities whose answer is
determined by the story. Stories are generated with ``random.Random(seed)``, so a seed fixes the
output exactly.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from yan_serve.tasks.records import QARecord

TASKS: tuple[str, ...] = ("single", "two")
PEOPLE: tuple[str, ...] = ("Mary", "John", "Sandra", "Daniel", "Fred", "Julie")
LOCATIONS: tuple[str, ...] = (
    "kitchen",
    "garden",
    "bedroom",
    "bathroom",
    "office",
    "hallway",
    "cellar",
    "park",
)
OBJECTS: tuple[str, ...] = ("apple", "football", "milk", "book", "key", "box")
MOVE_VERBS: tuple[str, ...] = ("went", "moved", "journeyed", "travelled", "ran", "walked")
PICK_VERBS: tuple[str, ...] = ("picked up", "got", "grabbed", "took")
DROP_VERBS: tuple[str, ...] = ("dropped", "discarded", "put down")

# Relative weights of the actions in task "two" (renormalised over the actions possible).
_ACTION_WEIGHTS: dict[str, float] = {"move": 0.45, "pick": 0.35, "drop": 0.2}
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_MAX_TRIES = 1000


@dataclass
class _World:
    """State of a story being written: locations, holders and the sentence indices behind them."""

    location: dict[str, str] = field(default_factory=dict)  # person -> location
    last_move: dict[str, int] = field(default_factory=dict)  # person -> sentence index
    moves: dict[str, list[int]] = field(default_factory=dict)  # person -> all move indices
    holder: dict[str, str] = field(default_factory=dict)  # object -> person holding it
    picked_at: dict[str, int] = field(default_factory=dict)  # object -> latest pick-up index
    placed: dict[str, str] = field(default_factory=dict)  # object -> location it was dropped
    dropped_at: dict[str, int] = field(default_factory=dict)  # object -> latest drop index
    drop_move: dict[str, int] = field(default_factory=dict)  # object -> mover fact for the drop


def _check_vocab(name: str, words: Sequence[str], minimum: int) -> tuple[str, ...]:
    """Validate one vocabulary list: enough distinct single words."""
    words = tuple(words)
    if len(set(words)) != len(words):
        raise ValueError(f"{name} has duplicates: {words}")
    if len(words) < minimum:
        raise ValueError(f"{name} needs at least {minimum} entries, got {len(words)}")
    for w in words:
        if not isinstance(w, str) or not _WORD.match(w):
            raise ValueError(f"{name} entries must be single words, got {w!r}")
    return words


@dataclass(frozen=True)
class StoryOptions:
    """How stories are written: their length range in sentences and their vocabularies (single
    words, distinct within and across the three lists). Every generator takes these as keyword
    arguments."""

    min_sentences: int = 2
    max_sentences: int = 8
    people: Sequence[str] = PEOPLE
    locations: Sequence[str] = LOCATIONS
    objects: Sequence[str] = OBJECTS


Stream = Iterator[tuple[str, str, str, list[int]]]


def _stories(task: str, options: dict) -> Callable[[random.Random], Stream]:
    """Check `task` and the `StoryOptions` in `options`; return rng -> its endless story stream."""
    opts = StoryOptions(**options)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    lo, hi = opts.min_sentences, opts.max_sentences
    lowest = 1 if task == "single" else 2
    if lo < lowest:
        raise ValueError(f"task {task!r} needs min_sentences >= {lowest}, got {lo}")
    if hi < lo:
        raise ValueError(f"max_sentences ({hi}) < min_sentences ({lo})")
    ppl = _check_vocab("people", opts.people, 1)
    locs = _check_vocab("locations", opts.locations, 2)
    objs = _check_vocab("objects", opts.objects, 1 if task == "two" else 0)
    if set(ppl) & set(locs) or set(ppl) & set(objs) or set(locs) & set(objs):
        raise ValueError("people, locations and objects must not share words")
    checked = replace(opts, people=ppl, locations=locs, objects=objs)
    return lambda rng: _iter_babi(task, rng, checked)


def _move(
    rng: random.Random, world: _World, idx: int, people: tuple[str, ...], locs: tuple[str, ...]
) -> str:
    """Move a random person to a location other than their current one."""
    person = rng.choice(people)
    here = world.location.get(person)
    dest = rng.choice([loc for loc in locs if loc != here])
    world.location[person] = dest
    world.last_move[person] = idx
    world.moves.setdefault(person, []).append(idx)
    return f"{person} {rng.choice(MOVE_VERBS)} to the {dest}."


def _pickable(world: _World, objects: tuple[str, ...]) -> list[tuple[str, str]]:
    """(person, object) pairs where the person could pick up the object now."""
    pairs = []
    for person, loc in world.location.items():
        for obj in objects:
            if obj not in world.holder and world.placed.get(obj, loc) == loc:
                pairs.append((person, obj))
    return pairs


def _story(
    rng: random.Random, task: str, length: int, opts: StoryOptions
) -> tuple[list[str], _World]:
    """Write one story of ``length`` sentences; return the sentences and the final world."""
    people, locs, objects = opts.people, opts.locations, opts.objects
    world = _World()
    sentences: list[str] = []
    for idx in range(length):
        if task == "single":
            sentences.append(_move(rng, world, idx, people, locs))
            continue
        pickable = sorted(_pickable(world, objects))
        held = sorted(world.holder.items())
        options = ["move"] + (["pick"] if pickable else []) + (["drop"] if held else [])
        action = rng.choices(options, weights=[_ACTION_WEIGHTS[o] for o in options])[0]
        if action == "move":
            sentences.append(_move(rng, world, idx, people, locs))
        elif action == "pick":
            person, obj = rng.choice(pickable)
            world.holder[obj] = person
            world.picked_at[obj] = idx
            world.placed.pop(obj, None)
            world.dropped_at.pop(obj, None)
            world.drop_move.pop(obj, None)
            sentences.append(f"{person} {rng.choice(PICK_VERBS)} the {obj}.")
        else:
            obj, person = rng.choice(held)
            del world.holder[obj]
            world.placed[obj] = world.location[person]
            world.dropped_at[obj] = idx
            world.drop_move[obj] = world.last_move[person]
            sentences.append(f"{person} {rng.choice(DROP_VERBS)} the {obj}.")
    return sentences, world


def _answerable(task: str, world: _World) -> list[tuple[str, str, list[int]]]:
    """(question, answer, supporting indices) for every entity the story determines."""
    out = []
    if task == "single":
        for person in sorted(world.location):
            out.append((f"Where is {person}?", world.location[person], [world.last_move[person]]))
        return out
    for obj in sorted(set(world.holder) | set(world.placed)):
        if obj in world.holder:
            person = world.holder[obj]
            answer = world.location[person]
            support = sorted({world.picked_at[obj], world.last_move[person]})
        else:
            answer = world.placed[obj]
            support = sorted({world.drop_move[obj], world.dropped_at[obj]})
        out.append((f"Where is the {obj}?", answer, support))
    return out


def _iter_babi(task: str, rng: random.Random, opts: StoryOptions) -> Stream:
    """Yield (context, question, answer, support) forever, drawing everything from ``rng``."""
    while True:
        length = rng.randint(opts.min_sentences, opts.max_sentences)
        for _ in range(_MAX_TRIES):
            sentences, world = _story(rng, task, length, opts)
            candidates = _answerable(task, world)
            if candidates:
                break
        else:  # pragma: no cover - needs a pathological vocabulary
            raise RuntimeError(f"could not write an answerable {task!r} story of {length}")
        question, answer, support = rng.choice(candidates)
        yield " ".join(sentences), question, answer, support


def generate_babi_with_support(
    task: str, n: int, seed: int, **options: Any
) -> list[tuple[QARecord, list[int]]]:
    """``n`` stories with the sorted 0-based indices of the sentences that support each answer;
    ``options`` are `StoryOptions` fields.

    Task "single" has one supporting fact (the person's latest move); task "two" has two (the
    object's pick-up or drop, and the move that put its holder where the answer says).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = _stories(task, options)(random.Random(seed))
    out = []
    for i in range(n):
        context, question, answer, support = next(stream)
        out.append((QARecord(context, question, [answer], id=f"{task}-{i:06d}"), support))
    return out


def generate_babi(task: str, n: int, seed: int, **options: Any) -> list[QARecord]:
    """``n`` bAbI-style stories for ``task`` ("single" or "two"), fixed by ``seed``; ``options``
    are `StoryOptions` fields.

    The context is the story's sentences joined by single spaces; the one answer is a location.
    """
    return [record for record, _ in generate_babi_with_support(task, n, seed, **options)]


def _derive_seed(seed: int, task: str, split: str) -> int:
    """A stable per-split seed (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"babi/{task}/{split}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def babi_splits(
    task: str, n_train: int, n_val: int, n_test: int, seed: int, **options: Any
) -> dict[str, list[QARecord]]:
    """Train/val/test splits with distinct derived seeds and no shared (context, question);
    ``options`` are `StoryOptions` fields.

    Test is drawn first, then val (skipping test's pairs), then train (skipping both), so the
    test and val sets do not depend on ``n_train``. Ids look like ``"two-val-000042"``.
    """
    sizes = {"test": n_test, "val": n_val, "train": n_train}
    if any(size < 0 for size in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    stories = _stories(task, options)
    seen: set[tuple[str, str]] = set()
    splits: dict[str, list[QARecord]] = {}
    for split, size in sizes.items():
        stream = stories(random.Random(_derive_seed(seed, task, split)))
        taken: set[tuple[str, str]] = set()  # duplicates within one split are allowed
        records: list[QARecord] = []
        misses = 0
        while len(records) < size:
            context, question, answer, _ = next(stream)
            if (context, question) in seen:
                misses += 1
                if misses > _MAX_TRIES * max(1, size):
                    raise RuntimeError(f"story space too small for {sizes} disjoint splits")
                continue
            taken.add((context, question))
            rid = f"{task}-{split}-{len(records):06d}"
            records.append(QARecord(context, question, [answer], id=rid))
        seen |= taken
        splits[split] = records
    return {name: splits[name] for name in ("train", "val", "test")}
