"""Task formats and span masking. Run: python -m pytest tests/tasks/test_formats.py -q"""

from __future__ import annotations

import random

import pytest

from yan_serve.tasks.formats import (
    ANSWER_HEADER,
    TaskFormatter,
    expand_masks,
    mask_runs,
    mask_spans,
    parse_answer,
    split_last_word,
)
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord
from yan_serve.tasks.serving import parse_label
from yan_serve.tokenizer import train_bpe

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Mary went to the kitchen. Where is Mary? kitchen",
] * 30


@pytest.fixture(scope="module")
def fmt() -> TaskFormatter:
    return TaskFormatter(train_bpe(CORPUS, vocab_size=400, min_frequency=1))


@pytest.mark.parametrize("seed", range(20))
def test_mask_spans_collapses_runs_and_keeps_the_rest(seed: int) -> None:
    rng = random.Random(seed)
    ids = [*range(10, 10 + rng.randint(5, 80)), 2]
    src, fills = mask_spans(ids, rng, rate=0.1, max_span=3, mask_id=3, protect=frozenset({2}))
    assert src.count(3) == len(fills) >= 1
    assert src[-1] == 2  # EOS never masked
    # re-expanding every <mask> with its fill gives back the original sequence
    out, k = [], 0
    for t in src:
        if t == 3:
            out += fills[k]
            k += 1
        else:
            out.append(t)
    assert out == ids
    n_masked = sum(len(f) for f in fills)
    assert 1 <= n_masked <= max(1, round(0.1 * len(ids)))


def test_mask_spans_rate_and_span_lengths() -> None:
    rng = random.Random(0)
    total = masked = 0
    spans = []
    for _ in range(300):
        ids = list(range(100, 200))
        _, fills = mask_spans(ids, rng, rate=0.08, max_span=3)
        total += len(ids)
        masked += sum(len(f) for f in fills)
        spans += [len(f) for f in fills]
    assert 0.07 < masked / total <= 0.08
    assert max(spans) <= 6  # adjacent spans may merge into one run; a single span is <= 3
    assert {1, 2, 3} <= set(spans)


def test_split_last_word() -> None:
    assert split_last_word("and the earth.") == ("and the", "earth")
    assert split_last_word("Let there be light: and there was light.") == (
        "Let there be light: and there was", "light")  # fmt: skip
    assert split_last_word("one") is None


def test_formats_end_with_eos_and_hold_the_answer(fmt: TaskFormatter) -> None:
    sp = fmt.sp
    text = TextRecord(CORPUS[0], id="g1")
    inf = fmt.infill(text, random.Random(1))
    assert inf.tgt[-1] == sp.eos and sp.mask in inf.src
    assert fmt.tok.decode(inf.tgt) == CORPUS[0]
    comp = fmt.complete(text)
    assert comp is not None and comp.reference == "earth"
    assert comp.src[-1] == sp.mask and fmt.tok.decode(comp.tgt).strip() == "earth"
    qa = fmt.qa(QARecord("Mary went to the kitchen.", "Where is Mary?", ["kitchen"]))
    assert qa.src[-1] == sp.mask
    full = fmt.tok.decode(qa.tgt)
    assert full.endswith(ANSWER_HEADER + "kitchen") and parse_answer(full) == "kitchen"
    # the QA focus is the answer and its EOS; everything before it is the prompt, copied
    assert qa.focus == list(range(qa.focus[0], len(qa.tgt)))
    assert fmt.tok.decode([qa.tgt[i] for i in qa.focus]).strip() == "kitchen"
    assert qa.tgt[: qa.focus[0]] == qa.src[: qa.focus[0]]
    assert comp.focus == [] and fmt.classify(ClassRecord("x", 1, "law")).focus == []
    cls = fmt.classify(ClassRecord("In the beginning", 1, "law"))
    assert fmt.tok.decode(cls.tgt) == ANSWER_HEADER + "1 law" and cls.reference == "1"


def test_parsers() -> None:
    assert parse_label("####### ANSWER #######\n\n3 wisdom") == 3
    assert parse_label("nothing here") is None
    assert parse_answer("...####### ANSWER #######\n\n garden ") == "garden"


@pytest.mark.parametrize("seed", range(10))
def test_length_slack_pads_with_eos_where_the_server_leaves_room(
    fmt: TaskFormatter, seed: int
) -> None:
    from yan_serve.tasks.formats import SLACK

    rng = random.Random(seed)
    eos = fmt.sp.eos
    text = TextRecord(CORPUS[1], id="g1")
    for ex in (
        fmt.complete(text),
        fmt.classify(ClassRecord("In the beginning", 1, "law")),
        fmt.qa(QARecord("Mary went to the kitchen.", "Where is Mary?", ["kitchen"])),
    ):
        s = fmt.add_slack(ex, rng, max_len=200)
        extra = len(s.tgt) - len(ex.tgt)
        assert 0 <= extra <= SLACK[ex.task]
        assert s.tgt[: len(ex.tgt)] == ex.tgt and s.tgt[len(ex.tgt) :] == [eos] * extra
        assert s.src == ex.src
        assert s.focus == (ex.focus and [*ex.focus, *range(len(ex.tgt), len(s.tgt))])
    inf = fmt.infill(text, rng)
    s = fmt.add_slack(inf, rng, max_len=200)
    # dropping the <pad> filler inside spans gives back the clean target; no EOS before the end
    assert s.tgt[-1] == eos and eos not in s.tgt[:-1]
    assert [t for t in s.tgt if t != fmt.sp.pad] == inf.tgt
    assert len(s.tgt) - len(inf.tgt) <= SLACK["infill"] * len(inf.fills)
    assert fmt.add_slack(inf, rng, max_len=len(inf.tgt)).tgt == inf.tgt  # no room, no slack


@pytest.mark.parametrize("seed", range(20))
def test_per_position_layout_aligns_source_and_target(fmt: TaskFormatter, seed: int) -> None:
    """per_position infill: the same masks as the paper's layout (collapsing each <mask> run gives
    its source back), source and target of one length, and a <mask> exactly where the target
    holds a span's token or its <pad> slack."""
    pp = TaskFormatter(fmt.tok, "per_position")
    sp = fmt.sp
    text = TextRecord(" ".join(CORPUS[:3]), id="g")
    a, b = fmt.infill(text, random.Random(seed)), pp.infill(text, random.Random(seed))
    assert mask_runs(b.src, sp.mask) == a.src and b.fills == a.fills and b.tgt == a.tgt
    assert expand_masks(a.src, [len(f) for f in a.fills], sp.mask) == b.src
    for ex in (b, pp.add_slack(b, random.Random(seed + 1), max_len=200)):
        assert len(ex.src) == len(ex.tgt)
        for s, t in zip(ex.src, ex.tgt, strict=True):
            assert s == t or s == sp.mask
        span_tokens = [t for s, t in zip(ex.src, ex.tgt, strict=True) if s == sp.mask]
        assert [t for t in span_tokens if t != sp.pad] == [t for f in ex.fills for t in f]
    slack = pp.add_slack(b, random.Random(seed + 1), max_len=200)
    same = fmt.add_slack(a, random.Random(seed + 1), max_len=200)
    assert slack.tgt == same.tgt and mask_runs(slack.src, sp.mask) == same.src


@pytest.mark.parametrize("layout", ["collapsed", "per_position"])
@pytest.mark.parametrize("seed", range(10))
def test_infill_focus_marks_the_span_positions(fmt: TaskFormatter, layout: str, seed: int) -> None:
    """`Example.focus` holds exactly the target positions of the spans, slack included, in both
    layouts: the target there is each fill followed by <pad> slack, and elsewhere a copy of the
    unmasked source."""
    f = TaskFormatter(fmt.tok, layout)
    sp = fmt.sp
    text = TextRecord(" ".join(CORPUS[:4]), id="g")
    ex = f.infill(text, random.Random(seed))
    for e in (ex, f.add_slack(ex, random.Random(seed + 1), max_len=200)):
        assert e.focus == sorted(set(e.focus)) and e.focus and e.focus[-1] < len(e.tgt) - 1
        at = [e.tgt[i] for i in e.focus]
        assert [t for t in at if t != sp.pad] == [t for fl in e.fills for t in fl]
        rest = [t for i, t in enumerate(e.tgt) if i not in set(e.focus)]
        assert rest == [t for t in e.src if t != sp.mask]
        assert sp.pad not in rest
        if layout == "per_position":
            assert e.focus == [i for i, t in enumerate(e.src) if t == sp.mask]


def test_unknown_infill_layout_is_refused(fmt: TaskFormatter) -> None:
    with pytest.raises(ValueError, match="infill_masks"):
        TaskFormatter(fmt.tok, "sideways")


@pytest.mark.parametrize("rate", [(0.05, 0.10), (0.3, 0.4)])
def test_infill_rate_sets_the_masked_share(fmt: TaskFormatter, rate: tuple[float, float]) -> None:
    """A formatter's `infill_rate` is the range each passage's masked share is drawn from (the
    budget is rounded per passage, so the share is checked on the mean over many draws)."""
    f = TaskFormatter(fmt.tok, "per_position", infill_rate=rate)
    text = TextRecord(" ".join(CORPUS[:6]), id="r")
    rng = random.Random(0)
    shares = []
    for _ in range(200):
        ex = f.infill(text, rng)
        shares.append(sum(len(fl) for fl in ex.fills) / (len(ex.tgt) - 1))  # EOS is never masked
    mean = sum(shares) / len(shares)
    assert rate[0] - 0.02 <= mean <= rate[1] + 0.02
    assert min(shares) >= rate[0] - 0.03


@pytest.mark.parametrize("rate", [(0.0, 0.1), (0.4, 0.2), (0.5, 1.0)])
def test_a_bad_infill_rate_is_refused(fmt: TaskFormatter, rate: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="infill_rate"):
        TaskFormatter(fmt.tok, infill_rate=rate)
