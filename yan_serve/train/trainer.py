"""The one training loop: YAN's stages and the AR baseline are objectives it optimizes.

AdamW (0.9, 0.999; the fused kernel), linear warm-up then constant LR, gradient clipping (a
non-finite norm skips the update, decided on the device), bf16 autocast on CUDA, validation loss
on fixed batches, resumable checkpoints. A training step never waits for the device: the loss
terms are summed there and read once per log line.
Multi-GPU and multi-node through torchrun: the objective is an nn.Module wrapped in
DistributedDataParallel, each rank draws its own seeded batch stream, rank 0 logs and saves.

    torchrun --nproc_per_node 8 -m yan_serve.cli train stage2 --init runs/s1 --out runs/s2 ...

What is trained is an `Objective`: the batches of a split, the loss of a batch, how its model is
saved and loaded. `yan_serve.train.objectives.YANObjective` is a YAN stage (stage 1, stage 2,
fine-tuning), `yan_serve.ar.train.ARObjective` the GPT-2 baseline.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from yan_serve.device import resolve_device


@dataclass
class Schedule:
    """How long and how hard a model is optimized: `steps` updates of `batch_size` examples, the
    learning rate reached after `warmup` steps and held, then taken linearly to zero over the last
    `decay` steps (0: held to the end, the paper's schedule); see `lr_at`."""

    steps: int = 1000
    batch_size: int = 32
    lr: float | None = None  # None: the objective's `default_lr`
    warmup: int = 1000
    decay: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.decay <= self.steps:
            raise ValueError(f"decay must be between 0 and steps ({self.steps}), got {self.decay}")


@dataclass(kw_only=True)
class TrainConfig(Schedule):
    """One run of the loop, whatever its objective: the schedule plus where it writes, how often
    it logs, validates and saves, and where it runs."""

    out: str
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 8
    save_every: int = 1000
    seed: int = 0
    device: str = "auto"
    # stop (and save) once this much wall time has passed, whatever `steps` says: a run given a
    # fixed window (a lent GPU) ends on time. The time trained is saved with the checkpoint, so
    # the budget (and the decay that follows it) counts the whole run across `--resume`s: a
    # resumed run continues with what is left of it (raise it to train longer)
    max_minutes: float | None = None
    # the objective's loss under torch.compile (`Objective.compile_loss`): fewer, fused kernels
    # per step, after a compile of a minute or more on the first batches
    compile: bool = False
    # build this many training batches ahead in a worker process (`prefetch`); None: 4 on
    # CUDA, where building a batch in Python would otherwise leave the GPU idle, else 0
    prefetch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        every = {"log_every": self.log_every, "eval_every": self.eval_every,
                 "eval_batches": self.eval_batches, "save_every": self.save_every}  # fmt: skip
        for name, v in every.items():
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0, got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_minutes is not None and not self.max_minutes >= 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")


class _Stream(torch.utils.data.IterableDataset):
    """An existing iterator as a DataLoader dataset (its one worker inherits it by fork)."""

    def __init__(self, it: Iterator) -> None:
        self.it = it

    def __iter__(self) -> Iterator:
        return self.it


def prefetch(stream: Iterator, depth: int, pin: bool = False) -> Iterator:
    """`stream`'s items, built `depth` ahead in one forked worker process (a `DataLoader` over the
    iterator, items passed through unbatched), so that building batches in Python overlaps the
    training step instead of leaving the accelerator idle. The worker draws the items in the
    same order from the same seeded state, so the stream is exactly the one it wraps. The worker
    only builds batches on the CPU; it stops when the returned iterator is dropped. With `pin`
    (CUDA) the loader's thread copies each item into page-locked memory (its `pin_memory()`),
    from which `.to(device, non_blocking=True)` does not wait for the device: a copy from
    pageable memory first waits for all the work queued before it."""
    if depth <= 0:
        return stream
    loader = torch.utils.data.DataLoader(
        _Stream(stream), batch_size=None, num_workers=1, prefetch_factor=depth,
        multiprocessing_context="fork", pin_memory=pin,
    )  # fmt: skip
    return iter(loader)


class Objective(nn.Module):
    """What one run trains. The loop needs from it:

    * `name`: the run's kind (`stage1`, `ar`, ...): the log prefix, recorded with every checkpoint
      and checked on resume;
    * `batches(split, batch_size, seed)`: an endless stream of batches of `split` (objects with
      `.to(device)`), a deterministic function of `seed`;
    * `forward(batch, generator)`: the loss terms of a batch, the optimized one under "loss"
      (as the module's forward, DistributedDataParallel around the objective syncs the
      gradients); `generator` draws its randomness, so a resumed run continues the same draws;
    * `save(out, step)` / `load(out, device)`: the model's checkpoint directory.

    `self.model` is the trained model; `trainable()` picks the parameters the optimizer updates,
    `default_lr` is the learning rate when the config gives none, `tasks` the task formats it
    trains on and `target_tokens(batch)` how many target tokens a batch holds.
    """

    name: str
    default_lr: float
    log_file = "training_log.jsonl"  # the records of `Trainer.history`, beside the checkpoint
    tasks: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Any]:
        raise NotImplementedError

    def target_tokens(self, batch: Any) -> int:
        raise NotImplementedError

    def save(self, out: Path, step: int) -> None:
        raise NotImplementedError

    def load(self, out: Path, device: torch.device) -> None:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The objective's own settings, recorded in trainer_state.json."""
        return {}

    def compile_loss(self) -> bool:
        """Put the loss under `torch.compile` where the objective has such a path; False where
        it runs eager."""
        return False


def lr_at(step: int, cfg: Schedule, time_done: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to zero over the last
    `decay` steps (step counts from 0; the last step gets lr / decay).

    A run with a time budget may end before its step count: `time_done` is the share of that
    budget spent, and the decay follows whichever of steps and time is further along, over the
    same share (`decay / steps`) of it."""
    assert cfg.lr is not None, "the trainer sets the objective's default_lr"
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.decay:
        left = min(cfg.steps - step, (1.0 - time_done) * cfg.steps)  # in steps
        lr *= min(1.0, max(left, 1.0) / cfg.decay)
    return lr


class Trainer:
    """Runs `cfg` on `objective`. Without explicit streams it draws the training batches from
    `objective.batches("train", ...)` and `cfg.eval_batches` fixed validation batches from
    `"val"` (seeded `seed + 1`)."""

    def __init__(
        self,
        objective: Objective,
        cfg: TrainConfig,
        train_batches: Iterator[Any] | None = None,
        val_batches: list[Any] | None = None,
        log=print,
    ) -> None:
        self.distributed = dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = 0
        if self.distributed:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank = dist.get_rank()
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                cfg = replace(cfg, device=f"cuda:{local}")
        if cfg.lr is None:
            cfg = replace(cfg, lr=objective.default_lr)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.objective = objective.to(self.device)
        self.model = objective.model
        self.params = objective.trainable()
        self.loss_fn: nn.Module = objective
        if cfg.compile and not objective.compile_loss():
            log(f"{objective.name}: no compiled loss for this objective; it runs eagerly")
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_fn = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        # The fused AdamW (CUDA and CPU): one kernel for the whole update, and it takes
        # `found_inf`, so a step with a non-finite gradient is skipped on the device: a GPU
        # step never waits for the host to look at the gradient norm
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True
        )
        if train_batches is None:
            train_batches = objective.batches("train", cfg.batch_size, cfg.seed + 7919 * self.rank)
        depth = cfg.prefetch if cfg.prefetch is not None else 4 * (self.device.type == "cuda")
        train_batches = prefetch(train_batches, depth, pin=self.device.type == "cuda")
        if val_batches is None:
            val_stream = objective.batches("val", cfg.batch_size, cfg.seed + 1)
            val_batches = [next(val_stream) for _ in range(cfg.eval_batches)]
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.step = 0
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.history: list[dict] = []
        self.gen: torch.Generator | None = None  # the training draws (noise, routing, masks)
        self._resumed_gen: torch.Tensor | None = None
        self._logged = 0  # history records already in the log file
        # training time (seconds) of earlier sessions of this run, restored by `resume`, and
        # when this session's `train` started: the time budget counts both
        self.elapsed_before = 0.0
        self._started: float | None = None

    # ---------------------------------------------------------------- state
    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def save(self) -> None:
        """Write the checkpoint so that a kill at any point leaves one consistent set on disk.

        Every file (weights, optimizer, random state, the whole log, trainer_state.json) is
        written into `STAGING` first; renaming that directory to `READY` is the commit point;
        then its files replace the run's one by one, trainer_state.json last. A kill before the
        commit leaves the previous checkpoint untouched (the staging is discarded), one after it
        is finished by the next `resume` (`finish_save`), so the weights a run resumes never
        belong to another step than its trainer state."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        stage, ready = self.out / STAGING, self.out / READY
        finish_save(self.out)  # a committed save a kill interrupted goes in before this one
        shutil.rmtree(stage, ignore_errors=True)  # and an uncommitted one is dropped
        stage.mkdir()
        self.objective.save(stage, self.step)
        torch.save(self.opt.state_dict(), stage / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.gen is not None:
            rng["train"] = self.gen.get_state()  # rank 0's; other ranks re-seed on resume
        torch.save(rng, stage / "rng_state.pt")
        log = self.out / self.objective.log_file
        if log.exists():  # the whole log, replaced with the rest: appending is not repeatable
            shutil.copyfile(log, stage / log.name)
        with (stage / log.name).open("a") as f:  # records since the last save
            for rec in self.history[self._logged :]:
                f.write(json.dumps(rec) + "\n")
        run = {"stage": self.objective.name, **asdict(self.cfg), **self.objective.settings()}
        state = {"step": self.step, "elapsed_seconds": round(self.elapsed(), 3),
                 "train_config": _jsonable(run)}  # fmt: skip
        (stage / STATE).write_text(json.dumps(state, indent=2) + "\n")
        os.replace(stage, ready)  # the commit point
        finish_save(self.out)
        self._logged = len(self.history)

    def resume(self) -> bool:
        """Continue from `out` if it holds a checkpoint of this objective. Returns True if
        resumed."""
        if self.rank == 0:
            finish_save(self.out)  # a save a kill interrupted after its commit point
        if self.distributed:
            dist.barrier()
        f = self.out / STATE
        if not f.exists():
            return False
        try:
            state = json.loads(f.read_text())
            held, step = state["train_config"]["stage"], int(state["step"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{f} is not a trainer state this version wrote") from None
        name = self.objective.name
        if held != name:
            raise ValueError(f"{self.out} holds a {held} run, not {name}")
        try:
            self.objective.load(self.out, self.device)
        except RuntimeError as e:  # load_state_dict: a run of another model shape
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f"{self.out} holds a run of another model shape than this one ({first})"
            ) from None
        opt_state = torch.load(self.out / "optimizer.pt", map_location=self.device,
                               weights_only=True)  # fmt: skip
        self.opt.load_state_dict(opt_state)
        for group in self.opt.param_groups:  # a run saved by the foreach AdamW continues fused
            group.update(fused=True, foreach=None)
            for p in group["params"]:
                st = self.opt.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(p.device, torch.float32)
        self.step = step
        # the training time already spent (runs saved before it was recorded: none), so that a
        # time budget and the decay that follows it continue where they stopped
        self.elapsed_before = float(state.get("elapsed_seconds", 0.0))
        rng_file = self.out / "rng_state.pt"
        if rng_file.exists():  # the noise and routing draws continue where they stopped
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            if not self.distributed:
                self._resumed_gen = rng.get("train")
        # the batch stream is deterministic: skip what the saved steps consumed, so a resumed run
        # sees the same batches as an uninterrupted one
        for _ in range(self.step):
            next(self.train_batches)
        self.log(f"resumed {name} from {self.out} at step {self.step}")
        return True

    def elapsed(self) -> float:
        """Seconds this run has trained, earlier sessions included."""
        now = 0.0 if self._started is None else time.time() - self._started
        return self.elapsed_before + now

    # ------------------------------------------------------------------ run
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        self.objective.eval()
        g = torch.Generator(device=self.device).manual_seed(1234)  # same draws every time
        sums: dict[str, float] = {}
        for b in self.val_batches:
            with self._autocast():
                terms = self.loss_fn(b.to(self.device), g)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.objective.train()
        return {f"val_{k}": v / len(self.val_batches) for k, v in sums.items()}

    def train_step(
        self, batch: Any, generator: torch.Generator
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One update on `batch` (on the device) at the optimizer's current learning rate:
        (the loss terms, 1.0 where the update was skipped for a non-finite gradient norm else
        0.0), all device tensors: nothing here waits for the device."""
        with self._autocast():
            terms = self.loss_fn(batch, generator)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        # the protocol GradScaler uses with fused optimizers: found_inf, a float32 scalar
        bad = (~torch.isfinite(gnorm)).float()
        self.opt.found_inf = bad  # type: ignore[attr-defined]
        self.opt.step()
        return terms, bad

    def train(self) -> dict:
        cfg, name = self.cfg, self.objective.name
        self.objective.train()
        torch.set_flush_denormal(True)  # RBF kernels underflow; denormal arithmetic is slow on x86
        t0 = self._started = time.time()  # this session's start (its rate and wall time)
        start = self.step
        window: dict[str, float] = {}
        n_window = 0
        skipped: torch.Tensor | None = None  # steps skipped since the last log, on the device
        tokens = 0
        best_val = math.inf
        g = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * self.rank)
        if self._resumed_gen is not None:
            g.set_state(self._resumed_gen)
        self.gen = g
        self.log(f"{name}: {sum(p.numel() for p in self.params) / 1e6:.2f}M trainable "
                 f"parameters on {self.device}, {cfg.steps} steps of {cfg.batch_size}")  # fmt: skip
        stopped = None
        while self.step < cfg.steps:
            if cfg.max_minutes is not None and self.elapsed() >= 60 * cfg.max_minutes:
                stopped = f"time limit of {cfg.max_minutes:g} min reached"
                break
            batch = next(self.train_batches)
            tokens += self.objective.target_tokens(batch)  # on the host: no device sync
            batch = batch.to(self.device, non_blocking=True)  # pinned when prefetched on CUDA
            spent = 0.0 if cfg.max_minutes is None else self.elapsed() / (60 * cfg.max_minutes)
            lr = lr_at(self.step, cfg, spent)
            for group in self.opt.param_groups:
                group["lr"] = lr
            terms, bad = self.train_step(batch, g)
            skipped = bad if skipped is None else skipped + bad
            self.step += 1
            for k, v in terms.items():  # summed on the device, read once per log line
                window[k] = window.get(k, 0.0) + v.detach().float()
            n_window += 1
            log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
            # validation has its own cadence: an --eval-every that is not a multiple of
            # --log-every still validates, on a record of its own
            eval_now = self.step % cfg.eval_every == 0 or self.step == cfg.steps
            if log_now or eval_now:
                rate = (self.step - start) / max(time.time() - t0, 1e-9)
                eta = (cfg.steps - self.step) / max(rate, 1e-9)
                rec = {"step": self.step, "lr": lr}
            if log_now:
                rec.update({k: float(v) / n_window for k, v in window.items()})
                if skipped is not None and (n := int(skipped.item())):
                    self.log(f"steps {self.step - n_window + 1}-{self.step}: {n} with a"
                             " non-finite gradient norm, their updates skipped")  # fmt: skip
                skipped = None
                window, n_window = {}, 0
            if eval_now:
                rec.update(self.validate())
                best_val = min(best_val, rec.get("val_loss", math.inf))
            if log_now or eval_now:
                self.history.append(rec)
                shown = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k not in ("step",))
                self.log(f"[{name}] step {self.step}/{cfg.steps} {shown} "
                         f"({rate:.2f} it/s, eta {eta / 60:.1f} min)")  # fmt: skip
            if self.step % cfg.save_every == 0:
                self.save()
        self.save()
        wall = time.time() - t0
        self.elapsed_before, self._started = self.elapsed_before + wall, None
        summary = {
            "stage": name,
            "steps": self.step,
            "wall_seconds": round(wall, 1),
            "device": str(self.device),
            "final": self.history[-1] if self.history else {},
            "best_val_loss": None if best_val == math.inf else best_val,
            "target_tokens": tokens,
            "out": str(self.out),
        }
        if stopped:
            summary["stopped"] = stopped
            self.log(f"{name}: {stopped} at step {self.step}/{cfg.steps} (the budget counts the "
                     "whole run: --resume with a larger --max-minutes continues)")  # fmt: skip
        self.log(f"done: {name} {self.step} steps in {wall / 60:.1f} min on {self.device}; "
                 f"last {_fmt(summary['final'])}; saved to {self.out}")  # fmt: skip
        return summary


STATE = "trainer_state.json"  # written last: a run is resumable from where it says
STAGING = ".save-staging"  # a save being written (discarded if a kill leaves it)
READY = ".save-ready"  # a complete save whose files are being moved into place


def finish_save(out: Path) -> None:
    """Move a committed save (`READY`, see `Trainer.save`) into `out`, trainer_state.json last,
    and drop it. Repeatable: a kill in the middle leaves the rest for the next call."""
    ready = Path(out) / READY
    if not ready.is_dir():
        return
    files = sorted((f for f in ready.iterdir() if f.name != STATE), key=lambda f: f.name)
    for f in [*files, ready / STATE]:
        if f.exists():
            if f.is_dir():  # nothing writes directories today; a checkpoint might one day
                shutil.rmtree(Path(out) / f.name, ignore_errors=True)
            os.replace(f, Path(out) / f.name)
    shutil.rmtree(ready)


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def eprint(*a, **k) -> None:
    print(*a, file=sys.stderr, flush=True, **k)
