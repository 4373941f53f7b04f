"""The model worker: owns the checkpoint and runs batches of jobs on one thread.

`YANWorker` is the YAN backend (reference pure-torch sampler; the fused/graph-captured sampler
plugs in here on CUDA). Any other backend (the AR baseline) only has to load a tokenizer and
implement `run` for the same `Job`s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yan_serve.device import resolve_device
from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.engine.tasks import content_positions
from yan_serve.server.batcher import Job
from yan_serve.weights import from_pretrained, load_labels, load_tokenizer

log = logging.getLogger("yan_serve.worker")


@dataclass
class Scored:
    """A score job's result when it asked for `extra["top_logprobs"] = k`: the target's
    log-probabilities and, at every target position, the k most likely (token id, logprob)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


def _with_top(jobs: Sequence[Job], logps: list[list[float]], top_of) -> list[Any]:
    """Score results, as `Scored` for the jobs that asked for top log-probabilities (computed
    by `top_of(indices, k)` for those jobs only)."""
    want = [i for i, j in enumerate(jobs) if j.extra.get("top_logprobs", 0) > 0]
    if not want:
        return logps
    k = max(jobs[i].extra["top_logprobs"] for i in want)
    tops = dict(zip(want, top_of(want, k), strict=True))
    return [Scored(lp, tops[i]) if i in tops else lp for i, lp in enumerate(logps)]


class YANWorker:
    kind = "yan"

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.model = from_pretrained(self.model_dir, device=self.device)
        self.tokenizer = load_tokenizer(self.model_dir, self.model.config)
        self.labels = load_labels(self.model_dir)
        self.sampler = Sampler(self.model)
        self.graphs = None  # CUDA: the graph-captured sampler for plain generate jobs
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

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        first = jobs[0]
        reqs = [
            GenerationRequest(j.src, j.tgt_len, j.seed, j.temperature, j.top_k, _content(j))
            for j in jobs
        ]
        if first.target is not None:
            logps = self.sampler.score(reqs, [j.target for j in jobs], first.steps, first.routing)
            return _with_top(
                jobs,
                logps,
                lambda idx, k: self._top_logprobs([reqs[i] for i in idx], first, k),
            )
        hooks = [(i, j.on_step) for i, j in enumerate(jobs) if j.on_step is not None]

        def on_step(step: int, tokens: torch.Tensor) -> None:
            for i, cb in hooks:
                cb(step, tokens[i, : jobs[i].tgt_len].tolist())

        if self.graphs is not None and not hooks:  # CUDA: graphs where a shape fits, else eager
            return self.graphs.generate(reqs, first.steps, first.routing)
        return self.sampler.generate(
            reqs, first.steps, first.routing, on_step=on_step if hooks else None
        )

    @torch.no_grad()
    def _top_logprobs(
        self, reqs: list[GenerationRequest], first: Job, k: int
    ) -> list[list[tuple[int, float]]]:
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


def _content(job: Job) -> tuple[int, ...]:
    """An infill job's positions that must hold a content token (none when the request allows
    empty fills, or for other tasks)."""
    plan = job.extra.get("plan")
    if plan is None or job.extra.get("allow_empty"):
        return ()
    return content_positions(plan)


class ARWorker:
    """The GPT-2 baseline behind the same endpoints: KV-cache decoding of the same task formats
    (source, BOS, then the target), read back into YAN's target layout so the app's task code
    is shared. Infill uses fill-in-the-middle (only the spans) unless a job asks for the paper's
    protocol (`full`: regenerate the passage). `steps` and `routing` do not apply."""

    kind = "ar"

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        from yan_serve.ar.model import load_ar
        from yan_serve.tokenizer import YANTokenizer

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.model = load_ar(self.model_dir, self.device)
        self.tokenizer = YANTokenizer.load(self.model_dir)
        self.labels = load_labels(self.model_dir)
        cfg = self.model.config
        self.model_id = self.model_dir.name
        self.max_length = int(getattr(cfg, "yan_max_length", cfg.n_positions // 2))
        self.default_steps = 1
        self.created = int(self.model_dir.stat().st_mtime)
        self.static = None  # CUDA: a FusedRunner (or StaticRunner) replaying CUDA graphs

    def warmup(self, steps: int) -> float:
        t0 = time.perf_counter()
        sp = self.tokenizer.special
        self._generate([Job([sp.bos] * 8, 4, 0, 1)])
        if self.device.type == "cuda":  # capture before /ready turns 200
            from yan_serve.ar.fused import FusedRunner
            from yan_serve.ar.static import StaticRunner

            # the fused decode step (token choice and EOS on the device); the per-module
            # static runner if its capture fails; eager decoding if both do
            for cls in (FusedRunner, StaticRunner):
                try:
                    runner = cls(self.model)
                    graphs, secs = runner.capture()
                except Exception:  # serve with the next path rather than not at all
                    log.exception("AR CUDA graph capture failed (%s)", cls.__name__)
                    continue
                self.static = runner
                mib = runner.static.nbytes / 2**20
                log.info("captured %d AR decode graphs (%s) in %.1f s, KV cache %.0f MiB",
                         graphs, cls.__name__, secs, mib)  # fmt: skip
                break
            else:
                log.warning("AR decoding runs eagerly")
        return time.perf_counter() - t0

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        if jobs[0].target is not None:
            return self._score(jobs)
        return self._generate(jobs)

    def _generate(self, jobs: Sequence[Job]) -> list[Any]:
        from yan_serve.ar.generate import ARRequest, ar_generate
        from yan_serve.engine.sampler import Generation

        sp = self.tokenizer.special
        reqs = []
        for j in jobs:
            plan = j.extra.get("plan")
            fim = plan is not None and plan.task == "infill" and j.extra.get("protocol") != "full"
            budget = (sum(b - a for a, b in plan.fill_slots) + len(plan.fill_slots) + 1) if fim \
                else j.tgt_len  # fmt: skip
            reqs.append(
                ARRequest(
                    [*j.src, sp.bos],
                    budget,
                    j.seed,
                    j.temperature,
                    j.top_k,
                    ignore_eos=bool(j.extra.get("ignore_eos")),
                )
            )
        outs = ar_generate(self.model, reqs, sp.eos, sp.pad, static=self.static)
        results = []
        for j, r, o in zip(jobs, reqs, outs, strict=True):
            plan = j.extra.get("plan")
            mean = sum(o.confidence) / len(o.confidence) if o.confidence else 0.0
            if plan is not None and plan.task == "infill" and r.max_new != j.tgt_len:
                full, conf = self._fim_row(plan, o.tokens, o.confidence, mean)
            else:
                full = (o.tokens + [sp.eos] * j.tgt_len)[: j.tgt_len]
                conf = (o.confidence + [mean] * j.tgt_len)[: j.tgt_len]
            results.append(Generation(
                tokens=o.tokens, finish_reason="eos" if o.hit_eos else "length",
                confidence=o.confidence, expert=[], full=full, full_confidence=conf,
            ))  # fmt: skip
        return results

    def _fim_row(self, plan, tokens: list[int], probs: list[float], mean: float):
        """Spans generated as `fill <mask> fill <mask> ...` placed into the target layout, each
        cut or EOS-padded to its slot's budget."""
        sp = self.tokenizer.special
        fills: list[list[tuple[int, float]]] = [[]]
        for t, p in zip(tokens, probs, strict=True):
            if t == sp.mask:
                fills.append([])
            else:
                fills[-1].append((t, p))
        row: list[int] = []
        conf: list[float] = []
        for i, piece in enumerate(plan.pieces):
            row += piece
            conf += [1.0] * len(piece)
            if i < len(plan.fill_slots):
                a, b = plan.fill_slots[i]
                f = (fills[i] if i < len(fills) else [])[: b - a]
                row += [t for t, _ in f] + [sp.eos] * (b - a - len(f))
                conf += [p for _, p in f] + [mean] * (b - a - len(f))
        return [*row, sp.eos], [*conf, mean]

    def _score(self, jobs: Sequence[Job]) -> list[list[float]]:
        """Log-probability of each target token given source + BOS (teacher forcing, one
        right-padded forward for the batch)."""
        from yan_serve.ar.generate import ar_score

        sp = self.tokenizer.special
        logps = ar_score(self.model, [[*j.src, sp.bos] for j in jobs],
                         [j.target or [] for j in jobs], sp.pad)  # fmt: skip
        return _with_top(jobs, logps, lambda idx, k: self._top_logprobs([jobs[i] for i in idx], k))

    @torch.no_grad()
    def _top_logprobs(self, jobs: Sequence[Job], k: int) -> list[list[tuple[int, float]]]:
        """The k most likely next tokens at every target position (teacher forcing, as
        `ar_score`)."""
        from yan_serve.ar.train import collate_ar

        sp = self.tokenizer.special
        prompts = [[*j.src, sp.bos] for j in jobs]
        targets = [j.target or [] for j in jobs]
        ids, att, _ = collate_ar(
            [([*p, *t], len(p)) for p, t in zip(prompts, targets, strict=True)], sp.pad
        )
        dev = next(self.model.parameters()).device
        h = self.model.transformer(input_ids=ids.to(dev), attention_mask=att.to(dev))
        out = []
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            logits = self.model.lm_head(h.last_hidden_state[i, len(p) - 1 : len(p) - 1 + len(t)])
            vals, top = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
            pairs = zip(top.tolist(), vals.tolist(), strict=True)
            out.append([list(zip(a, b, strict=True)) for a, b in pairs])
        return out


def check_checkpoint(model_dir: str | Path, device: str = "auto") -> None:
    """What can be checked before loading, in seconds and without reading the weights: the
    device exists; config.json, model.safetensors' header, tokenizer.json and labels.json are
    readable and agree. Raises ValueError / FileNotFoundError naming the file and the field."""
    from yan_serve.tokenizer import YANTokenizer
    from yan_serve.weights import check_pretrained, is_ar_checkpoint

    d = Path(model_dir)
    resolve_device(device)
    if is_ar_checkpoint(d):
        from safetensors import SafetensorError, safe_open

        f = d / "model.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"no model.safetensors in {d}")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                sf.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
        YANTokenizer.load(d)
    else:
        cfg = check_pretrained(d)
        try:
            load_tokenizer(d, cfg)
        except ValueError as e:
            msg = str(e)
            where = "" if "tokenizer.json" in msg else f"{d / 'tokenizer.json'}: "
            raise ValueError(where + msg) from None
    load_labels(d)


def load_worker(model_dir: str | Path, device: str = "auto"):
    """The worker for a checkpoint directory: AR (GPT-2 config) or YAN."""
    from yan_serve.weights import is_ar_checkpoint

    return (ARWorker if is_ar_checkpoint(model_dir) else YANWorker)(model_dir, device)
