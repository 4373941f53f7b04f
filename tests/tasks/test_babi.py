"""The bAbI-style generator: determinism, answers checked by an independent re-simulation
that parses the generated sentences, supporting facts, splits and vocabulary.

Run: python -m pytest tests/tasks/test_babi.py -q
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from yan_serve.tasks.babi import (
    LOCATIONS,
    OBJECTS,
    PEOPLE,
    babi_splits,
    generate_babi,
    generate_babi_with_support,
)
from yan_serve.tasks.records import QARecord

N = 500

# The grammar is written out here on purpose, not imported, so the check is independent.
_MOVE = re.compile(r"^(\w+) (?:went|moved|journeyed|travelled|ran|walked) to the (\w+)\.$")
_PICK = re.compile(r"^(\w+) (?:picked up|got|grabbed|took) the (\w+)\.$")
_DROP = re.compile(r"^(\w+) (?:dropped|discarded|put down) the (\w+)\.$")
_WHERE_PERSON = re.compile(r"^Where is ([A-Z]\w*)\?$")
_WHERE_OBJECT = re.compile(r"^Where is the (\w+)\?$")


@dataclass
class Sim:
    """World state rebuilt from the text, with the sentence indices behind each fact."""

    loc: dict[str, str] = field(default_factory=dict)
    moved_at: dict[str, int] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    picked_at: dict[str, int] = field(default_factory=dict)
    lies: dict[str, str] = field(default_factory=dict)
    drop_support: dict[str, list[int]] = field(default_factory=dict)


def split_sentences(context: str) -> list[str]:
    """Sentences of a context joined by single spaces, each ending in a full stop."""
    assert context == context.strip() and "  " not in context
    sentences = re.findall(r"[^.]+\.", context)
    assert " ".join(s.strip() for s in sentences) == context
    return [s.strip() for s in sentences]


def simulate(sentences: list[str]) -> Sim:
    """Replay the story, asserting every action is physically possible."""
    sim = Sim()
    for i, s in enumerate(sentences):
        if m := _MOVE.match(s):
            person, place = m.groups()
            assert sim.loc.get(person) != place, f"{s!r}: moved to where they already are"
            sim.loc[person] = place
            sim.moved_at[person] = i
        elif m := _PICK.match(s):
            person, obj = m.groups()
            assert person in sim.loc, f"{s!r}: picker's location unknown"
            assert obj not in sim.holder, f"{s!r}: {obj} already held"
            assert sim.lies.get(obj, sim.loc[person]) == sim.loc[person], f"{s!r}: not here"
            sim.holder[obj] = person
            sim.picked_at[obj] = i
            sim.lies.pop(obj, None)
            sim.drop_support.pop(obj, None)
        elif m := _DROP.match(s):
            person, obj = m.groups()
            assert sim.holder.get(obj) == person, f"{s!r}: dropped by a non-holder"
            del sim.holder[obj]
            sim.lies[obj] = sim.loc[person]
            sim.drop_support[obj] = [sim.moved_at[person], i]
        else:
            raise AssertionError(f"unparsable sentence {s!r}")
    return sim


def expected(question: str, sim: Sim) -> tuple[str, list[int]]:
    """The answer and supporting indices the re-simulation derives for a question."""
    if m := _WHERE_OBJECT.match(question):
        obj = m.group(1)
        if obj in sim.holder:
            person = sim.holder[obj]
            return sim.loc[person], sorted({sim.picked_at[obj], sim.moved_at[person]})
        assert obj in sim.lies, f"{question!r} is not determined by the story"
        return sim.lies[obj], sorted(sim.drop_support[obj])
    m = _WHERE_PERSON.match(question)
    assert m, f"unparsable question {question!r}"
    person = m.group(1)
    assert person in sim.loc, f"{question!r} is not determined by the story"
    return sim.loc[person], [sim.moved_at[person]]


@pytest.fixture(scope="module", params=["single", "two"])
def generated(request: pytest.FixtureRequest) -> tuple[str, list[tuple[QARecord, list[int]]]]:
    return request.param, generate_babi_with_support(request.param, N, seed=1234)


def test_deterministic_by_seed() -> None:
    for task in ("single", "two"):
        a = generate_babi(task, 50, seed=7)
        assert a == generate_babi(task, 50, seed=7)
        assert a != generate_babi(task, 50, seed=8)
        # A prefix of a longer run is the shorter run.
        assert generate_babi(task, 80, seed=7)[:50] == a
        assert [r for r, _ in generate_babi_with_support(task, 50, seed=7)] == a


def test_answers_match_independent_simulation(generated) -> None:
    task, pairs = generated
    assert len(pairs) == N
    for record, _ in pairs:
        sim = simulate(split_sentences(record.context))
        answer, _ = expected(record.question, sim)
        assert record.answers == [answer], record
        if task == "single":
            assert _WHERE_PERSON.match(record.question)
            assert not sim.holder and not sim.lies
        else:
            assert _WHERE_OBJECT.match(record.question)


def test_supporting_facts(generated) -> None:
    task, pairs = generated
    for record, support in pairs:
        sentences = split_sentences(record.context)
        sim = simulate(sentences)
        assert support == expected(record.question, sim)[1], record
        assert len(support) == (1 if task == "single" else 2)
        assert all(0 <= i < len(sentences) for i in support)
        entity = record.question.removeprefix("Where is ").removeprefix("the ").rstrip("?")
        words = [sentences[i].rstrip(".").split(" ") for i in support]
        naming = [w for w in words if entity in w]
        if task == "single":
            assert naming == words
        else:
            # One fact names the object; the other is a move of the person who handled it.
            assert len(naming) == 1
            other = next(w for w in words if entity not in w)
            assert _MOVE.match(" ".join(other) + ".") and other[0] == naming[0][0]
            assert other[-1] == record.answers[0]


def test_format_lengths_ids_and_vocabulary(generated) -> None:
    task, pairs = generated
    lengths = set()
    for i, (record, _) in enumerate(pairs):
        assert record.id == f"{task}-{i:06d}"
        sentences = split_sentences(record.context)
        lengths.add(len(sentences))
        assert 2 <= len(sentences) <= 8
        assert len(record.answers) == 1 and record.answers[0] in LOCATIONS
        for s in sentences:
            words = s.rstrip(".").split(" ")
            assert words[0] in PEOPLE and words[-1] in LOCATIONS + OBJECTS
    assert lengths == set(range(2, 9))


def test_two_covers_held_moved_and_dropped() -> None:
    kinds = set()
    for record, support in generate_babi_with_support("two", N, seed=1234):
        last = split_sentences(record.context)[support[-1]]
        kinds.add("drop" if _DROP.match(last) else "pick" if _PICK.match(last) else "move")
    # Held-where-picked, held-then-carried elsewhere, and dropped all occur.
    assert kinds == {"drop", "pick", "move"}


def test_splits_disjoint_and_sized() -> None:
    for task in ("single", "two"):
        splits = babi_splits(task, n_train=2000, n_val=300, n_test=300, seed=3)
        assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "val": 300, "test": 300}
        keys = {k: {(r.context, r.question) for r in v} for k, v in splits.items()}
        assert not keys["train"] & keys["val"]
        assert not keys["train"] & keys["test"]
        assert not keys["val"] & keys["test"]
        ids = [r.id for v in splits.values() for r in v]
        assert len(set(ids)) == len(ids)
        assert splits["val"][0].id == f"{task}-val-000000"
        for record in splits["test"][:100]:
            sim = simulate(split_sentences(record.context))
            assert record.answers == [expected(record.question, sim)[0]]
        # Deterministic, and test/val do not depend on n_train.
        again = babi_splits(task, n_train=10, n_val=300, n_test=300, seed=3)
        assert again["test"] == splits["test"] and again["val"] == splits["val"]
        assert again["train"] == splits["train"][:10]


def test_splits_exclude_collisions_in_a_tiny_world() -> None:
    # Two people, two locations, one sentence: only 4 distinct (context, question) modulo verbs.
    splits = babi_splits(
        "single",
        50,
        20,
        20,
        seed=0,
        min_sentences=1,
        max_sentences=2,
        people=("Ann", "Bob"),
        locations=("hall", "yard"),
    )
    keys = {k: {(r.context, r.question) for r in v} for k, v in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


def test_custom_vocabulary() -> None:
    records = generate_babi(
        "two",
        100,
        seed=5,
        people=("Ann", "Bob"),
        locations=("hall", "yard", "loft"),
        objects=("cup",),
        min_sentences=3,
        max_sentences=5,
    )
    for record in records:
        assert record.question == "Where is the cup?"
        assert record.answers[0] in ("hall", "yard", "loft")
        sentences = split_sentences(record.context)
        assert 3 <= len(sentences) <= 5
        assert record.answers == [expected(record.question, simulate(sentences))[0]]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(task="three"),
        dict(task="two", min_sentences=1),
        dict(task="single", min_sentences=0),
        dict(task="single", min_sentences=5, max_sentences=4),
        dict(task="single", locations=("hall",)),
        dict(task="two", objects=()),
        dict(task="single", people=("Ann", "Ann")),
        dict(task="single", locations=("living room", "hall")),
        dict(task="two", objects=("kitchen",)),
        dict(task="single", n=-1),
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    args = dict(task="single", n=3, seed=0) | kwargs
    with pytest.raises(ValueError):
        generate_babi(**args)
