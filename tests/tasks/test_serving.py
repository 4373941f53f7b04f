"""Serving task formats: target lengths from the request, known text kept, answers read out."""

from __future__ import annotations

import pytest

from yan_serve.tasks import serving as T
from yan_serve.tasks.formats import ANSWER_HEADER
from yan_serve.tokenizer import YANTokenizer, train_bpe

TEXT = [
    "In the beginning God created the heaven and the earth. " * 3,
    "And the earth was without form, and void; and darkness was upon the deep.",
] * 20


@pytest.fixture(scope="module")
def tok() -> YANTokenizer:
    return train_bpe(TEXT, vocab_size=300)


def test_infill_plan_sizes_each_span_from_its_budget(tok: YANTokenizer) -> None:
    text = "In the beginning [MASK:3] the heaven and the [MASK]."
    p = T.plan_infill(tok, text, max_length=200, span_tokens=2)
    assert p.src.count(tok.special.mask) == 2
    known = sum(len(x) for x in p.pieces)
    assert p.tgt_len == known + 3 + 2 + 1
    (a0, a1), (b0, b1) = p.fill_slots
    assert a1 - a0 == 3 and b1 - b0 == 2 and a0 == len(p.pieces[0])
    assert b0 == a1 + len(p.pieces[1])


def test_finish_infill_keeps_the_known_text_and_drops_specials(tok: YANTokenizer) -> None:
    p = T.plan_infill(tok, "In the beginning [MASK:2] the heaven.", max_length=200)
    fill = tok.encode(" God")
    row = [7] * p.tgt_len
    a, b = p.fill_slots[0]
    row[a:b] = (fill + [tok.special.eos] * 2)[: b - a]
    text, fills = T.finish_infill(tok, p, row)
    assert text == "In the beginning God the heaven."
    assert fills == [" God"]


def test_infill_confidence_is_per_fill_and_their_mean(tok: YANTokenizer) -> None:
    p = T.plan_infill(tok, "In [MASK:2] beginning [MASK:2] the heaven.", max_length=200)
    (a0, _), _ = p.fill_slots
    row = [tok.special.pad] * p.tgt_len
    conf = [0.9] * p.tgt_len
    row[a0], conf[a0] = 11, 0.5  # one content token in the first fill, the second left empty
    per_fill, mean = T.infill_confidence(p, row, conf, set(tok.special.ids()))
    assert per_fill == [0.5, 0.0] and mean == pytest.approx(0.25)


def test_plans_reject_what_the_model_cannot_serve(tok: YANTokenizer) -> None:
    with pytest.raises(T.PlanError, match="MASK"):
        T.plan_infill(tok, "nothing masked", 100)
    with pytest.raises(T.PlanError, match="budget"):
        T.plan_infill(tok, "a [MASK:99] b", 500)
    with pytest.raises(T.PlanError, match="source tokens"):
        T.plan_infill(tok, "In the beginning " * 40 + "[MASK]", 50)
    with pytest.raises(T.PlanError, match="target positions"):
        T.plan_complete(tok, "In the", max_tokens=60, max_length=50)
    with pytest.raises(T.PlanError, match="empty"):
        T.plan_qa(tok, "ctx", " ", 4, 100)


def test_span_budgets_are_ascii_digits_and_never_overflow(tok: YANTokenizer) -> None:
    # leading zeros are the same budget
    assert T.plan_infill(tok, "a [MASK:007] b", 100).fill_slots == \
        T.plan_infill(tok, "a [MASK:7] b", 100).fill_slots  # fmt: skip
    # thousands of digits: a PlanError naming the budget, not int()'s ValueError; thousands
    # of leading zeros: still the budget after them
    with pytest.raises(T.PlanError, match=r"\[MASK:100000\.\.\. \(5001 digits\)\]"):
        T.plan_infill(tok, "a [MASK:1" + "0" * 5000 + "] b", 100)
    zeros = T.plan_infill(tok, "a [MASK:" + "0" * 5000 + "1] b", 100)
    assert [b - a for a, b in zeros.fill_slots] == [1]
    with pytest.raises(T.PlanError, match=r"\[MASK:0\]"):
        T.plan_infill(tok, "a [MASK:0] b", 100)
    for bad in (-2, 0, 65):  # a bare [MASK]'s default budget is held to the same range
        with pytest.raises(T.PlanError, match=f"span budget {bad}: must be between 1 and 64"):
            T.plan_infill(tok, "a [MASK] b", 100, span_tokens=bad)
    # only ASCII digits make a budget (as the server's request schema): "[MASK:٣]" is text
    with pytest.raises(T.PlanError, match="no \\[MASK\\] placeholder"):
        T.plan_infill(tok, "a [MASK:\u0663] b", 100)
    p = T.plan_infill(tok, "a [MASK:\u0663] b [MASK]", 100, span_tokens=2)
    assert len(p.fill_slots) == 1 and p.fill_slots[0][1] - p.fill_slots[0][0] == 2


def test_special_token_strings_in_text_are_plain_text(tok: YANTokenizer) -> None:
    text = "Use <eos> and <pad> tags: <mask> and <bos> [MASK] done."
    p = T.plan_infill(tok, text, 200)
    known = [t for piece in p.pieces for t in piece]
    assert not set(known) & set(tok.special.ids())
    row = [tok.special.pad] * p.tgt_len
    assert T.finish_infill(tok, p, row)[0] == "Use <eos> and <pad> tags: <mask> and <bos> done."


def test_complete_respects_max_tokens(tok: YANTokenizer) -> None:
    p = T.plan_complete(tok, "In the", max_tokens=4, max_length=100)
    assert p.tgt_len == 5 and p.src[-1] == tok.special.mask
    assert T.finish_complete(p, [9, 9], True) == ([9, 9], "stop")
    assert T.finish_complete(p, [9] * 4, True) == ([9] * 4, "stop")
    assert T.finish_complete(p, [9] * 5, False) == ([9] * 4, "length")


def test_answers_are_read_after_the_known_prefix(tok: YANTokenizer) -> None:
    p = T.plan_classify(tok, "In the beginning", max_tokens=3, max_length=100)
    assert p.answer_start == len(tok.encode(ANSWER_HEADER))
    row = [5] * p.answer_start + tok.encode("2 earth") + [tok.special.eos] + [8] * 5
    assert tok.decode(T.answer_tokens(tok, p, row)) == "2 earth"
    assert T.parse_class("2 earth", {2: "history"}) == ("history", 2)
    assert T.parse_class("9 earth", {2: "history"}) == ("earth", 9)
    assert T.parse_class("none", None) == ("none", None)


def test_label_targets_use_the_checkpoint_label_table(tok: YANTokenizer) -> None:
    t = T.label_target(tok, "History", {2: "history"})
    assert tok.decode(t) == ANSWER_HEADER + "2 history"
    assert t[-1] == tok.special.eos
    assert tok.decode(T.label_target(tok, "earth", {2: "history"})) == ANSWER_HEADER + "earth"


def test_plan_from_a_training_source_matches_the_text_plan(tok: YANTokenizer) -> None:
    sp = tok.special
    p = T.plan_infill(tok, "In the beginning [MASK] the heaven and the [MASK].", 200)
    q = T.infill_plan_from_source(p.src, 2, sp.mask, sp.eos)
    assert (q.src, q.tgt_len, q.pieces, q.fill_slots) == (p.src, p.tgt_len, p.pieces, p.fill_slots)


def test_infill_source_ends_with_eos_as_training_sources_do(tok: YANTokenizer) -> None:
    """Training masks the clean text + EOS, so its sources end with EOS; the served source must
    too (a source without it is one the model never saw)."""
    from yan_serve.tasks.formats import TaskFormatter
    from yan_serve.tasks.records import TextRecord

    sp = tok.special
    for layout in ("collapsed", "per_position"):
        p = T.plan_infill(tok, "In the beginning [MASK] the heaven.", 200, infill_masks=layout)
        ex = TaskFormatter(tok, layout).infill(TextRecord("In the beginning God created"),
                                               __import__("random").Random(0))  # fmt: skip
        assert p.src[-1] == sp.eos and ex.src[-1] == sp.eos


def test_per_position_plan_marks_every_target_position_of_a_span(tok: YANTokenizer) -> None:
    """per_position: source and target align; span i is `budget_i` <mask>s at its own slot."""
    sp = tok.special
    text = "In the beginning [MASK:3] the heaven and the [MASK]."
    c = T.plan_infill(tok, text, 200, span_tokens=2)
    p = T.plan_infill(tok, text, 200, span_tokens=2, infill_masks="per_position")
    assert (p.tgt_len, p.pieces, p.fill_slots) == (c.tgt_len, c.pieces, c.fill_slots)
    assert len(p.src) == p.tgt_len and p.src.count(sp.mask) == 3 + 2
    masked = {i for i, t in enumerate(p.src) if t == sp.mask}
    assert masked == {i for a, b in p.fill_slots for i in range(a, b)}
    with pytest.raises(T.PlanError, match="with its span budgets"):  # budgets fill the source
        T.plan_infill(
            tok, "In the beginning [MASK:40] the heaven.", 40, infill_masks="per_position"
        )
    q = T.infill_plan_from_source(p.src, 2, sp.mask, sp.eos, "per_position")
    assert q.pieces == p.pieces and [b - a for a, b in q.fill_slots] == [2, 2]


def test_label_parsing_prefers_a_known_name_and_scoring_targets_share_a_length(
    tok: YANTokenizer,
) -> None:
    from yan_serve.tasks.serving import parse_label

    names = {1: "law", 2: "history"}
    assert parse_label("####### ANSWER #######\n\n1 history", names) == 2  # name beats the id
    assert parse_label("####### ANSWER #######\n\n1 histor", names) == 1  # else the id
    assert parse_label("####### ANSWER #######\n\n1 history") == 1  # no table: the id
    assert T.parse_class("1 history", names) == ("history", 2)
    padded = T.pad_targets([[5, 2], [5, 6, 7, 2]], eos=2)
    assert padded == [[5, 2, 2, 2], [5, 6, 7, 2]]
