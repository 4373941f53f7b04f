"""Training the AR baseline on YAN's data and task formats (`yan train ar`).

Same corpus, tokenizer, task formats, batch size and step counts as the YAN recipe, so the two
see the same examples. Tasks: the YAN task names plus `infill-fim` (fill-in-the-middle target:
only the spans). The loss is next-token cross-entropy on target tokens only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from yan_serve.ar.model import ar_sequence, fim_target, save_ar
from yan_serve.device import resolve_device
from yan_serve.tasks.formats import TASKS, Example, TaskFormatter
from yan_serve.tokenizer import YANTokenizer
from yan_serve.train.data import mixture
from yan_serve.train.recipes import Corpus, task_streams

AR_TASKS = (*TASKS, "infill-fim")


@dataclass
class ARTrainConfig:
    out: str
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 1000
    seed: int = 0
    device: str = "auto"
    tasks: tuple[str, ...] = field(default_factory=lambda: AR_TASKS)


def collate_ar(seqs: Sequence[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, labels (-100 outside targets)."""
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
        att[i, : len(s)] = 1
        labels[i, start : len(s)] = torch.as_tensor(s[start:])
    return ids, att, labels


def target_loss(model: GPT2LMHeadModel, ids, att, labels) -> torch.Tensor:
    """Mean next-token CE over target tokens; the LM head runs on target positions only."""
    h = model.transformer(input_ids=ids, attention_mask=att).last_hidden_state
    nxt = labels[:, 1:]
    sel = nxt != -100
    logits = model.lm_head(h[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits.float(), nxt[sel])


def train_ar(model: GPT2LMHeadModel, tok: YANTokenizer, corpus: Corpus, cfg: ARTrainConfig,
             max_len: int, log=print) -> dict:  # fmt: skip
    dev = resolve_device(cfg.device)
    model.to(dev).train()
    torch.manual_seed(cfg.seed)
    pad = tok.special.pad
    train = _named_batches(corpus, tok, "train", cfg, max_len, cfg.seed)
    val = [next(_named_batches(corpus, tok, "val", cfg, max_len, cfg.seed + 1))
           for _ in range(cfg.eval_batches)]  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    amp = dev.type == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"ar: {n_params / 1e6:.2f}M parameters on {dev}, {cfg.steps} steps of {cfg.batch_size}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "training_log_ar.jsonl", "a")  # noqa: SIM115 - closed after the loop
    t0 = time.perf_counter()
    run_loss, run_n, val_loss = 0.0, 0, math.nan
    tokens = 0
    for step in range(1, cfg.steps + 1):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup))
        ids, att, labels = (t.to(dev) for t in collate_ar(next(train), pad))
        tokens += int((labels != -100).sum())
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = target_loss(model, ids, att, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        run_loss += loss.item()
        run_n += 1
        rec = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = step / (time.perf_counter() - t0)
            rec = {"step": step, "lr": opt.param_groups[0]["lr"], "loss": run_loss / run_n}
            run_loss, run_n = 0.0, 0
            msg = f"[ar] step {step}/{cfg.steps} loss={rec['loss']:.3f}"
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = _validate(model, val, pad, dev, amp)
                rec["val_loss"] = val_loss
                msg += f" val_loss={val_loss:.3f}"
            eta = (cfg.steps - step) / rate / 60
            log(f"{msg} ({rate:.2f} it/s, eta {eta:.1f} min)")
        if rec is not None:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_ar(model, tok, out)
    logf.close()
    wall = time.perf_counter() - t0
    summary = {"steps": cfg.steps, "val_loss": val_loss, "target_tokens": tokens,
               "wall_s": round(wall, 1), "device": str(dev), "out": str(out)}  # fmt: skip
    log(f"ar: done in {wall / 60:.1f} min, val loss {val_loss:.3f}, saved to {out}")
    return summary


def _named_batches(corpus, tok, split, cfg: ARTrainConfig, max_len: int, seed: int):
    """Endless batches of (source + BOS + target, target start) over the task mixture; the
    `infill-fim` stream draws infill examples and keeps only their spans as the target."""
    bad = [t for t in cfg.tasks if t not in AR_TASKS]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r}; choose from {', '.join(AR_TASKS)}")
    sp = tok.special
    names = {t: "infill" if t == "infill-fim" else t for t in cfg.tasks}
    streams = task_streams(corpus, TaskFormatter(tok), split, names, cfg.batch_size, seed,
                           max_len, seed_order=AR_TASKS)  # fmt: skip

    def sequences(name: str, stream: Iterator[list[Example]]):
        for exs in stream:
            yield [ar_sequence(e.src, fim_target(e, sp.mask, sp.eos) if name == "infill-fim"
                               else e.tgt, sp.bos) for e in exs]  # fmt: skip

    yield from mixture({n: sequences(n, st) for n, st in streams.items()}, seed)


@torch.no_grad()
def _validate(model, val, pad, dev, amp) -> float:
    model.eval()
    total = 0.0
    for b in val:
        ids, att, labels = (t.to(dev) for t in collate_ar(b, pad))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            total += target_loss(model, ids, att, labels).item()
    model.train()
    return total / max(1, len(val))
