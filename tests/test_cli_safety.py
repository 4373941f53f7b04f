"""`yan` never destroys what is already on disk and refuses bad arguments before it works: an
existing checkpoint or run as `yan train --out`, a corpus that an import or a failed build would
overwrite, a training run as an export target, output files it could not write at the end.

Run: python -m pytest tests/test_cli_safety.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import micro_config
from yan_serve.cli import main

ROWS = [{"text": f"In the beginning God created the heaven and the earth {i}."} for i in range(40)]


def _corpus(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yan "), err
    for n in needles:
        assert n in err, err
    return err


def _micro_json(tmp_path: Path) -> Path:
    p = tmp_path / "micro.json"
    p.write_text(json.dumps(micro_config(vocab_size=300, max_length=64).to_dict()))
    return p


def test_train_refuses_an_out_that_holds_a_checkpoint(tmp_path: Path, capsys) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "model.safetensors").write_bytes(b"weights")
    base = ["train", "stage1", "--data", str(tmp_path / "any"), "--out", str(shipped)]
    assert main(base) == 2
    _one_line_error(capsys, "already holds files (model.safetensors", "--overwrite")
    # --resume without a run saved there: refused too, not started afresh over the files
    assert main([*base, "--resume"]) == 2
    _one_line_error(capsys, "no run to resume")
    assert (shipped / "model.safetensors").read_bytes() == b"weights"
    (tmp_path / "a_file").write_text("x")
    assert main(["train", "stage1", "--data", "d", "--out", str(tmp_path / "a_file")]) == 2
    _one_line_error(capsys, "is a file, not a directory")


def test_overwrite_starts_afresh_and_resume_continues(tmp_path: Path, capsys) -> None:
    data, out = _corpus(tmp_path / "c"), tmp_path / "run"
    out.mkdir()
    (out / "training_log_stage1.jsonl").write_text('{"stale": true}\n')
    (out / "notes.txt").write_text("kept")
    run = ["train", "stage1", "--data", str(data), "--out", str(out), "--config",
           str(_micro_json(tmp_path)), "--batch-size", "2", "--warmup", "0", "--log-every", "1",
           "--eval-every", "2", "--eval-batches", "1", "--save-every", "2"]  # fmt: skip
    assert main([*run, "--steps", "2", "--overwrite"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 2 and (out / "notes.txt").read_text() == "kept"
    logs = "".join(p.read_text() for p in out.glob("training_log*.jsonl"))
    assert "stale" not in logs and '"step": 2' in logs
    # a saved run: --resume continues it (no --overwrite needed), without --resume it is refused
    assert main([*run, "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    capsys.readouterr()
    assert main([*run, "--steps", "4"]) == 2
    _one_line_error(capsys, "holds a saved run: --resume continues it")
    # an unreadable trainer state is named, not a KeyError
    (out / "trainer_state.json").write_text("{}")
    assert main([*run, "--steps", "4", "--resume"]) == 2
    _one_line_error(capsys, "is not a trainer state")


def test_set_overrides_a_fresh_models_config_only(tmp_path: Path, capsys) -> None:
    data, out = _corpus(tmp_path / "c"), tmp_path / "run"
    run = ["train", "stage1", "--data", str(data), "--out", str(out), "--config",
           str(_micro_json(tmp_path)), "--batch-size", "2", "--warmup", "0", "--steps", "1",
           "--eval-every", "1", "--eval-batches", "1"]  # fmt: skip
    # a value is checked as config.json's would be, before any work
    assert main([*run, "--set", "dropout=1"]) == 2
    _one_line_error(capsys, "dropout must be in [0, 1)")
    assert main([*run, "--set", "moe_sigma=wide"]) == 2
    _one_line_error(capsys, "moe_sigma")
    assert not out.exists()
    assert main([*run, "--set", "dropout=0.25", "--set", "moe_sigma=1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["dropout"], cfg["moe_sigma"]) == (0.25, 1)
    assert cfg["d_model"] == micro_config().d_model  # the rest as the config file says
    capsys.readouterr()
    later = ["train", "stage2", "--data", str(data), "--out", str(tmp_path / "s2"), "--init",
             str(out), "--steps", "1", "--set", "dropout=0"]  # fmt: skip
    assert main(later) == 2
    _one_line_error(capsys, "--set", "stage1 only, not stage2")
    assert not (tmp_path / "s2").exists()


@pytest.mark.parametrize(
    "flags",
    [["--log-every", "0"], ["--save-every", "0"], ["--eval-every", "-1"], ["--lr", "inf"],
     ["--lr", "nan"], ["--grad-clip", "-1"], ["--max-minutes", "-1"], ["--warmup", "-5"],
     ["--slack", "5"], ["--steps", "abc"], ["--prefetch", "-1"], ["--set", "dropout"],
     ["--set", "no_such_field=1"], ["--tasks", "infill,qa:0"], ["--tasks", "qa:x"],
     ["--tasks", "qa:"], ["--tasks", "infill,,qa"]],
    ids=lambda f: "".join(f),
)  # fmt: skip
def test_training_flags_are_checked_when_parsed(tmp_path: Path, capsys, flags) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "stage1", "--data", "d", "--out", str(tmp_path / "o"), *flags])
    assert exc.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv",
    [["eval", "ckpt", "--data", "d", "--limit", "0"],
     ["eval", "ckpt", "--data", "d", "--steps", "0"],
     ["eval", "ckpt", "--data", "d", "--steps", "abc"],
     ["eval", "ckpt", "--data", "d", "--batch-size", "0"],
     ["eval", "ckpt", "--data", "d", "--diversity", "-2"],
     ["generate", "ckpt", "--text", "a [MASK]", "--max-tokens", "0"],
     ["data", "tokenizer", "--data", "d", "--out", "o", "--vocab-size", "0"],
     ["data", "english", "--out", "o", "--sources", ""],
     ["data", "kjv", "--out", "o", "--max-words", "0"]],
    ids=lambda a: " ".join(a[:1] + a[-2:]),
)  # fmt: skip
def test_other_flags_are_checked_when_parsed(argv) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_output_files_are_checked_before_the_work(tmp_path: Path, capsys) -> None:
    # the checkpoint does not exist: the output is refused first, so the work never starts
    assert main(["eval", "nockpt", "--data", "d", "--json", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")
    assert main(["eval", "nockpt", "--data", "d", "--json", str(tmp_path / "no" / "x.json")]) == 2
    _one_line_error(capsys, "no directory")
    assert main(["compare", "x", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")


def test_data_import_and_builds_never_lose_a_corpus(tmp_path: Path, capsys) -> None:
    corpus = _corpus(tmp_path / "corpus")
    train = (corpus / "train.jsonl").read_text()
    # one file is one split, written as test: the corpus's train split stays
    (tmp_path / "two.txt").write_text("A first story.\n\nA second story.\n")
    assert main(["data", "import", "text", str(tmp_path / "two.txt"), "--out", str(corpus)]) == 0
    assert (corpus / "train.jsonl").read_text() == train
    assert len((corpus / "test.jsonl").read_text().splitlines()) == 2
    # a KJV source without verses is refused, the corpus left as it was
    (tmp_path / "empty.txt").write_text("")
    assert main(["data", "kjv", "--out", str(corpus), "--source", str(tmp_path / "empty.txt")]) == 2
    _one_line_error(capsys, "no KJV verses")
    assert (corpus / "train.jsonl").read_text() == train
    assert not list(corpus.glob(".*part"))
    # a tokenizer needs text to train on
    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    for split in ("train", "val"):
        (empty / f"{split}.jsonl").write_text("")
    assert main(["data", "tokenizer", "--data", str(empty), "--out", str(tmp_path / "tok")]) == 2
    _one_line_error(capsys, "no training text")
    assert not (tmp_path / "tok").exists()


def test_rows_that_are_not_objects_are_named(tmp_path: Path) -> None:
    from yan_serve.tasks.corpus import read_jsonl

    (tmp_path / "train.jsonl").write_text('{"text": "ok"}\n5\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2 is not a JSON object"):
        read_jsonl(tmp_path / "train.jsonl")


def test_generate_names_an_ar_checkpoint_and_params_a_bad_config(tmp_path: Path, capsys) -> None:
    ar = Path(__file__).resolve().parents[1] / "weights" / "ar-tiny-kjv"
    assert main(["generate", str(ar), "--text", "a [MASK] b"]) == 2
    _one_line_error(capsys, "is an AR baseline checkpoint")
    for key, value in (("ffn_multiplier", 0), ("n_trf_blocks", -1), ("dropout", 1.5)):
        p = tmp_path / f"{key}.json"
        p.write_text(json.dumps({**micro_config().to_dict(), key: value}))
        assert main(["params", str(p)]) == 2
        _one_line_error(capsys, key)


def test_train_ar_takes_an_ar_checkpoint_as_its_tokenizer(tmp_path: Path, capsys) -> None:
    """`yan train ar --tokenizer DIR` reads the target length from DIR's config.json: a YAN
    checkpoint's `max_length` or an AR checkpoint's `yan_max_length` (the AR card's rebuild
    command names one); a config.json with neither is one error line."""
    from transformers import GPT2LMHeadModel

    from yan_serve.ar.model import ar_config, load_ar, save_ar
    from yan_serve.tokenizer import train_bpe

    rows = [{"text": f"Number {i}: in the beginning God created the earth."} for i in range(40)]
    data = tmp_path / "c"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe([r["text"] for r in rows], 300)
    ar = tmp_path / "ar-ckpt"
    save_ar(GPT2LMHeadModel(ar_config(tok, 48, "ar-tiny")), tok, ar)
    run = ["train", "ar", "--data", str(data), "--steps", "1", "--batch-size", "2",
           "--eval-batches", "1", "--tasks", "complete"]  # fmt: skip
    assert main([*run, "--tokenizer", str(ar), "--out", str(tmp_path / "out")]) == 0
    assert load_ar(tmp_path / "out").config.yan_max_length == 48
    capsys.readouterr()
    (ar / "config.json").write_text(json.dumps({"n_embd": 8}))
    assert main([*run, "--tokenizer", str(ar), "--out", str(tmp_path / "out2")]) == 2
    _one_line_error(capsys, "neither max_length", "yan_max_length")


def test_import_help_names_every_dataset(capsys) -> None:
    from yan_serve.cli import build_parser
    from yan_serve.tasks.datasets import LOADERS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "import", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in LOADERS:
        assert f"{name}," in shown or f"{name} " in shown, name
