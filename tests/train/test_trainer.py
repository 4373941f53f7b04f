"""The training loop: LR schedule, what each stage trains, resume, torchrun/DDP.

Run: python -m pytest tests/train/test_trainer.py -q
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import micro_config
from yan_serve.model import YAN
from yan_serve.tasks.formats import TaskFormatter
from yan_serve.tasks.records import TextRecord
from yan_serve.tokenizer import train_bpe
from yan_serve.train.data import Batch, collate, collate_stage1, stage1_maker
from yan_serve.train.objectives import (
    Stage2Weights,
    StageConfig,
    YANObjective,
    stage2_loss,
    trainable_parameters,
)
from yan_serve.train.trainer import TrainConfig, Trainer, lr_at
from yan_serve.weights import from_pretrained

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And God said, Let there be light: and there was light.",
         "And God saw the light, that it was good."] * 10  # fmt: skip


def test_lr_warmup_then_constant() -> None:
    cfg = TrainConfig(out="x", lr=1e-3, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == lr_at(500, cfg) == pytest.approx(1e-3)


def test_lr_decays_linearly_over_the_last_steps() -> None:
    cfg = TrainConfig(out="x", steps=100, lr=1e-3, warmup=10, decay=40)
    assert lr_at(9, cfg) == lr_at(60, cfg) == pytest.approx(1e-3)  # held until 40 steps remain
    assert lr_at(80, cfg) == pytest.approx(0.5e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-3 / 40)  # the last update still moves
    assert [lr_at(s, cfg) for s in range(60, 100)] == sorted(
        [lr_at(s, cfg) for s in range(60, 100)], reverse=True
    )
    # a time budget that runs out first: the decay covers the same share (40%) of the time
    assert lr_at(20, cfg, time_done=0.5) == pytest.approx(1e-3)
    assert lr_at(20, cfg, time_done=0.8) == pytest.approx(0.5e-3)
    assert lr_at(90, cfg, time_done=0.8) == pytest.approx(0.25e-3)  # steps further along
    assert lr_at(20, cfg, time_done=1.2) == pytest.approx(1e-3 / 40)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(out="x", steps=10, decay=11)


def test_focus_weight_reweights_the_span_ce() -> None:
    """Stage 2 / fine-tuning CE with `focus` = w weights the focus positions w times: from the
    uniform CE (w = 1) and the focus-only CE (w huge) the w = 5 value follows exactly; w = 1 or no
    focus is the uniform CE, and a non-positive weight is refused."""
    torch.manual_seed(0)
    model = YAN(micro_config())
    B, L = 3, 9
    tgt = torch.randint(4, 60, (B, L))
    mask = torch.arange(L)[None] < torch.tensor([9, 7, 5])[:, None]
    focus = torch.zeros(B, L, dtype=torch.bool)
    focus[0, 2:4] = focus[1, 5] = focus[2, 1] = True
    src, src_mask = tgt.masked_fill(focus, 3), mask

    def ce(w: float, f: torch.Tensor | None = focus) -> float:
        g = torch.Generator().manual_seed(1)
        out = stage2_loss(model, src, src_mask, tgt, mask, Stage2Weights(focus=w),
                          generator=g, focus=f)  # fmt: skip
        return out["ce"].item()

    uniform, only = ce(1.0), ce(1e9)
    assert ce(5.0, None) == uniform and ce(1.0, torch.ones_like(focus)) == uniform
    nf, n = int(focus.sum()), int(mask.sum())
    rest = uniform * n - only * nf
    assert ce(5.0) == pytest.approx((rest + 5 * only * nf) / (n - nf + 5 * nf), rel=1e-4)
    assert only != pytest.approx(uniform, rel=1e-3)  # the spans are not already the average
    with pytest.raises(ValueError, match="focus"):
        Stage2Weights(focus=0.0)


def test_infill_batches_carry_their_span_positions() -> None:
    tok = train_bpe(TEXTS, vocab_size=300)
    fmt = TaskFormatter(tok, "per_position")
    rng = random.Random(0)
    exs = [fmt.infill(TextRecord(t), rng) for t in TEXTS[:4]]
    b = collate(exs, tok.special.pad)
    assert b.focus is not None and torch.equal(b.focus, b.src == tok.special.mask)
    assert torch.equal(b.to("cpu").focus, b.focus)
    assert collate([fmt.complete(TextRecord(TEXTS[0]))], tok.special.pad).focus is None


def test_each_stage_trains_its_own_parts() -> None:
    m = YAN(micro_config())
    n_flow = sum(p.numel() for p in m.flow.parameters())
    s1 = trainable_parameters(m, StageConfig("stage1"))
    assert sum(p.numel() for p in s1) == m.num_parameters() - n_flow
    s2 = trainable_parameters(m, StageConfig("stage2"))
    assert sum(p.numel() for p in s2) == n_flow
    assert not m.encoder.trf_blocks[0].ff.layers[0].weight.requires_grad
    ft = trainable_parameters(m, StageConfig("finetune", freeze_autoencoder=False))
    assert sum(p.numel() for p in ft) == m.num_parameters()
    with pytest.raises(ValueError, match="stage"):
        StageConfig("stage3")


def _stream(tok, seed: int = 0):
    import random

    from yan_serve.tasks.formats import TaskFormatter
    from yan_serve.tasks.records import TextRecord

    make = stage1_maker(TaskFormatter(tok), max_len=40)
    rng = random.Random(seed)
    recs = [TextRecord(t) for t in TEXTS]
    while True:
        yield collate_stage1([make(rng.choice(recs), rng) for _ in range(4)], tok.special.pad)


def _objective(tok, stage: str = "stage1") -> YANObjective:
    return YANObjective(YAN(micro_config(vocab_size=tok.vocab_size)), tok, StageConfig(stage))


def test_resume_continues_the_same_run(tmp_path) -> None:
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = dict(out=str(tmp_path / "run"), batch_size=4, warmup=2, lr=1e-3, log_every=2,
               eval_every=2, save_every=100)  # fmt: skip
    torch.manual_seed(0)
    val: list[Batch] = [next(_stream(tok, 9))]
    first = Trainer(_objective(tok), TrainConfig(**cfg, steps=4), _stream(tok), val,
                    log=lambda *a: None)  # fmt: skip
    first.train()
    state = json.loads((tmp_path / "run/trainer_state.json").read_text())
    assert state["step"] == 4 and (tmp_path / "run/optimizer.pt").exists()

    second = Trainer(_objective(tok), TrainConfig(**cfg, steps=6), _stream(tok, 1), val,
                     log=lambda *a: None)  # fmt: skip
    assert second.resume() and second.step == 4
    for k, v in from_pretrained(tmp_path / "run").state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k
    assert second.opt.state_dict()["state"], "optimizer moments were not restored"
    summary = second.train()
    assert summary["steps"] == 6
    assert "val_loss" in summary["final"]
    with pytest.raises(ValueError, match="stage1 run"):
        wrong_stage = _objective(tok, "stage2")
        Trainer(wrong_stage, TrainConfig(**cfg, steps=6), _stream(tok), val).resume()


def _trainers(tmp_path, tok, **cfg) -> Callable[[str, int], Trainer]:
    """`trainer(out, steps)`: a Trainer of the test objective into tmp_path/out, each on the same
    batch stream and validation batch, with `cfg` over batch 4, warm-up 2, lr 1e-3."""
    val: list[Batch] = [next(_stream(tok, 9))]
    cfg = {"batch_size": 4, "warmup": 2, "lr": 1e-3, **cfg}

    def trainer(out: str, steps: int) -> Trainer:
        return Trainer(_objective(tok), TrainConfig(**cfg, out=str(tmp_path / out), steps=steps),
                       _stream(tok), val, log=lambda *a: None)  # fmt: skip

    return trainer


def test_an_interrupted_run_resumes_into_the_same_weights(tmp_path) -> None:
    """Resume restores weights, optimizer, step, the RNG and the position in the batch stream:
    4 steps + resume to 8 gives exactly the weights of 8 uninterrupted steps."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    trainer = _trainers(tmp_path, tok, log_every=2, eval_every=2, save_every=100)

    torch.manual_seed(0)
    trainer("straight", 8).train()
    torch.manual_seed(0)
    trainer("split", 4).train()
    torch.manual_seed(123)  # whatever the process did in between
    resumed = trainer("split", 8)
    assert resumed.resume()
    resumed.train()
    a = from_pretrained(tmp_path / "straight").state_dict()
    b = from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged"


def test_prefetching_batches_in_a_worker_changes_nothing(tmp_path) -> None:
    """Batches built ahead in a forked worker (`TrainConfig.prefetch`, on by default on CUDA)
    are the same stream: the same weights after a run, and after a resumed one, as building them
    in the loop."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = dict(batch_size=4, warmup=2, lr=1e-3, log_every=2, eval_every=2, save_every=100)
    val: list[Batch] = [next(_stream(tok, 9))]

    def run(out: str, steps: int, depth: int, resume: bool = False) -> dict:
        torch.manual_seed(0)
        t = Trainer(_objective(tok), TrainConfig(**cfg, out=str(tmp_path / out), steps=steps,
                    prefetch=depth), _stream(tok), val, log=lambda *a: None)  # fmt: skip
        assert t.resume() == resume
        summary = t.train()
        assert summary["steps"] == steps and summary["target_tokens"] > 0
        return from_pretrained(tmp_path / out).state_dict()

    inline = run("inline", 6, 0)
    ahead = run("ahead", 6, 3)
    assert all(torch.equal(inline[k], ahead[k]) for k in inline)
    run("split", 3, 3)
    resumed = run("split", 6, 3, resume=True)  # the worker skips what the first part consumed
    assert all(torch.equal(inline[k], resumed[k]) for k in inline)
    assert TrainConfig(out="x").prefetch is None  # auto: 4 on CUDA, 0 elsewhere


class _NaNAt(YANObjective):
    """The stage-1 objective, with a NaN loss at the 0-based training calls in `bad`."""

    def __init__(self, *args, bad: set[int]) -> None:
        super().__init__(*args)
        self.bad, self.calls = bad, 0

    def forward(self, batch, generator=None):
        terms = super().forward(batch, generator)
        if self.training:  # validation runs in eval mode and does not count
            if self.calls in self.bad:
                terms["loss"] = terms["loss"] * float("nan")
            self.calls += 1
        return terms


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_non_finite_gradient_skips_its_update_on_the_device(tmp_path, device) -> None:
    """A step whose gradient norm is not finite leaves the weights and the optimizer's state as
    they were (the fused AdamW's `found_inf`, no host sync per step), and the log line of its
    window says so; the other steps train as usual."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = dict(batch_size=4, warmup=2, lr=1e-3, log_every=2, eval_every=100, save_every=100,
               device=device)  # fmt: skip
    logs: list[str] = []

    def trainer(out: str, steps: int, bad: set[int]) -> Trainer:
        torch.manual_seed(0)
        obj = _NaNAt(YAN(micro_config(vocab_size=tok.vocab_size)), tok, StageConfig("stage1"),
                     bad=bad)  # fmt: skip
        return Trainer(obj, TrainConfig(**cfg, out=str(tmp_path / out), steps=steps), _stream(tok),
                       [next(_stream(tok, 9))], log=logs.append)  # fmt: skip

    t = trainer("poisoned", 2, {2})
    t.train()
    a = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.cfg = replace(t.cfg, steps=3)  # one more step, on the poisoned batch
    t.train()
    b = t.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())
    steps = [int(st["step"]) for st in t.opt.state.values()]
    assert steps and set(steps) == {2}, steps  # the skipped step is not counted either
    assert any("steps 3-3: 1 with a non-finite gradient norm" in line for line in logs), logs


def test_a_run_saved_by_the_foreach_optimizer_resumes_fused(tmp_path) -> None:
    """Runs saved before the trainer used the fused AdamW (their optimizer state says
    foreach) continue with the fused one, moments and step counts kept."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = dict(out=str(tmp_path / "run"), batch_size=4, warmup=2, lr=1e-3, log_every=2,
               eval_every=100, save_every=100)  # fmt: skip
    val = [next(_stream(tok, 9))]
    torch.manual_seed(0)
    first = Trainer(_objective(tok), TrainConfig(**cfg, steps=2), _stream(tok), val,
                    log=lambda *a: None)  # fmt: skip
    first.opt = torch.optim.AdamW(first.params, lr=1e-3, foreach=True)  # what older runs used
    _foreach_steps(first, 2)
    first.step = 2
    first.save()
    second = Trainer(_objective(tok), TrainConfig(**cfg, steps=4), _stream(tok, 1), val,
                     log=lambda *a: None)  # fmt: skip
    assert second.resume()
    assert all(g["fused"] and not g["foreach"] for g in second.opt.param_groups)
    assert {int(st["step"]) for st in second.opt.state.values()} == {2}
    assert second.train()["steps"] == 4
    assert {int(st["step"]) for st in second.opt.state.values()} == {4}


def _foreach_steps(t: Trainer, n: int) -> None:
    """`n` plain steps of `t.opt` on `t`'s batches."""
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        loss = t.loss_fn(next(t.train_batches), g)["loss"]
        t.opt.zero_grad()
        loss.backward()
        t.opt.step()


def test_a_time_limit_stops_saves_and_resume_finishes_the_run(tmp_path) -> None:
    """max_minutes ends the run early with everything saved; --resume completes the same run
    (the weights of an unlimited run of as many steps)."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = dict(batch_size=4, warmup=2, lr=1e-3, log_every=2, eval_every=2, save_every=100)
    val: list[Batch] = [next(_stream(tok, 9))]

    def trainer(out: str, **kw) -> Trainer:
        return Trainer(_objective(tok), TrainConfig(**cfg, out=str(tmp_path / out), **kw),
                       _stream(tok), val, log=lambda *a: None)  # fmt: skip

    torch.manual_seed(0)
    cut = trainer("cut", steps=6, max_minutes=0.0).train()
    assert cut["steps"] == 0 and "time limit" in cut["stopped"]
    assert json.loads((tmp_path / "cut/trainer_state.json").read_text())["step"] == 0
    torch.manual_seed(0)
    trainer("straight", steps=6).train()
    resumed = trainer("cut", steps=6)
    assert resumed.resume()
    assert "stopped" not in resumed.train()
    a = from_pretrained(tmp_path / "straight").state_dict()
    b = from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged"


def test_a_time_limited_run_decays_with_its_clock(tmp_path, monkeypatch) -> None:
    """With max_minutes set, the decay follows whichever of steps and time is further along: on a
    clock that runs 6 s per step against a 1-minute budget, a 100-step run with 50 decay steps
    decays from step 5 and stops at step 10."""
    import yan_serve.train.trainer as trainer_mod

    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=4, warmup=1, lr=1e-3, log_every=1,
                      eval_every=100, save_every=100, steps=100, decay=50,
                      max_minutes=1.0)  # fmt: skip
    tr = Trainer(_objective(tok), cfg, _stream(tok), [], log=lambda *a: None)
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(time=lambda: 6.0 * tr.step))
    summary = tr.train()
    assert summary["steps"] == 10 and "time limit" in summary["stopped"]
    lrs = [rec["lr"] for rec in tr.history]
    assert lrs == pytest.approx([lr_at(s, cfg, s / 10) for s in range(10)])
    assert lrs[:6] == pytest.approx([1e-3] * 6) and lrs[9] == pytest.approx(1e-3 * 10 / 50)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_save(tmp_path) -> None:
    """The documented multi-process launch, on CPU with the gloo backend."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"text": t, "id": str(i)}) for i, t in enumerate(TEXTS)]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = micro_config(vocab_size=300, max_length=64)
    cfg.save(tmp_path / "config.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "yan_serve.cli", "train",
         "stage1", "--config", str(tmp_path / "config.json"), "--data", str(data), "--out",
         str(tmp_path / "out"), "--steps", "3", "--batch-size", "4", "--log-every", "1",
         "--eval-every", "3", "--eval-batches", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("[stage1] step 3/3") == 1  # only rank 0 logs
    assert from_pretrained(tmp_path / "out").config.vocab_size >= 300
    assert Path(tmp_path / "out/trainer_state.json").exists()


def test_infill_rate_reaches_the_training_batches_of_both_models() -> None:
    """`yan train --infill-rate LOW,HIGH` parses to the range that YAN's stage 2 / fine-tune
    batches and the AR baseline's fill-in-the-middle batches mask at."""
    from transformers import GPT2LMHeadModel

    from yan_serve import cli
    from yan_serve.ar.model import ar_config
    from yan_serve.ar.train import ARObjective
    from yan_serve.tasks.corpus import Corpus

    base = ["train", "finetune", "--data", "d", "--out", "o"]
    assert cli.build_parser().parse_args([*base, "--infill-rate", "0.3,0.4"]).infill_rate == (
        0.3, 0.4)  # fmt: skip
    assert cli.build_parser().parse_args(base).infill_rate == (0.05, 0.10)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*base, "--infill-rate", "0.4,0.3"])

    long = [" ".join(TEXTS[i : i + 3]) for i in range(len(TEXTS) - 3)]
    tok = train_bpe(long, vocab_size=300)
    corpus = Corpus({"train": [TextRecord(t) for t in long]}, {}, {})

    def yan_share(rate: tuple[float, float]) -> float:
        spec = StageConfig("stage2", infill_rate=rate)
        model = YAN(micro_config(vocab_size=tok.vocab_size, max_length=64))
        obj = YANObjective(model, tok, spec, corpus)
        it = obj.batches("train", 8, seed=0)
        masked = total = 0
        for _ in range(10):
            b = next(it)
            masked += int(b.focus.sum())
            total += int(b.tgt_mask.sum()) - b.tgt.shape[0]  # EOS is never masked
        return masked / total

    def ar_targets(rate: tuple[float, float]) -> int:
        model = GPT2LMHeadModel(ar_config(tok, 64, "ar-tiny"))
        it = ARObjective(model, tok, 64, ("infill-fim",), corpus, rate).batches("train", 8, 0)
        return sum(int((next(it).labels != -100).sum()) for _ in range(10))

    assert 0.04 <= yan_share((0.05, 0.10)) <= 0.12
    assert 0.28 <= yan_share((0.3, 0.4)) <= 0.42
    assert ar_targets((0.3, 0.4)) > 2 * ar_targets((0.05, 0.10))


def test_a_resumed_time_limited_run_continues_its_clock(tmp_path, monkeypatch) -> None:
    """The time trained is saved with the checkpoint (`elapsed_seconds`) and restored by resume:
    the budget and the time-based decay continue where they stopped instead of starting over.
    On a clock of 6 s per step, a 1-minute budget stops at step 10; resumed with 2 minutes the
    run has one minute left (10 steps, the decay at the shares 0.5 .. 0.95 of the budget); a
    state saved before the field existed resumes with no time spent, as it always did."""
    import yan_serve.train.trainer as trainer_mod

    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=4, warmup=1, lr=1e-3, log_every=1,
                      eval_every=100, save_every=100, steps=100, decay=50,
                      max_minutes=1.0)  # fmt: skip

    def session(max_minutes: float, origin: float, resume: bool) -> tuple[Trainer, dict]:
        c = replace(cfg, max_minutes=max_minutes)
        tr = Trainer(_objective(tok), c, _stream(tok), [], log=lambda *a: None)
        assert tr.resume() == resume
        first = tr.step
        clock = SimpleNamespace(time=lambda: origin + 6.0 * (tr.step - first))
        monkeypatch.setattr(trainer_mod, "time", clock)
        return tr, tr.train()

    tr, summary = session(1.0, 0.0, resume=False)
    assert summary["steps"] == 10 and "time limit" in summary["stopped"]
    shutil.copytree(tmp_path / "run", tmp_path / "old")

    # the same budget again: nothing is left of it, the run stays where it stopped
    tr, summary = session(1.0, 5000.0, resume=True)
    assert summary["steps"] == 10 and "time limit" in summary["stopped"] and not tr.history
    state = json.loads((tmp_path / "run/trainer_state.json").read_text())
    assert state["elapsed_seconds"] == pytest.approx(60.0)
    # a larger budget: the minute that is left, the decay continuing from the share spent
    c2 = replace(cfg, max_minutes=2.0)
    tr, summary = session(2.0, 9000.0, resume=True)
    assert summary["steps"] == 20, summary
    assert [r["lr"] for r in tr.history] == pytest.approx([lr_at(s, c2, s / 20) for s in
                                                           range(10, 20)])  # fmt: skip
    saved = json.loads((tmp_path / "run/trainer_state.json").read_text())
    assert saved["elapsed_seconds"] == pytest.approx(120.0)

    # a trainer_state.json written before the field: resumed with 0 s spent
    old = json.loads((tmp_path / "old/trainer_state.json").read_text())
    del old["elapsed_seconds"]
    (tmp_path / "old/trainer_state.json").write_text(json.dumps(old))
    cfg = replace(cfg, out=str(tmp_path / "old"))
    tr, summary = session(1.0, 0.0, resume=True)
    assert summary["steps"] == 20  # a whole minute again, from step 10


def test_the_frozen_autoencoder_runs_in_eval_mode(tmp_path) -> None:
    """Stage 2 and fine-tuning keep what they do not train (embeddings, encoder, decoder) in
    eval mode, dropout off, through every mode switch of the trainer (validation included):
    the targets z1 = E(y) of two encodes of one batch are identical; the flow still trains
    with dropout. Unfrozen, the autoencoder trains with dropout too."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    model = YAN(micro_config(vocab_size=tok.vocab_size, dropout=0.3))
    obj = YANObjective(model, tok, StageConfig("stage2"))
    val = [next(_stream(tok, 9))]
    tr = Trainer(obj, TrainConfig(out=str(tmp_path / "run"), batch_size=4, steps=1),
                 _stream(tok), val, log=lambda *a: None)  # fmt: skip
    for switch in (obj.train, tr.validate):  # the trainer's `train()`, then a validation
        switch()
        assert obj.training and model.flow.training
        frozen = [model.tok_emb, model.pos_emb, model.encoder, model.decoder]
        assert not any(m.training for f in frozen for m in f.modules())
        b = val[0]
        with torch.no_grad():
            z1, again = model.encode(b.tgt, b.tgt_mask), model.encode(b.tgt, b.tgt_mask)
            logits = model.decode_logits(z1)
            assert torch.equal(z1, again) and torch.equal(logits, model.decode_logits(z1))
            cond = model.condition(z1, b.tgt_mask, b.tgt_mask)
            t = torch.full((b.tgt.shape[0],), 0.5)
            a, c = model.flow.trunk(z1, t, cond).h, model.flow.trunk(z1, t, cond).h
        assert not torch.equal(a, c), "the trained flow lost its dropout"
    unfrozen = YANObjective(model, tok, StageConfig("finetune", freeze_autoencoder=False))
    unfrozen.train()
    assert model.encoder.training and model.decoder.training
    obj.eval()
    assert not model.flow.training and not model.encoder.training


def test_validation_runs_on_its_own_cadence(tmp_path) -> None:
    """--eval-every need not be a multiple of --log-every: with logs every 2 steps and
    validation every 3, a 7-step run validates at steps 3, 6 and 7 (the last), the first on a
    record of its own."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    tr = Trainer(_objective(tok), TrainConfig(out=str(tmp_path / "run"), batch_size=4, steps=7,
                 warmup=1, lr=1e-3, log_every=2, eval_every=3, save_every=100), _stream(tok),
                 [next(_stream(tok, 9))], log=lambda *a: None)  # fmt: skip
    tr.train()
    assert [r["step"] for r in tr.history if "val_loss" in r] == [3, 6, 7]
    assert [r["step"] for r in tr.history if "loss" in r] == [2, 4, 6, 7]
    logged = (tmp_path / "run/training_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in logged] == [2, 3, 4, 6, 7]


def _opt_steps(t: Trainer) -> set[int]:
    return {int(st["step"]) for st in t.opt.state.values()}


def test_a_kill_in_the_middle_of_a_save_resumes_a_consistent_checkpoint(
    tmp_path, monkeypatch
) -> None:
    """Saves are atomic: every file is written under a staging directory first and moved into
    place with trainer_state.json last. A kill before the save is complete (here: writing the
    random state) leaves the previous checkpoint whole, and the resumed run is the uninterrupted
    one; a kill while the files are being moved into place is finished by the resume, which
    then continues from the newer step, never newer weights at an older step."""
    import os

    import yan_serve.train.trainer as trainer_mod

    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    trainer = _trainers(tmp_path, tok, log_every=1, eval_every=100, save_every=2)

    torch.manual_seed(0)
    trainer("straight", 6).train()
    straight = from_pretrained(tmp_path / "straight").state_dict()

    # 1. killed while writing the step-4 save: the step-2 checkpoint is what resume finds
    torch.manual_seed(0)
    t = trainer("run", 4)
    real_save = torch.save

    def dies_at_the_rng_state(obj, f, *a, **k):
        if Path(f).name == "rng_state.pt" and t.step == 4:
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(trainer_mod.torch, "save", dies_at_the_rng_state)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.setattr(trainer_mod.torch, "save", real_save)
    step2 = from_pretrained(tmp_path / "run").state_dict()
    resumed = trainer("run", 6)
    assert resumed.resume() and resumed.step == 2 and _opt_steps(resumed) == {2}
    assert all(torch.equal(step2[k], v) for k, v in resumed.model.state_dict().items())

    # 2. killed after the step-4 save was complete, while moving its files into place
    real_replace = os.replace

    def dies_at_the_optimizer(src, dst, *a, **k):
        if Path(src).name == "optimizer.pt" and Path(src).parent.name == trainer_mod.READY:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(trainer_mod.os, "replace", dies_at_the_optimizer)
    resumed.cfg = replace(resumed.cfg, save_every=100)
    with pytest.raises(KeyboardInterrupt):
        resumed.cfg = replace(resumed.cfg, steps=4)
        resumed.train()
    monkeypatch.setattr(trainer_mod.os, "replace", real_replace)
    step4 = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    assert json.loads((tmp_path / "run/trainer_state.json").read_text())["step"] == 2
    again = trainer("run", 6)
    assert again.resume() and again.step == 4 and _opt_steps(again) == {4}
    assert all(torch.equal(step4[k], v) for k, v in again.model.state_dict().items())
    again.train()  # and the run ends as the uninterrupted one, its log without repeats
    done = from_pretrained(tmp_path / "run").state_dict()
    assert all(torch.equal(straight[k], done[k]) for k in straight), "the resumed run diverged"
    logged = (tmp_path / "run/training_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert not any(p.name.startswith(".save") for p in (tmp_path / "run").iterdir())


def test_stage2_latent_noise_switch(monkeypatch) -> None:
    """`Stage2Weights.latent_noise`: "none" (the default) is stage 2 as it always was (the
    same three draws from the generator, z1 = E(y) and the source encoding noise-free);
    "target" adds u * N(0, I), u ~ U(0, latent_noise) per sequence, drawn from the stage-2
    generator after the rest, to z1 at the target positions; "both" to the encoded source too.
    Validation (eval mode) encodes without it."""
    import yan_serve.train.objectives as obj_mod
    from yan_serve.flow.path import LinearPath
    from yan_serve.train.objectives import Stage2Draws

    torch.manual_seed(0)
    cfg = micro_config(latent_noise=0.5)
    model = YAN(cfg)
    B, Lx, Ly = 3, 7, 9
    src, tgt = torch.randint(4, 60, (B, Lx)), torch.randint(4, 60, (B, Ly))
    src_mask = torch.ones(B, Lx, dtype=torch.bool)
    tgt_mask = torch.arange(Ly)[None] < torch.tensor([9, 6, 4])[:, None]
    seen: dict[str, torch.Tensor] = {}
    real_sample, real_condition = LinearPath.sample, model.condition

    def sample(self, z0, z1, t):
        seen["z1"] = z1.detach().clone()
        return real_sample(self, z0, z1, t)

    def condition(src_h, *a):
        seen["src_h"] = src_h.detach().clone()
        return real_condition(src_h, *a)

    monkeypatch.setattr(obj_mod.LinearPath, "sample", sample)
    monkeypatch.setattr(model, "condition", condition)

    def loss(mode: str | None, g: torch.Generator) -> dict[str, torch.Tensor]:
        w = Stage2Weights() if mode is None else Stage2Weights(latent_noise=mode)
        return stage2_loss(model, src, src_mask, tgt, tgt_mask, w, generator=g)

    with torch.no_grad():
        clean_z1, clean_src = model.encode(tgt, tgt_mask), model.encode(src, src_mask)

    # "none" and the default: exactly the loss of the draws stage 2 always took, given by hand
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((B, Ly, cfg.d_model), generator=g)
    t = LinearPath(cfg.beta_a, cfg.beta_b).sample_t(B, torch.device("cpu"), g)
    uniforms = torch.rand((B, Ly), generator=g)
    before = stage2_loss(model, src, src_mask, tgt, tgt_mask,
                         draws=Stage2Draws(noise, t, uniforms))  # fmt: skip
    for mode in (None, "none"):
        g2 = torch.Generator().manual_seed(7)
        terms = loss(mode, g2)
        assert all(torch.equal(terms[k], before[k]) for k in before)
        assert torch.equal(g2.get_state(), g.get_state())  # no other draw taken
        assert torch.equal(seen["z1"], clean_z1) and torch.equal(seen["src_h"], clean_src)

    # "target": after the same three draws, u [B] and eps [B, Ly, d]
    u = torch.rand((B, 1, 1), generator=g) * cfg.latent_noise
    eps = torch.randn((B, Ly, cfg.d_model), generator=g)
    loss("target", torch.Generator().manual_seed(7))
    expected = clean_z1 + u * eps * tgt_mask[..., None]
    assert torch.allclose(seen["z1"], expected, atol=1e-6) and not torch.equal(seen["z1"], clean_z1)
    assert torch.equal(seen["z1"][~tgt_mask], clean_z1[~tgt_mask])  # padding stays zero
    assert torch.equal(seen["src_h"], clean_src)
    assert (u.flatten() < cfg.latent_noise).all()

    # "both": then the source's noise, u [B] and eps [B, Lx, d]
    us = torch.rand((B, 1, 1), generator=g) * cfg.latent_noise
    eps_s = torch.randn((B, Lx, cfg.d_model), generator=g)
    loss("both", torch.Generator().manual_seed(7))
    assert torch.allclose(seen["z1"], expected, atol=1e-6)
    assert torch.allclose(seen["src_h"], clean_src + us * eps_s, atol=1e-6)

    # the objective: the same draws from the trainer's generator, none of them in validation
    tok = SimpleNamespace(vocab_size=cfg.vocab_size)
    spec = StageConfig("stage2", stage2=Stage2Weights(latent_noise="target"))
    ob = YANObjective(model, tok, spec)  # type: ignore[arg-type]
    b = Batch(src, src_mask, tgt, tgt_mask, task="infill")
    ob.train()
    ob(b, torch.Generator().manual_seed(7))
    assert torch.allclose(seen["z1"], expected, atol=1e-6)
    ob.eval()
    ob(b, torch.Generator().manual_seed(7))
    assert torch.equal(seen["z1"], clean_z1)
    with pytest.raises(ValueError, match="latent_noise"):
        Stage2Weights(latent_noise="source")
    from yan_serve import cli

    base = ["train", "stage2", "--data", "d", "--out", "o"]
    parse = cli.build_parser().parse_args
    assert parse(base).flow_latent_noise == "none"
    assert parse([*base, "--flow-latent-noise", "both"]).flow_latent_noise == "both"


def test_a_weighted_task_mixture_gives_each_task_its_share_of_batches() -> None:
    """`--tasks infill,qa:3` parses to QA named three times, and the mixture then draws three QA
    batches per infill batch in every round; all weights 1 keep the unweighted order."""
    from yan_serve import cli
    from yan_serve.train.data import mixture

    base = ["train", "finetune", "--data", "d", "--out", "o"]
    args = cli.build_parser().parse_args([*base, "--tasks", "infill,qa:3"])
    assert args.tasks == ("infill", "qa", "qa", "qa")
    assert cli.build_parser().parse_args(base).tasks == ("infill", "complete", "qa", "classify")

    def stream(name: str):
        while True:
            yield name

    def draw(weights, n: int) -> list[str]:
        it = mixture({t: stream(t) for t in ("a", "b", "c")}, seed=7, weights=weights)
        return [next(it) for _ in range(n)]

    assert draw(None, 60) == draw({"a": 1, "b": 1}, 60)
    rounds = draw({"b": 3}, 50)
    for r in range(10):  # each round of 5: one a, three b, one c, in a seeded order
        assert sorted(rounds[5 * r : 5 * r + 5]) == ["a", "b", "b", "b", "c"]
    assert len({tuple(rounds[i : i + 5]) for i in range(0, 50, 5)}) > 1  # reshuffled per round
    with pytest.raises(ValueError, match="'d'"):
        draw({"d": 2}, 1)
    with pytest.raises(ValueError, match="'a'"):
        draw({"a": 0}, 1)


def test_a_weighted_mixture_reaches_the_batches_of_both_models() -> None:
    """YAN's fine-tune and the AR baseline draw a task named w times in their mixture w times per
    round."""
    from transformers import GPT2LMHeadModel

    from yan_serve.ar.model import ar_config
    from yan_serve.ar.train import ARObjective
    from yan_serve.tasks.corpus import Corpus

    long = [" ".join(TEXTS[i : i + 3]) for i in range(len(TEXTS) - 3)]
    tok = train_bpe(long, vocab_size=300)
    corpus = Corpus({"train": [TextRecord(t) for t in long]}, {}, {})
    model = YAN(micro_config(vocab_size=tok.vocab_size, max_length=64))
    spec = StageConfig("finetune", tasks=("infill", "complete", "complete", "complete"))
    it = YANObjective(model, tok, spec, corpus).batches("train", 4, seed=0)
    tasks = [next(it).task for _ in range(40)]
    assert tasks.count("complete") == 30 and tasks.count("infill") == 10

    # the AR baseline's batches carry no task name, so tell them by their target lengths: a
    # completion target is the last word and EOS (at most 4 tokens here), a fill-in-the-middle
    # one the spans of a passage with 30-40% of it masked (longer)
    ar = ARObjective(GPT2LMHeadModel(ar_config(tok, 64, "ar-tiny")), tok, 64,
                     ("infill-fim", "complete", "complete"), corpus, (0.3, 0.4))  # fmt: skip
    it_ar = ar.batches("train", 4, 0)
    seen = [int((next(it_ar).labels != -100).sum()) for _ in range(30)]
    assert sum(n <= 16 for n in seen) == 20
