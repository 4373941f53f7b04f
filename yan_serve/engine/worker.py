"""`YANWorker`: a YAN checkpoint serving batches of `EngineRequest`s on one thread.

The reference sampler runs everywhere; on CUDA the graph-captured sampler serves plain generate
batches (no previews) wherever a captured shape holds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from yan_serve.device import resolve_device
from yan_serve.engine.requests import EngineRequest, Result, TopLogprobs, content_positions, scored
from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.weights import from_pretrained, load_labels, load_tokenizer

log = logging.getLogger("yan_serve.worker")


class CheckpointWorker:
    """What every backend's `Worker` reads the same way: the device, and from the checkpoint
    directory its id (the directory's name), its modification time and its class labels."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.model_id = self.model_dir.name
        self.created = int(self.model_dir.stat().st_mtime)
        self.labels = load_labels(self.model_dir)


class YANWorker(CheckpointWorker):
    """Implements `yan_serve.engine.requests.Worker` for YAN checkpoints."""

    kind = "yan"

    def __init__(
        self, model_dir: str | Path, device: str = "auto", linears: str = "cublas"
    ) -> None:
        super().__init__(model_dir, device)
        self.model = from_pretrained(self.model_dir, device=self.device)
        self.tokenizer = load_tokenizer(self.model_dir, self.model.config)
        self.sampler = Sampler(self.model, linears=linears)
        self.graphs = None  # CUDA: the graph-captured sampler for plain generate requests
        if self.device.type == "cuda":
            # Weights stay fp32 on CUDA: a batch is padded to a captured shape chosen by its
            # batch-mates, which changes matmul shapes; in fp32 that moves values by ~1e-7 and
            # tokens stay put (near-ties aside); in bf16 by ~4e-3, and a seeded request's tokens
            # would depend on its batch.
            from yan_serve.engine.graphs import GraphSampler, cuda_graphs_supported

            if cuda_graphs_supported(self.model):
                self.graphs = GraphSampler(self.sampler)
            else:
                log.warning("CUDA without the Triton kernels: no CUDA graphs, eager sampling")
        self.max_length = self.model.config.max_length
        self.infill_masks = self.model.config.infill_masks
        self.default_steps = self.model.config.ode_steps

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
        if self.graphs is not None:  # CUDA: capture before /ready turns 200
            from yan_serve.engine.graphs import Ladder

            try:
                rep = self.graphs.capture(Ladder(steps=steps))
            except Exception:  # serve eagerly rather than not at all
                log.exception("CUDA graph capture failed: sampling eagerly")
                self.graphs = None
            else:
                log.info(
                    "captured %d CUDA graphs (%d skipped) in %.1f s, %.0f MiB of device memory",
                    rep.graphs, rep.skipped, rep.seconds, rep.device_bytes / 2**20,
                )  # fmt: skip
        return time.perf_counter() - t0

    def run(self, requests: Sequence[EngineRequest]) -> list[Result]:
        first = requests[0]
        reqs = [
            GenerationRequest(r.src, r.tgt_len, r.seed, r.temperature, r.top_k, _content(r))
            for r in requests
        ]
        if first.scores:
            targets = [r.target or [] for r in requests]
            logps = self.sampler.score(reqs, targets, first.steps, first.routing)
            return scored(
                requests,
                logps,
                lambda idx, k: self._top_logprobs([reqs[i] for i in idx], first, k),
            )
        hooks = [(i, r.on_step) for i, r in enumerate(requests) if r.on_step is not None]

        def on_step(step: int, tokens: torch.Tensor) -> None:
            for i, cb in hooks:
                cb(step, tokens[i, : requests[i].tgt_len].tolist())

        if self.graphs is not None and not hooks:  # CUDA: graphs where a shape fits, else eager
            return self.graphs.generate(reqs, first.steps, first.routing)
        return self.sampler.generate(
            reqs, first.steps, first.routing, on_step=on_step if hooks else None
        )

    @torch.no_grad()
    def _top_logprobs(
        self, reqs: list[GenerationRequest], first: EngineRequest, k: int
    ) -> list[TopLogprobs]:
        """The k most likely tokens at every target position of each request, read from the
        decoder table of the same latent `Sampler.score` scores (same requests, same seeds)."""
        batch = self.sampler.prepare(reqs)
        z = self.sampler.solve(batch, first.steps, first.routing).z
        logp = torch.log_softmax(self.model.decode_logits(z).float(), dim=-1)
        vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        ids, vals = ids.tolist(), vals.tolist()
        return [
            [list(zip(ids[i][p], vals[i][p], strict=True)) for p in range(r.tgt_len)]
            for i, r in enumerate(reqs)
        ]


def _content(request: EngineRequest) -> tuple[int, ...]:
    """An infill request's positions that must hold a content token (none when the request
    allows empty fills, or for other tasks)."""
    if request.plan is None or request.options.allow_empty:
        return ()
    return content_positions(request.plan)
