"""The shipped AR baseline loads, is what its card says, shares the tokenizer of the YAN it was
trained beside (yan-mamba-tiny-kjv and the default before 2026-11-27) and YAN's size, and
fills held-out passages the way its eval reports (fill-in-the-middle).

Run: python -m pytest tests/test_ar_checkpoint.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from yan_serve.ar.evaluate import fim_text
from yan_serve.ar.generate import ARRequest, ar_generate
from yan_serve.ar.model import load_ar
from yan_serve.tasks import metrics
from yan_serve.tasks.formats import TaskFormatter
from yan_serve.tasks.records import TextRecord
from yan_serve.tokenizer import YANTokenizer
from yan_serve.weights import is_ar_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "weights" / "ar-tiny-kjv"
YAN = ROOT / "weights" / "yan-tiny-kjv"
# trained beside the AR on the same passages-only tokenizer (the default since has its own)
TWIN = ROOT / "weights" / "yan-mamba-tiny-kjv"

# Held-out test books (Ruth, Ecclesiastes, Jonah, James).
PASSAGES = [
    "And Ruth said, Intreat me not to leave thee, or to return from following after thee: "
    "for whither thou goest, I will go; and where thou lodgest, I will lodge:",
    "Vanity of vanities, saith the Preacher, vanity of vanities; all is vanity.",
    "To every thing there is a season, and a time to every purpose under the heaven:",
    "One generation passeth away, and another generation cometh: but the earth abideth for ever.",
    "Cast thy bread upon the waters: for thou shalt find it after many days.",
    "Now the word of the LORD came unto Jonah the son of Amittai, saying,",
    "Then Jonah prayed unto the LORD his God out of the fish's belly,",
    "But be ye doers of the word, and not hearers only, deceiving your own selves.",
    "Draw nigh to God, and he will draw nigh to you.",
    "My brethren, count it all joy when ye fall into divers temptations;",
]


@pytest.fixture(scope="module")
def loaded():
    return load_ar(CKPT), YANTokenizer.load(CKPT)


def test_files_size_tokenizer_and_card(loaded) -> None:
    model, _ = loaded
    assert is_ar_checkpoint(CKPT)
    assert sum(f.stat().st_size for f in CKPT.iterdir()) < 30 * 2**20
    n = model.num_parameters()
    assert n == 4_341_120 and abs(n - 4_345_988) / 4_345_988 < 0.10  # within 10% of YAN's
    # the very tokenizer of the YANs trained beside it: same vocabulary, same ids
    assert (CKPT / "tokenizer.json").read_bytes() == (TWIN / "tokenizer.json").read_bytes()
    # the default's has the same size and special ids (so the same parameter count)
    yan_tok, ar_tok = YANTokenizer.load(YAN), YANTokenizer.load(CKPT)
    assert (yan_tok.vocab_size, yan_tok.special) == (ar_tok.vocab_size, ar_tok.special)
    assert json.loads((CKPT / "labels.json").read_text()) == json.loads(
        (YAN / "labels.json").read_text()
    )
    card = (CKPT / "README.md").read_text()
    results = {r["task"]: r for r in json.loads((CKPT / "eval.json").read_text())["results"]}
    assert set(results) >= {"infill", "infill-fim", "complete", "qa", "classify", "classify-scored"}
    for task, key in (("infill", "rouge1"), ("infill-fim", "rouge1"), ("complete", "exact_match"),
                      ("classify-scored", "accuracy")):  # fmt: skip
        assert f"{results[task]['scores'][key]:.1f}" in card, task  # the card quotes yan eval


def test_fill_in_the_middle_recovers_held_out_passages(loaded) -> None:
    """The known text is kept and most answers are in the trained `fill <mask> ... <eos>` format
    (the fills themselves are mostly wrong, as the card says). Not all: the prompt does not say
    which infill target is wanted, and the model sometimes regenerates the passage instead (the
    card measures how often)."""
    model, tok = loaded
    fmt = TaskFormatter(tok)
    sp = tok.special
    exs = [fmt.infill(TextRecord(p), random.Random(i)) for i, p in enumerate(PASSAGES)]
    reqs = [ARRequest([*e.src, sp.bos], len(e.fills) + sum(map(len, e.fills)) + 1) for e in exs]
    outs = ar_generate(model, reqs, sp.eos, sp.pad)
    filled = [fim_text(tok, e, o.tokens) for e, o in zip(exs, outs, strict=True)]
    assert metrics.rouge(filled, PASSAGES)["rouge1"] > 80
    assert all(o.tokens for o in outs)
    closed = sum(sp.mask in o.tokens for o in outs)  # spans closed by <mask>, as trained
    assert closed > len(outs) / 2, f"{closed} of {len(outs)} answers in the FIM format"
