"""The training loop: LR schedule, what each stage trains, resume, torchrun/DDP.

Run: python -m pytest tests/train/test_trainer.py -q
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
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


def test_an_interrupted_run_resumes_into_the_same_weights(tmp_path) -> None:
    """Resume restores weights, optimizer, step, the RNG and the position in the batch stream:
    4 steps + resume to 8 gives exactly the weights of 8 uninterrupted steps."""
    tok = train_bpe(TEXTS, vocab_size=200, min_frequency=1)
    cfg = dict(batch_size=4, warmup=2, lr=1e-3, log_every=2, eval_every=2, save_every=100)
    val: list[Batch] = [next(_stream(tok, 9))]

    def trainer(out: str, steps: int) -> Trainer:
        return Trainer(_objective(tok), TrainConfig(**cfg, out=str(tmp_path / out), steps=steps),
                       _stream(tok), val, log=lambda *a: None)  # fmt: skip

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
