"""scripts/masked_token_probe.py on a few passages: its whole-model row is `yan eval`'s span
accuracy on the same examples, it counts every masked token once, and it refuses what it cannot
probe with one readable line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import load_script
from yan_serve.tasks.corpus import load_corpus
from yan_serve.tasks.evaluate import evaluate, task_examples
from yan_serve.weights import from_pretrained, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "weights" / "yan-tiny-kjv"
PASSAGES = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "The LORD is my shepherd; I shall not want.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
]


def _corpus(path: Path) -> Path:
    for split in ("train", "test"):
        rows = "".join(json.dumps({"text": t}) + "\n" for t in PASSAGES)
        (path / f"{split}.jsonl").write_text(rows)
    return path


def test_the_model_row_is_eval_span_accuracy(tmp_path: Path, capsys) -> None:
    mod = load_script("masked_token_probe")
    data = _corpus(tmp_path)
    r = mod.probe(str(CKPT), str(data), "test", steps=2, limit=None, batch_size=3)
    model = from_pretrained(CKPT)
    tok = load_tokenizer(CKPT, model.config)
    corpus = load_corpus(data, splits=("test",))
    exs = task_examples(corpus, tok, "infill", "test", None, model.config.max_length,
                        infill_masks=model.config.infill_masks)  # fmt: skip
    assert r["masked"] == sum(len(e.focus) for e in exs) > 0
    (res,) = [x for x in evaluate(model, tok, corpus, tasks=("infill",), steps_list=(2,))
              if x.task == "infill"]  # fmt: skip
    assert abs(r["model"] - res.scores["span_acc"]) < 1e-9
    assert all(0.0 <= r[k] <= 100.0 for k in ("model", "autoencoder", "prior"))
    assert mod.main(["--model", str(CKPT), "--data", str(data), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"of {r['masked']} masked tokens" in out
    assert len(re.findall(r"\d+\.\d%", out)) == 3


def test_it_refuses_a_missing_corpus_and_an_ar_checkpoint(tmp_path: Path, capsys) -> None:
    mod = load_script("masked_token_probe")
    assert mod.main(["--data", str(tmp_path / "missing")]) == 2
    assert "no " in capsys.readouterr().err
    ar = ["--model", str(ROOT / "weights" / "ar-tiny-kjv"), "--data", str(_corpus(tmp_path))]
    assert mod.main(ar) == 2
    assert "AR checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps: expected a positive integer, got '0'"),
        (["--limit", "0"], "--limit: expected a positive integer, got '0'"),
        (["--limit", "-1"], "--limit: expected a positive integer, got '-1'"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    mod = load_script("masked_token_probe")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--data", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_end_in_one_line(tmp_path: Path, capsys) -> None:
    mod = load_script("masked_token_probe")
    data = _corpus(tmp_path)
    (data / "empty.jsonl").write_text("")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    for argv, message in [
        (["--model", "/nonexistent"], "no checkpoint directory /nonexistent"),
        (["--model", str(tmp_path / "ckpt")], f"cannot load {tmp_path / 'ckpt'}"),
        (["--model", str(CKPT), "--split", "empty"], "empty.jsonl holds no passages"),
    ]:
        assert mod.main([*argv, "--data", str(data)]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("masked_token_probe: error: ") and message in err, err
    assert mod.DEFAULT_MODEL == CKPT  # not relative to wherever it runs


def test_limit_caps_the_passages(tmp_path: Path) -> None:
    mod = load_script("masked_token_probe")
    data = _corpus(tmp_path)
    one = mod.probe(str(CKPT), str(data), "test", steps=2, limit=1)
    every = mod.probe(str(CKPT), str(data), "test", steps=2, limit=None)
    assert 0 < one["masked"] < every["masked"]
