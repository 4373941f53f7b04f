"""The shipped YAN checkpoints (the server's default yan-small-kjv; yan-tiny-kjv, the one the HTTP
tests serve, and the Mamba yan-mamba-tiny-kjv) load, are what their cards say, and work on every
task format.

Run: python -m pytest tests/test_default_checkpoint.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.tasks import metrics
from yan_serve.tasks.formats import TaskFormatter
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord
from yan_serve.weights import from_pretrained, load_tokenizer

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
# directory -> (config name, exact parameter count, MiB the directory stays under: bf16 weights)
SHIPPED = {
    "yan-small-kjv": ("yan-small", 19_251_718, 50),
    "yan-tiny-kjv": ("yan-tiny", 4_345_988, 30),
    "yan-mamba-tiny-kjv": ("yan-mamba-tiny", 5_346_948, 30),
}

# Ruth 1:16-17 is in the test split (held-out book).
PASSAGES = [
    "And Ruth said, Intreat me not to leave thee, or to return from following after thee: "
    "for whither thou goest, I will go; and where thou lodgest, I will lodge:",
    "Vanity of vanities, saith the Preacher, vanity of vanities; all is vanity.",
    "To every thing there is a season, and a time to every purpose under the heaven:",
]


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def loaded(request):
    ckpt = WEIGHTS / request.param
    model = from_pretrained(ckpt)
    return model, load_tokenizer(ckpt, model.config), ckpt


def test_files_size_and_config(loaded) -> None:
    model, tok, ckpt = loaded
    name, params, mib = SHIPPED[ckpt.name]
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < mib * 2**20
    assert (model.config.name, model.num_parameters()) == (name, params)
    mamba = model.config.name == "yan-mamba-tiny"
    assert model.config.encoder_use_mamba is mamba and model.config.flow_use_mamba is mamba
    assert (tok.special.pad, tok.special.eos, tok.special.mask) == (0, 2, 3)
    card = (ckpt / "README.md").read_text()
    results = json.loads((ckpt / "eval.json").read_text())["results"]
    infill3 = next(r for r in results if r["task"] == "infill" and r["steps"] == 3)
    assert f"{infill3['scores']['rouge1']:.1f}" in card  # the card quotes yan eval's output


def test_infill_recovers_held_out_passages(loaded) -> None:
    """Well above chance, as the cards' ROUGE-1 of 70+ says (a random model scores < 15)."""
    model, tok, _ = loaded
    fmt = TaskFormatter(tok, model.config.infill_masks)
    exs = [fmt.infill(TextRecord(p), random.Random(i)) for i, p in enumerate(PASSAGES)]
    gens = Sampler(model).generate(
        [GenerationRequest(e.src, len(e.tgt), seed=i) for i, e in enumerate(exs)], routing="argmax"
    )
    scores = metrics.rouge([tok.decode(g.tokens) for g in gens], PASSAGES)
    assert scores["rouge1"] > 50, scores


def test_every_task_format_runs(loaded) -> None:
    model, tok, _ = loaded
    fmt = TaskFormatter(tok)
    exs = [
        fmt.complete(TextRecord(PASSAGES[1])),
        fmt.qa(QARecord("Mary went to the garden.", "Where is Mary?", ["garden"])),
        fmt.classify(ClassRecord(PASSAGES[2], 3, "wisdom")),
    ]
    gens = Sampler(model).generate([GenerationRequest(e.src, len(e.tgt)) for e in exs])
    for e, g in zip(exs, gens, strict=True):
        assert 0 < len(g.tokens) <= len(e.tgt)
        assert all(0 <= t < model.config.vocab_size for t in g.tokens)
