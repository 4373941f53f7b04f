"""Checkpoint directories and tokenizers: round trips and one-line errors for bad inputs.

Run: python -m pytest tests/test_weights.py -q
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.conftest import micro_config
from yan_serve.model import YAN
from yan_serve.tokenizer import YANTokenizer, train_bpe
from yan_serve.weights import SERVING_FILES, from_pretrained, load_tokenizer, save_pretrained

TEXT = ["In the beginning God created the heaven and the earth."] * 20 + [
    "And the earth was without form, and void; and darkness was upon the deep."
] * 20


@pytest.fixture(scope="module")
def bpe() -> YANTokenizer:
    return train_bpe(TEXT, vocab_size=300, min_frequency=1)


def test_bpe_specials_and_round_trip(bpe: YANTokenizer) -> None:
    sp = bpe.special
    assert (sp.pad, sp.bos, sp.eos, sp.mask) == (0, 1, 2, 3)
    ids = bpe.encode(TEXT[0])
    assert bpe.decode(ids) == TEXT[0]
    assert not set(ids) & {0, 1, 2, 3}
    assert bpe.decode([*ids, sp.eos, sp.pad]) == TEXT[0]  # specials are skipped


def test_foreign_tokenizer_gets_padding_and_mask_appended(tmp_path) -> None:
    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    yt = YANTokenizer.load(tmp_path)
    assert (yt.special.bos, yt.special.eos) == (0, 1)
    assert (yt.special.pad, yt.special.mask) == (5, 6)  # appended, as the paper does for LLaMA-3
    assert yt.vocab_size == 7
    assert yt.encode("hello world") == [2, 3]


def test_tokenizer_errors(tmp_path, bpe: YANTokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        YANTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        YANTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):
        bpe.check_compatible(vocab_size=100, pad=0, eos=2, mask=3)
    with pytest.raises(ValueError, match="wrong tokenizer"):
        bpe.check_compatible(vocab_size=1000, pad=0, eos=5, mask=3)


def _saved(tmp_path, bpe: YANTokenizer) -> tuple[YAN, object]:
    torch.manual_seed(0)
    model = YAN(micro_config(vocab_size=bpe.vocab_size)).eval()
    save_pretrained(model, tmp_path / "ckpt", bpe, {"step": "7"})
    return model, tmp_path / "ckpt"


def test_save_and_load_round_trip(tmp_path, bpe: YANTokenizer) -> None:
    model, d = _saved(tmp_path, bpe)
    assert {p.name for p in d.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = from_pretrained(d)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert load_tokenizer(d, loaded.config).encode(TEXT[1]) == bpe.encode(TEXT[1])


def test_bf16_storage_halves_the_file_and_loads_as_fp32(tmp_path, bpe: YANTokenizer) -> None:
    """A checkpoint stored in bf16 loads as an fp32 model holding the bf16-rounded weights
    (unless a dtype is asked for), so a smaller shipped file serves with fp32 numerics."""
    model, full = _saved(tmp_path, bpe)
    half = save_pretrained(model, tmp_path / "half", bpe, dtype=torch.bfloat16)
    ratio = (half / "model.safetensors").stat().st_size / (
        full / "model.safetensors"
    ).stat().st_size
    assert 0.45 < ratio < 0.55
    loaded = from_pretrained(half)
    for k, v in model.state_dict().items():
        got = loaded.state_dict()[k]
        if v.is_floating_point():
            assert got.dtype == torch.float32, k
            assert torch.equal(got, v.to(torch.bfloat16).float()), k
        else:
            assert torch.equal(got, v), k
    assert next(from_pretrained(half, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_export_writes_the_serving_files_in_bf16(tmp_path, bpe: YANTokenizer) -> None:
    """`yan export` = the checkpoint's config, tokenizer and labels with bf16 weights; it never
    overwrites its own input."""
    from yan_serve.cli import main

    model, full = _saved(tmp_path, bpe)
    (full / "labels.json").write_text('{"1": "law"}')
    assert main(["export", str(full), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == set(SERVING_FILES)
    assert (out / "labels.json").read_text() == '{"1": "law"}'
    loaded = from_pretrained(out)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert main(["export", str(full), str(full)]) == 2
    # --steps: the serving default T (config ode_steps), nothing else changed
    assert main(["export", str(full), str(tmp_path / "t4"), "--steps", "4"]) == 0
    t4 = from_pretrained(tmp_path / "t4")
    assert t4.config == dataclasses.replace(model.config, ode_steps=4) != model.config
    assert main(["export", str(full), str(tmp_path / "t0"), "--steps", "0"]) == 2
    # re-exporting over an export updates it; a model without labels drops the old table
    (full / "labels.json").unlink()
    assert main(["export", str(full), str(out)]) == 0
    assert not (out / "labels.json").exists()
    # a training run is not an export target (its optimizer state would stay beside)
    run = tmp_path / "run"
    run.mkdir()
    (run / "optimizer.pt").write_bytes(b"state")
    assert main(["export", str(full), str(run)]) == 2
    assert [p.name for p in run.iterdir()] == ["optimizer.pt"]


def test_load_errors_name_the_problem(tmp_path, bpe: YANTokenizer) -> None:
    _, d = _saved(tmp_path, bpe)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        from_pretrained(d)


def test_vocab_mismatch_is_reported(tmp_path, bpe: YANTokenizer) -> None:
    _, d = _saved(tmp_path, bpe)
    cfg = micro_config(vocab_size=bpe.vocab_size + 5)
    cfg.save(d)
    with pytest.raises(ValueError, match="vocab or width mismatch"):
        from_pretrained(d)


def test_cli_errors_are_one_line(tmp_path, bpe: YANTokenizer) -> None:
    _, d = _saved(tmp_path, bpe)
    (d / "model.safetensors").write_bytes(b"not safetensors")
    cases = [
        ["eval", str(tmp_path / "missing"), "--data", str(tmp_path)],
        ["generate", str(d), "--text", "hello [MASK]"],
        ["train", "stage2", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")],
        ["params", str(tmp_path / "nothing.json")],
    ]
    for argv in cases:
        r = subprocess.run([sys.executable, "-m", "yan_serve.cli", *argv], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("yan "), r.stderr
        assert "Traceback" not in r.stderr


def test_saved_weights_are_readable_by_other_users(tmp_path, bpe: YANTokenizer) -> None:
    """safetensors writes 0600: a server running as another user (the image's non-root one, a
    read-only mount of an export) could not read the weights. Saved files follow the umask, as
    the config and tokenizer beside them do; the AR checkpoint's too."""
    from transformers import GPT2LMHeadModel

    from yan_serve.ar.model import ar_config, save_ar

    old = os.umask(0o022)
    try:
        save_pretrained(YAN(micro_config(vocab_size=bpe.vocab_size)), tmp_path / "yan", bpe)
        save_ar(GPT2LMHeadModel(ar_config(bpe, 16, "ar-tiny")), bpe, tmp_path / "ar")
        os.umask(0o077)
        save_pretrained(YAN(micro_config(vocab_size=bpe.vocab_size)), tmp_path / "private", bpe)
    finally:
        os.umask(old)
    for d in ("yan", "ar"):
        assert stat.S_IMODE((tmp_path / d / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private/model.safetensors").stat().st_mode) == 0o600
