"""Corpus directories and dataset import. Run: python -m pytest tests/train/test_recipes.py -q"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from yan_serve.tasks.corpus import import_dataset, load_corpus


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_corpus_rows_feed_the_right_tasks(tmp_path) -> None:
    rows = [
        {"text": "a passage", "id": "1"},
        {"text": "a labelled doc", "label": 3, "label_name": "Business"},
        {"context": "Mary went home.", "question": "Where is Mary?", "answers": ["home"]},
    ]
    for s in ("train", "val"):
        _write(tmp_path / f"{s}.jsonl", rows)
    c = load_corpus(tmp_path)
    assert [r.text for r in c.text["train"]] == ["a passage", "a labelled doc"]
    assert [(r.label, r.label_name) for r in c.classes["train"]] == [(3, "Business")]
    assert c.qa["val"][0].answers == ["home"]  # own QA rows: no bAbI stories mixed in
    _write(tmp_path / "train.jsonl", rows[:1])
    _write(tmp_path / "val.jsonl", rows[:1])
    assert len(load_corpus(tmp_path, babi_sizes=(10, 5, 5)).qa["train"]) == 20  # bAbI fallback


def test_bad_corpus_rows_are_named(tmp_path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    (tmp_path / "val.jsonl").write_text('{"text": "ok"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2"):
        load_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")


def test_import_a_sst2_directory_and_cli(tmp_path) -> None:
    d = tmp_path / "sst2"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\ngood film \t1\nbad film \t0\n")
    (d / "dev.tsv").write_text("sentence\tlabel\nfine film \t1\n")
    counts = import_dataset("sst2", d, tmp_path / "out")
    assert counts == {"train": 2, "val": 1}
    c = load_corpus(tmp_path / "out", babi_sizes=(2, 1, 1))
    assert [(r.label, r.label_name) for r in c.classes["train"]] == [
        (1, "positive"),
        (0, "negative"),
    ]
    cli = [sys.executable, "-m", "yan_serve.cli", "data", "import"]
    r = subprocess.run([*cli, "sst2", str(d), "--out", str(tmp_path / "o2")], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0 and "train 2, val 1" in r.stdout
    bad = subprocess.run([*cli, "nope", str(d), "--out", str(tmp_path / "o3")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown dataset" in bad.stderr


def test_the_bpe_learns_the_qa_answers_it_must_write(tmp_path) -> None:
    """`yan data tokenizer` (and stage 1 without --tokenizer) trains the BPE on the training
    passages and the QA stories with their answers, so an answer word that the passages never
    spell becomes fewer pieces than under a passages-only BPE."""
    from yan_serve.tasks.serving import QA_TEMPLATE
    from yan_serve.tokenizer import YANTokenizer, train_bpe
    from yan_serve.train.recipes import tokenizer_texts

    passages = [{"text": f"And the king said unto the prophet, go up number {i}."}
                for i in range(60)]  # fmt: skip
    story = "Mary went to the bathroom. John went to the garden {}."
    stories = [{"context": story.format(i), "question": "Where is Mary?",
                "answers": ["bathroom"]} for i in range(60)]  # fmt: skip
    for s in ("train", "val"):
        _write(tmp_path / f"{s}.jsonl", passages + stories)
    corpus = load_corpus(tmp_path)
    texts = list(tokenizer_texts(corpus))
    assert texts[: len(passages)] == [p["text"] for p in passages]
    assert texts[len(passages) :] == [
        QA_TEMPLATE.format(ctx=s["context"], q=s["question"]) + "bathroom" for s in stories
    ]
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, "-m", "yan_serve.cli", "data", "tokenizer", "--data",
                        str(tmp_path), "--out", str(out), "--vocab-size", "320"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    shared = YANTokenizer.load(out)
    passages_only = train_bpe([p["text"] for p in passages], vocab_size=320)
    assert len(shared.encode("bathroom")) < len(passages_only.encode("bathroom"))
    bad = subprocess.run([sys.executable, "-m", "yan_serve.cli", "data", "tokenizer", "--data",
                          str(tmp_path / "missing"), "--out", str(out)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_babi_stories_do_not_depend_on_the_training_seed(tmp_path, monkeypatch) -> None:
    """The generated bAbI corpus is one fixed set of disjoint splits: `yan train --seed` orders
    the batches but draws no other stories, so a run with seed 1 trains on the same QA stories
    as one with seed 0, none of them a `yan eval` test item (a per-seed corpus put some of the
    seed-0 test items into seed 1's training stories)."""
    import yan_serve.tasks.corpus as corpus_mod
    from yan_serve.cli import main

    for s in ("train", "val", "test"):
        _write(tmp_path / f"{s}.jsonl", [{"text": f"In the beginning {i}."} for i in range(8)])
    loaded = []

    def load(*a, **k):  # what `yan train` reads, then stop before any training
        loaded.append(load_corpus(*a, **k))
        raise ValueError("stop here")

    monkeypatch.setattr(corpus_mod, "load_corpus", load)
    for seed in ("0", "1"):
        out = tmp_path / f"out{seed}"
        assert main(["train", "stage1", "--data", str(tmp_path), "--out", str(out),
                     "--seed", seed]) == 2  # fmt: skip
    a, b = ([(r.context, r.question, tuple(r.answers)) for r in c.qa["train"]] for c in loaded)
    assert a == b and len(a) == 8000
    monkeypatch.undo()
    test = load_corpus(tmp_path, splits=("test",)).qa["test"]  # what `yan eval` reads
    assert len(test) == 600
    assert not {(r.context, r.question) for r in test} & {(c, q) for c, q, _ in b}


@pytest.mark.parametrize("layout", ["collapsed", "per_position"])
def test_stage1_corrupts_in_the_models_infill_layout(tmp_path, layout) -> None:
    """Stage 1 writes each masked run as the model's config says its infill sources mark spans:
    one <mask> per run (the paper), or one per masked token, the source then aligned with the
    target position by position, as the per-position fill stage and the server write it."""
    from tests.conftest import micro_config
    from yan_serve.model import YAN
    from yan_serve.tokenizer import train_bpe
    from yan_serve.train.recipes import config_for_tokenizer, stage_batches

    rows = [{"text": f"And the king said unto the prophet, go up to the house number {i}, "
                     f"and speak unto the people of the land all these words."}
            for i in range(40)]  # fmt: skip
    for s in ("train", "val"):
        _write(tmp_path / f"{s}.jsonl", rows)
    tok = train_bpe([r["text"] for r in rows], vocab_size=300, min_frequency=1)
    cfg = config_for_tokenizer(micro_config(vocab_size=300, max_length=64), tok)
    cfg.infill_masks = layout
    mask, pad = tok.special.mask, tok.special.pad
    stream = stage_batches("stage1", load_corpus(tmp_path), tok, YAN(cfg), "train", 8, seed=0)
    adjacent = shifted = 0
    for _ in range(4):
        b = next(stream)
        for src, tgt, valid in zip(b.src, b.tgt, b.tgt_mask, strict=True):
            src, tgt = src[valid].tolist(), tgt[valid].tolist()
            masked = [i for i, t in enumerate(src) if t == mask]
            assert masked
            adjacent += sum(src[i - 1] == mask for i in masked if i > 0)
            shifted += src[-1] == pad  # a collapsed run shortens the source
            if layout == "per_position":
                assert all(s == t for s, t in zip(src, tgt, strict=True) if s != mask)
    if layout == "per_position":
        assert adjacent > 0 and shifted == 0
    else:
        assert adjacent == 0 and shifted > 0
