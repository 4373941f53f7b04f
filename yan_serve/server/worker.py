"""The model worker: owns the checkpoint and runs batches of jobs on one thread.

`YANWorker` is the YAN backend (reference pure-torch sampler; the fused/graph-captured sampler
plugs in here on CUDA). Any other backend (the AR baseline) only has to load a tokenizer and
implement `run` for the same `Job`s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.server.batcher import Job
from yan_serve.weights import from_pretrained, load_labels, load_tokenizer

log = logging.getLogger("yan_serve.worker")


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    return torch.device(spec)


class YANWorker:
    kind = "yan"

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        self.model = from_pretrained(self.model_dir, device=self.device)
        self.tokenizer = load_tokenizer(self.model_dir, self.model.config)
        self.labels = load_labels(self.model_dir)
        self.sampler = Sampler(self.model)
        self.model_id = self.model_dir.name
        self.max_length = self.model.config.max_length
        self.default_steps = self.model.config.ode_steps
        self.created = int(self.model_dir.stat().st_mtime)

    def warmup(self, steps: int) -> float:
        """Run one small batch per length bucket so first requests meet a warm model."""
        t0 = time.perf_counter()
        sp = self.tokenizer.special
        n = 16
        while True:
            L = min(n, self.max_length)
            src = [sp.bos] * L
            self.sampler.generate([GenerationRequest(src, L, 0)] * 2, steps=steps)
            if self.max_length <= L:
                break
            n *= 2
        return time.perf_counter() - t0

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        first = jobs[0]
        reqs = [GenerationRequest(j.src, j.tgt_len, j.seed, j.temperature, j.top_k) for j in jobs]
        if first.target is not None:
            return self.sampler.score(reqs, [j.target for j in jobs], first.steps, first.routing)
        hooks = [(i, j.on_step) for i, j in enumerate(jobs) if j.on_step is not None]

        def on_step(step: int, tokens: torch.Tensor) -> None:
            for i, cb in hooks:
                cb(step, tokens[i, : jobs[i].tgt_len].tolist())

        return self.sampler.generate(
            reqs, first.steps, first.routing, on_step=on_step if hooks else None
        )
