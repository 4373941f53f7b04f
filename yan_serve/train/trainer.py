"""The training loop shared by stage 1, stage 2 and fine-tuning.

AdamW (0.9, 0.999), weight decay 0.01, linear warm-up then constant LR, gradient clipping,
bf16 autocast on CUDA, validation loss on fixed batches, resumable checkpoints. Multi-GPU and
multi-node through torchrun: the objective is an nn.Module wrapped in DistributedDataParallel,
rank 0 logs and saves.

    torchrun --nproc_per_node 8 -m yan_serve.cli train stage2 --init runs/s1 --out runs/s2 ...
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from yan_serve.device import resolve_device
from yan_serve.model import YAN
from yan_serve.tokenizer import YANTokenizer
from yan_serve.train.data import Batch
from yan_serve.train.objectives import Stage1Weights, Stage2Weights, stage1_loss, stage2_loss
from yan_serve.weights import from_pretrained, save_pretrained

STAGES = ("stage1", "stage2", "finetune")


@dataclass
class TrainConfig:
    stage: str
    out: str
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 1000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 8
    save_every: int = 1000
    seed: int = 0
    device: str = "auto"
    stage1: Stage1Weights = field(default_factory=Stage1Weights)
    stage2: Stage2Weights = field(default_factory=Stage2Weights)
    freeze_autoencoder: bool = True  # stage 2 and fine-tuning train only the flow

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


class Objective(nn.Module):
    """Model + stage loss in one forward, so DistributedDataParallel syncs its gradients."""

    def __init__(self, model: YAN, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if self.cfg.stage == "stage1":
            return stage1_loss(
                self.model, batch.src, batch.tgt, batch.tgt_mask, self.cfg.stage1, generator
            )
        return stage2_loss(
            self.model, batch.src, batch.src_mask, batch.tgt, batch.tgt_mask, self.cfg.stage2,
            freeze_autoencoder=self.cfg.freeze_autoencoder, generator=generator,
        )  # fmt: skip


def trainable_parameters(model: YAN, cfg: TrainConfig) -> list[nn.Parameter]:
    """Stage 1: embeddings + encoder + decoder. Stage 2 / fine-tune: the flow (unless unfrozen)."""
    if cfg.stage == "stage1":
        train = [model.tok_emb, model.pos_emb, model.encoder, model.decoder]
        frozen = [model.flow]
    elif cfg.freeze_autoencoder:
        train, frozen = [model.flow], [model.tok_emb, model.pos_emb, model.encoder, model.decoder]
    else:
        train, frozen = [model], []
    for m in frozen:
        m.requires_grad_(False)
    for m in train:
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


class Trainer:
    def __init__(
        self,
        model: YAN,
        tokenizer: YANTokenizer,
        cfg: TrainConfig,
        train_batches: Iterator[Batch],
        val_batches: list[Batch] | None = None,
        log=print,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.distributed = dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = 0
        if self.distributed:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank = dist.get_rank()
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                cfg.device = f"cuda:{local}"
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.params = trainable_parameters(self.model, cfg)
        self.objective: nn.Module = Objective(self.model, cfg)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, foreach=True
        )
        self.train_batches = train_batches
        self.val_batches = val_batches or []
        self.step = 0
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.history: list[dict] = []
        self.gen: torch.Generator | None = None  # the training draws (noise, routing, masks)
        self._resumed_gen: torch.Tensor | None = None
        self._logged = 0  # history records already in training_log.jsonl

    # ---------------------------------------------------------------- state
    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def save(self) -> None:
        if self.rank != 0:
            return
        save_pretrained(self.model, self.out, self.tokenizer, {"stage": self.cfg.stage,
                                                               "step": str(self.step)})  # fmt: skip
        torch.save(self.opt.state_dict(), self.out / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.gen is not None:
            rng["train"] = self.gen.get_state()  # rank 0's; other ranks re-seed on resume
        torch.save(rng, self.out / "rng_state.pt")
        with (self.out / "training_log.jsonl").open("a") as f:  # records since the last save
            for rec in self.history[self._logged :]:
                f.write(json.dumps(rec) + "\n")
        self._logged = len(self.history)
        state = {"step": self.step, "train_config": _jsonable(asdict(self.cfg))}
        (self.out / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

    def resume(self) -> bool:
        """Continue from `out` if it holds a checkpoint of this stage. Returns True if resumed."""
        f = self.out / "trainer_state.json"
        if not f.exists():
            return False
        state = json.loads(f.read_text())
        if state["train_config"]["stage"] != self.cfg.stage:
            raise ValueError(f"{self.out} holds a {state['train_config']['stage']} run, not "
                             f"{self.cfg.stage}")  # fmt: skip
        loaded = from_pretrained(self.out, device=self.device)
        self.model.load_state_dict(loaded.state_dict())
        opt_state = torch.load(self.out / "optimizer.pt", map_location=self.device,
                               weights_only=True)  # fmt: skip
        self.opt.load_state_dict(opt_state)
        self.step = int(state["step"])
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
        self.log(f"resumed {self.cfg.stage} from {self.out} at step {self.step}")
        return True

    # ------------------------------------------------------------------ run
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        self.model.eval()
        g = torch.Generator(device=self.device).manual_seed(1234)  # same draws every time
        sums: dict[str, float] = {}
        for b in self.val_batches:
            with self._autocast():
                terms = self.objective(b.to(self.device), g)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train()
        return {f"val_{k}": v / len(self.val_batches) for k, v in sums.items()}

    def train(self) -> dict:
        cfg = self.cfg
        self.model.train()
        torch.set_flush_denormal(True)  # RBF kernels underflow; denormal arithmetic is slow on x86
        t0 = time.time()
        start = self.step
        window: dict[str, float] = {}
        n_window = 0
        best_val = math.inf
        g = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * self.rank)
        if self._resumed_gen is not None:
            g.set_state(self._resumed_gen)
        self.gen = g
        self.log(f"{cfg.stage}: {sum(p.numel() for p in self.params) / 1e6:.2f}M trainable "
                 f"parameters on {self.device}, {cfg.steps} steps of {cfg.batch_size}")  # fmt: skip
        while self.step < cfg.steps:
            batch = next(self.train_batches).to(self.device)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, cfg)
            with self._autocast():
                terms = self.objective(batch, g)
            self.opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            if not torch.isfinite(gnorm):
                self.log(f"step {self.step}: non-finite gradient norm, update skipped")
            else:
                self.opt.step()
            self.step += 1
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            n_window += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rate = (self.step - start) / max(time.time() - t0, 1e-9)
                eta = (cfg.steps - self.step) / max(rate, 1e-9)
                avg = {k: v / n_window for k, v in window.items()}
                rec = {"step": self.step, "lr": lr_at(self.step - 1, cfg), **avg}
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    rec.update(self.validate())
                    best_val = min(best_val, rec.get("val_loss", math.inf))
                self.history.append(rec)
                shown = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k not in ("step",))
                self.log(f"[{cfg.stage}] step {self.step}/{cfg.steps} {shown} "
                         f"({rate:.2f} it/s, eta {eta / 60:.1f} min)")  # fmt: skip
                window, n_window = {}, 0
            if self.step % cfg.save_every == 0:
                self.save()
        self.save()
        wall = time.time() - t0
        summary = {
            "stage": cfg.stage,
            "steps": self.step,
            "wall_seconds": round(wall, 1),
            "device": str(self.device),
            "final": self.history[-1] if self.history else {},
            "best_val_loss": None if best_val == math.inf else best_val,
            "out": str(self.out),
        }
        self.log(f"done: {cfg.stage} {self.step} steps in {wall / 60:.1f} min on {self.device}; "
                 f"last {_fmt(summary['final'])}; saved to {self.out}")  # fmt: skip
        return summary


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def eprint(*a, **k) -> None:
    print(*a, file=sys.stderr, flush=True, **k)
