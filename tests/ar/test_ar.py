"""The AR baseline: sizing, formats, KV-cache decoding, training loss, evaluation, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from yan_serve.ar.evaluate import fim_text
from yan_serve.ar.generate import ARRequest, ar_generate
from yan_serve.ar.model import ar_config, fim_target, load_ar, save_ar
from yan_serve.ar.train import collate_ar, target_loss
from yan_serve.config import YANConfig
from yan_serve.model import YAN
from yan_serve.tasks.formats import Example
from yan_serve.tokenizer import YANTokenizer, train_bpe
from yan_serve.weights import is_ar_checkpoint

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def micro() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=61, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def test_ar_tiny_is_within_10_percent_of_yan_tiny() -> None:
    from types import SimpleNamespace

    small = train_bpe(["In the beginning God created the heaven and the earth."] * 50, 300)
    tok = SimpleNamespace(vocab_size=8192, special=small.special)  # the shipped vocab's size
    with torch.device("meta"):
        n_ar = GPT2LMHeadModel(ar_config(tok, 256, "ar-tiny")).num_parameters()
    with torch.device("meta"):
        n_yan = YAN(YANConfig.from_name("yan-tiny")).num_parameters()
    assert abs(n_ar - n_yan) / n_yan < 0.10, (n_ar, n_yan)


def test_kv_cache_decoding_equals_hf_generate_and_ignores_batch_mates(micro) -> None:
    reqs = [ARRequest([5, 6, 7, 8, 9][: 2 + i % 4], 5 + i, seed=i) for i in range(6)]
    together = ar_generate(micro, reqs, EOS, PAD)
    for r, t in zip(reqs, together, strict=True):
        assert ar_generate(micro, [r], EOS, PAD)[0].tokens == t.tokens
        ref = micro.generate(
            torch.tensor([r.prompt]),
            max_new_tokens=r.max_new,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        ref = ref[0, len(r.prompt) :].tolist()  # fmt: skip
        assert ref[: len(t.tokens)] == t.tokens
        assert len(t.tokens) == r.max_new or t.hit_eos


def test_seeded_sampling_and_ignore_eos(micro) -> None:
    r = ARRequest([5, 6, 7], 8, seed=3, temperature=1.0)
    a, b = ar_generate(micro, [r], EOS, PAD)[0], ar_generate(micro, [r], EOS, PAD)[0]
    assert a.tokens == b.tokens
    full = ar_generate(micro, [ARRequest([5, 6], 12, ignore_eos=True)], EOS, PAD)[0]
    assert len(full.tokens) == 12 and not full.hit_eos


def test_a_vanishing_temperature_decodes_greedily(micro) -> None:
    reqs = [ARRequest([5, 6, 7][: 1 + i], 8, seed=i) for i in range(3)]
    greedy = ar_generate(micro, reqs, EOS, PAD)
    for t in (1e-40, 1e-30):
        cold = [ARRequest(r.prompt, r.max_new, seed=r.seed, temperature=t) for r in reqs]
        assert [o.tokens for o in ar_generate(micro, cold, EOS, PAD)] == \
            [o.tokens for o in greedy]  # fmt: skip


def test_fim_target_and_text_round_trip() -> None:
    tok = train_bpe(["In the beginning God created the heaven and the earth."] * 50, 300)
    sp = tok.special
    words = tok.encode("In the beginning God created the heaven")
    src = [words[0], sp.mask, *words[3:5], sp.mask, sp.eos]
    ex = Example("infill", src, [*words, sp.eos], "", fills=[words[1:3], words[5:]])
    tgt = fim_target(ex, sp.mask, sp.eos)
    assert tgt == [*words[1:3], sp.mask, *words[5:], sp.mask, sp.eos]
    assert fim_text(tok, ex, tgt[:-1]) == tok.decode(words)


def test_loss_covers_targets_only(micro) -> None:
    seqs = [([5, 6, 1, 7, 8, 2], 3), ([9, 1, 4, 2], 2)]
    ids, att, labels = collate_ar(seqs, PAD)
    assert labels[0].tolist() == [-100, -100, -100, 7, 8, 2]
    assert labels[1].tolist() == [-100, -100, 4, 2, -100, -100]
    ours = target_loss(micro, ids, att, labels)
    ref = micro(input_ids=ids, attention_mask=att, labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tmp_path, micro) -> None:
    tok = train_bpe(["In the beginning God created the heaven and the earth."] * 50, 300)
    save_ar(micro, tok, tmp_path)
    assert is_ar_checkpoint(tmp_path) and not is_ar_checkpoint(tmp_path / "nope")
    back = load_ar(tmp_path)
    x = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(back(x).logits, micro(x).logits)
    assert YANTokenizer.load(tmp_path).vocab_size == tok.vocab_size


def test_export_stores_bf16_and_loads_fp32(tmp_path, micro) -> None:
    """`yan export` of an AR checkpoint: half the bytes, loaded back as fp32 parameters holding
    the bf16-rounded weights (a 16-bit model only when asked for)."""
    from yan_serve.cli import main

    tok = train_bpe(["In the beginning God created the heaven and the earth."] * 50, 300)
    save_ar(micro, tok, tmp_path / "full")
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "half")]) == 0
    # Euler steps are YAN's: refused for the AR model, nothing written
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "t4"), "--steps", "4"]) == 2
    assert not (tmp_path / "t4").exists()
    size = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("full", "half")]
    assert 0.45 < size[1] / size[0] < 0.55
    back = load_ar(tmp_path / "half")
    for k, v in micro.state_dict().items():
        got = back.state_dict()[k]
        assert got.dtype == torch.float32 and torch.equal(got, v.to(torch.bfloat16).float()), k
    assert next(load_ar(tmp_path / "half", dtype=torch.bfloat16).parameters()).dtype == (
        torch.bfloat16
    )


def _corpus_dir(path) -> None:
    rows = [{"text": f"And God said, let there be light number {i} upon the earth.",
             "section": "law", "book": "Genesis"} for i in range(40)]  # fmt: skip
    for s in ("train", "val", "test"):
        (path / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_yan_train_ar_learns_and_yan_eval_reads_it(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _corpus_dir(data)
    tokdir = tmp_path / "tok"
    train_bpe([json.loads(x)["text"] for x in (data / "train.jsonl").read_text().splitlines()],
              300).save(tokdir)  # fmt: skip
    out = tmp_path / "ar"
    cmd = [sys.executable, "-m", "yan_serve.cli", "train", "ar", "--data", str(data), "--out",
           str(out), "--tokenizer", str(tokdir), "--steps", "60", "--batch-size", "8",
           "--tasks", "infill,infill-fim,complete", "--log-every", "20", "--eval-every", "60",
           "--eval-batches", "2", "--warmup", "10", "--device", "cpu"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(x) for x in (out / "training_log_ar.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], log
    assert is_ar_checkpoint(out)
    e = subprocess.run([sys.executable, "-m", "yan_serve.cli", "eval", str(out), "--data",
                        str(data), "--tasks", "infill,complete", "--limit", "8"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert e.returncode == 0, e.stderr[-2000:]
    assert "infill-fim" in e.stdout and "exact_match" in e.stdout


def test_ar_trains_through_the_shared_loop_and_resumes(tmp_path) -> None:
    """2 steps + resume to 4 gives exactly the weights of 4 uninterrupted steps."""
    from yan_serve.ar.train import ARObjective
    from yan_serve.tasks.corpus import load_corpus
    from yan_serve.train.trainer import TrainConfig, Trainer

    _corpus_dir(tmp_path)
    corpus = load_corpus(tmp_path, babi_sizes=(8, 4, 4))
    tok = train_bpe([r.text for r in corpus.text["train"]], 300)

    def trainer(out: str, steps: int) -> Trainer:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(ar_config(tok, 40, "ar-tiny"))
        objective = ARObjective(model, tok, 40, ("infill-fim", "complete"), corpus)
        cfg = TrainConfig(out=str(tmp_path / out), steps=steps, batch_size=4, warmup=2,
                          log_every=1, eval_batches=1, save_every=100, device="cpu")  # fmt: skip
        return Trainer(objective, cfg, log=lambda *a: None)

    summary = trainer("straight", 4).train()
    assert summary["stage"] == "ar" and summary["target_tokens"] > 0
    trainer("split", 2).train()
    resumed = trainer("split", 4)
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    a, b = load_ar(tmp_path / "straight").state_dict(), load_ar(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged"
    log = [json.loads(x) for x in (tmp_path / "split" / ARObjective.log_file).open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val_loss" in log[-1]
    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        ARObjective(GPT2LMHeadModel(ar_config(tok, 40)), tok, 40, ("summarize",), corpus)


def test_ar_score_is_one_forward_that_ignores_batch_mates(micro) -> None:
    from yan_serve.ar.generate import ar_score

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 61, (int(n),), generator=gen).tolist() for n in (1, 7, 3, 12)]
    targets = [torch.randint(3, 61, (int(n),), generator=gen).tolist() for n in (4, 1, 9, 2)]
    together = ar_score(micro, prompts, targets, PAD)
    for p, t, got in zip(prompts, targets, together, strict=True):
        with torch.no_grad():
            logits = micro(input_ids=torch.tensor([[*p, *t]])).logits[0].float()
        ref = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(-1, torch.tensor(t)[:, None])
        assert got == pytest.approx(ref.squeeze(-1).tolist(), abs=1e-5)
    assert ar_score(micro, [], [], PAD) == []
    with pytest.raises(ValueError, match="one target per prompt"):
        ar_score(micro, prompts, targets[:2], PAD)


def test_scored_classification_picks_the_highest_label_score(monkeypatch) -> None:
    from yan_serve.ar import evaluate as E

    tok = train_bpe(["####### ANSWER #######\n\n0 law 1 history 2 wisdom"] * 20, 300)
    labels = {0: "law", 1: "history", 2: "wisdom"}
    exs = [Example("classify", [5, 6, i], [], str(i % 3)) for i in range(7)]
    header = len(tok.encode("####### ANSWER #######\n\n"))

    def fake_score(model, prompts, targets, pad):
        out = []
        for p, t in zip(prompts, targets, strict=True):
            name = tok.decode(t[header:-1]).strip()
            k = int(name.split()[0])
            # the header tokens get a huge score for a wrong label: only tokens after it count
            bonus = 100.0 if k != p[-2] % 3 else 0.0
            out.append([bonus] * header + [0.0 if k == p[-2] % 3 else -5.0] * (len(t) - header))
        return out

    monkeypatch.setattr(E, "ar_score", fake_score)
    res = E.scored_classify_ar(None, tok, [*exs[:6], Example("classify", [5, 6, 6], [], "1")],
                               labels, batch_size=4)  # fmt: skip
    assert res.task == "classify-scored" and res.n == 7
    assert res.scores["accuracy"] == pytest.approx(100 * 6 / 7)
    with pytest.raises(ValueError, match="label table"):
        E.scored_classify_ar(None, tok, exs, {}, 4)
