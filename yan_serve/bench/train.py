"""`python -m yan_serve.bench train`: training throughput, YAN's fine-tuning step against the
same-size AR baseline's step, through the trainer's own `Trainer.train_step`.

Each row times one model at one batch size: random weights, random tokens, source and target
of `--length` tokens (AR: the same source + BOS + target as one sequence, loss on the target).
YAN's step is the fine-tuning objective (frozen autoencoder: the MoE flow-matching NLL plus the
CE through the unrolled Euler solve), the AR's the target-token CE; both under the trainer's bf16
autocast on CUDA, gradient clipping and the fused AdamW. Columns: ms per step (the mean over
--steps back-to-back steps after --warmup, timed to the last step's end), steps/s, target tokens
per second, launches per step (CUDA: GPU kernels of one step from torch.profiler; CPU: the
operators dispatched that would launch one, the proxy), host syncs per step (CUDA: what
`torch.cuda.set_sync_debug_mode("warn")` reports for one step; a sync makes the host wait for
the device, so the launches of the next step no longer hide behind the device's work) and peak
device memory. A step whose time is launches x a few microseconds is launch-bound: a larger
batch costs little more per step there. `--compile` adds rows `<preset>+c`: YAN's loss under
torch.compile (`YANObjective.compile_loss`; launches on CUDA only: compiled CPU code dispatches
no operators to count).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from yan_serve.argtypes import count_int, positive_int
from yan_serve.bench.common import (
    add_json_flag,
    bench_device,
    choice_list,
    finish,
    fmt,
    int_list,
    print_header,
    run_header,
)
from yan_serve.config import AR_PAIRS

DEFAULTS = {  # device -> (pairs, batches, length, steps, warmup)
    "cuda": (["yan-tiny", "yan-small"], [64, 256], 128, 20, 3),
    "cpu": (["yan-tiny"], [4], 32, 3, 1),
}
HELP = "training throughput: YAN's fine-tuning step vs the same-size AR's"
COLUMNS = (
    f"{'model':<12}{'params':>9}{'batch':>7}{'length':>8}{'ms/step':>10}{'steps/s':>9}"
    f"{'tokens/s':>11}{'launches':>10}{'syncs':>7}{'peak MiB':>10}"
)


@dataclass
class TrainRow:
    model: str
    params: int
    batch: int
    length: int
    ms: float | None  # None: out of memory
    tokens_per_step: int
    launches: int | None
    syncs: int | None  # CUDA only
    peak_mib: float | None  # CUDA only

    def line(self) -> str:
        rate = None if self.ms is None else 1e3 / self.ms
        tok = None if rate is None else rate * self.tokens_per_step
        return (
            f"{self.model:<12}{self.params / 1e6:8.1f}M{self.batch:>7}{self.length:>8}"
            f"{fmt(self.ms, '10.1f')}{fmt(rate, '9.2f')}{fmt(tok, '11.0f')}"
            f"{'-' if self.launches is None else self.launches:>10}"
            f"{'-' if self.syncs is None else self.syncs:>7}"
            f"{'-' if self.peak_mib is None else format(self.peak_mib, '.0f'):>10}"
        )


@dataclass
class _Case:
    """One row's model and data: the objective, its batch on the device, the batch's size and
    length, and how many target tokens it holds."""

    name: str
    objective: Any
    batch: Any
    batch_size: int
    length: int
    tokens: int


def yan_setup(preset: str, batch: int, length: int, device: str) -> _Case:
    """YAN's fine-tuning step on random tokens: every position a target, a tenth of them the
    task's focus (an infill batch's spans)."""
    from yan_serve.config import YANConfig
    from yan_serve.model import YAN
    from yan_serve.train.data import Batch
    from yan_serve.train.objectives import StageConfig, YANObjective

    cfg = YANConfig.from_name(preset)
    if length > cfg.max_length:
        cfg = YANConfig.from_name(preset, max_length=length)
    torch.manual_seed(0)
    model = YAN(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (2, batch, length), generator=g)
    ones = torch.ones(batch, length, dtype=torch.bool)
    focus = torch.rand(batch, length, generator=g) < 0.1
    b = Batch(ids[0], ones, ids[1], ones.clone(), task="infill", focus=focus).to(device)
    objective = YANObjective(model, None, StageConfig("finetune"))  # type: ignore[arg-type]
    return _Case(preset, objective, b, batch, length, batch * length)


def ar_setup(preset: str, vocab: int, batch: int, length: int, device: str) -> _Case:
    """The AR step: source + BOS + target, loss on the target."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from yan_serve.ar.model import AR_PRESETS
    from yan_serve.ar.train import ARBatch, ARObjective

    cfg = GPT2Config(vocab_size=vocab, n_positions=2 * length + 2, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, **AR_PRESETS[preset])  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (batch, 2 * length + 1), generator=g)
    labels = ids.clone()
    labels[:, : length + 1] = -100
    b = ARBatch(ids, torch.ones_like(ids), labels).to(device)
    objective = ARObjective(model, None, length)  # type: ignore[arg-type]
    return _Case(preset, objective, b, batch, length, batch * length)


def _trainer(objective, device: str, batch: int, out: str):
    from yan_serve.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(out=out, batch_size=batch, lr=1e-4, warmup=0, device=device, prefetch=0)
    return Trainer(objective, cfg, train_batches=iter(()), val_batches=[], log=lambda *a: None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(case: _Case, device: str, steps: int, warmup: int, out: str) -> TrainRow:
    """One row: `warmup` steps, then `steps` timed back to back; one more step profiled for
    launches, one under the sync checker (CUDA)."""
    from yan_serve.engine.launches import count_dispatched, kernel_counts, kernel_times

    t = _trainer(case.objective, device, case.batch_size, out)
    params = sum(p.numel() for p in t.model.parameters())
    g = torch.Generator(device=t.device).manual_seed(0)

    def step() -> None:
        t.train_step(case.batch, g)

    row = TrainRow(case.name, params, case.batch_size, case.length, None, case.tokens, None, None,
                   None)  # fmt: skip
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        row.ms = 1e3 * (time.perf_counter() - t0) / steps
        if device == "cuda":
            row.peak_mib = torch.cuda.max_memory_allocated() / 2**20
            row.launches = sum(kernel_counts(kernel_times(step)).values())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            row.syncs = sum("synchronizing" in str(w.message) for w in caught)
        elif not case.name.endswith("+c"):  # compiled CPU code dispatches no operators
            row.launches = sum(count_dispatched(step).values())
    except torch.OutOfMemoryError:
        row.ms = None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def run_train(args: argparse.Namespace) -> int:
    if (device := bench_device(args, "train")) is None:
        return 2
    pairs, batches, length, steps, warmup = DEFAULTS[device]
    pairs = args.pairs or pairs
    batches = args.batches or batches
    length = args.length or length
    steps = args.steps or steps
    warmup = args.warmup if args.warmup is not None else warmup
    header = {**run_header(device), "autocast": "bf16" if device == "cuda" else "off",
              "length": length, "steps": steps, "warmup": warmup}  # fmt: skip
    print_header(header)
    print(COLUMNS)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in pairs:
            compiled = None  # one compiled objective per preset: dynamic shapes, one compile
            for b in batches:
                yan = yan_setup(name, b, length, device)
                todo = [yan]
                if args.compile:
                    if compiled is None:
                        compiled = yan_setup(name, b, length, device).objective
                        compiled.compile_loss()
                    todo.append(replace(yan, name=f"{name}+c", objective=compiled))
                if not args.no_ar:
                    vocab = yan.objective.model.config.vocab_size
                    todo.append(ar_setup(AR_PAIRS[name], vocab, b, length, device))
                for case in todo:
                    row = measure(case, device, steps, warmup, out)
                    rows.append(row)
                    print(row.line(), flush=True)
    where = (
        "CUDA: launches from\ntorch.profiler, syncs from the sync debug mode, peak from the"
        " caching allocator."
        if device == "cuda"
        else "CPU: launches = operators\ndispatched that would launch a GPU kernel (a proxy;"
        " none for compiled rows); syncs\nand peak are CUDA-only."
    )
    return finish(
        args,
        header,
        rows,
        "ms/step: the mean of --steps back-to-back Trainer.train_step calls after --warmup, timed"
        "\nto the last one's end. tokens/s: target tokens (YAN: every target position; AR: the"
        " target\nhalf of each sequence). " + where,
    )


def _pair_list(text: str) -> list[str]:
    return choice_list(text, list(AR_PAIRS), "YAN preset")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU")  # fmt: skip
    p.add_argument("--pairs", type=_pair_list,
                   help="YAN presets, each with its AR pair (default CUDA yan-tiny,yan-small;"
                   " CPU yan-tiny)")  # fmt: skip
    p.add_argument("--batches", type=int_list, help="batch sizes (default CUDA 64,256; CPU 4)")
    p.add_argument("--length", type=positive_int, help="source and target tokens (default CUDA 128;"
                   " CPU 32)")  # fmt: skip
    p.add_argument("--steps", type=positive_int, help="timed steps (default CUDA 20; CPU 3)")
    p.add_argument("--warmup", type=count_int, help="untimed steps first (default CUDA 3; CPU 1)")
    p.add_argument("--no-ar", action="store_true", help="YAN rows only")
    p.add_argument("--compile", action="store_true",
                   help="also YAN with its loss under torch.compile (rows `+c`; the compile"
                   " happens in the warm-up steps)")  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=run_train)
