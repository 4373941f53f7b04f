"""`ARWorker`: the GPT-2 baseline serving the same `EngineRequest`s as YAN.

KV-cache decoding of the same task formats (source, BOS, then the target), read back into YAN's
target layout so that the server's task code is shared. Infill uses fill-in-the-middle (only the
spans) unless a request asks for the paper's protocol (`full`: regenerate the passage). `steps`
and `routing` do not apply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from yan_serve.ar.generate import ARRequest, ar_generate, ar_score
from yan_serve.ar.model import load_ar
from yan_serve.ar.train import collate_ar
from yan_serve.engine.requests import EngineRequest, Plan, Result, Scored, TopLogprobs, scored
from yan_serve.engine.sampler import Generation
from yan_serve.engine.worker import CheckpointWorker
from yan_serve.tokenizer import YANTokenizer

log = logging.getLogger("yan_serve.worker")


class ARWorker(CheckpointWorker):
    """Implements `yan_serve.engine.requests.Worker` for GPT-2 baseline checkpoints."""

    kind = "ar"
    default_steps = 1  # `steps` does not apply

    def __init__(self, model_dir: str | Path, device: str = "auto", step: str = "torch") -> None:
        super().__init__(model_dir, device)
        self.step = step  # the fused decode step's body (`FusedRunner`)
        self.model = load_ar(self.model_dir, self.device)
        self.tokenizer = YANTokenizer.load(self.model_dir)
        cfg = self.model.config
        self.max_length = int(getattr(cfg, "yan_max_length", cfg.n_positions // 2))
        self.infill_masks = "collapsed"  # the paper protocol's source; FIM reads the pieces
        self.static = None  # CUDA: a FusedRunner (or StaticRunner) replaying CUDA graphs

    def warmup(self, steps: int) -> float:
        t0 = time.perf_counter()
        sp = self.tokenizer.special
        self._generate([EngineRequest([sp.bos] * 8, 4, 0, 1)])
        if self.device.type == "cuda":  # capture before /ready turns 200
            from yan_serve.ar.fused import FusedRunner
            from yan_serve.ar.static import StaticRunner

            # the fused decode step (token choice and EOS on the device); the per-module
            # static runner if its capture fails; eager decoding if both do
            for cls in (FusedRunner, StaticRunner):
                try:
                    runner = FusedRunner(self.model, step=self.step) if cls is FusedRunner \
                        else cls(self.model)  # fmt: skip
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

    def run(self, requests: Sequence[EngineRequest]) -> list[Result]:
        if requests[0].scores:
            return list(self._score(requests))
        return list(self._generate(requests))

    def _generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        sp = self.tokenizer.special
        reqs = []
        for r in requests:
            budget = r.tgt_len
            if _fim(r):  # every span's budget, a <mask> after each, and EOS
                slots = r.plan.fill_slots
                budget = sum(b - a for a, b in slots) + len(slots) + 1
            reqs.append(ARRequest([*r.src, sp.bos], budget, r.seed, r.temperature, r.top_k,
                                  ignore_eos=r.options.ignore_eos))  # fmt: skip
        outs = ar_generate(self.model, reqs, sp.eos, sp.pad, static=self.static)
        results = []
        for r, a, o in zip(requests, reqs, outs, strict=True):
            mean = sum(o.confidence) / len(o.confidence) if o.confidence else 0.0
            if r.plan is not None and r.plan.task == "infill" and a.max_new != r.tgt_len:
                full, conf = self._fim_row(r.plan, o.tokens, o.confidence, mean)
            else:
                full = (o.tokens + [sp.eos] * r.tgt_len)[: r.tgt_len]
                conf = (o.confidence + [mean] * r.tgt_len)[: r.tgt_len]
            results.append(Generation(
                tokens=o.tokens, finish_reason="eos" if o.hit_eos else "length",
                confidence=o.confidence, expert=[], full=full, full_confidence=conf,
            ))  # fmt: skip
        return results

    def _fim_row(self, plan: Plan, tokens: list[int], probs: list[float], mean: float):
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
        for i, piece in enumerate(plan.pieces or []):
            row += piece
            conf += [1.0] * len(piece)
            if i < len(plan.fill_slots or []):
                a, b = plan.fill_slots[i]
                f = (fills[i] if i < len(fills) else [])[: b - a]
                row += [t for t, _ in f] + [sp.eos] * (b - a - len(f))
                conf += [p for _, p in f] + [mean] * (b - a - len(f))
        return [*row, sp.eos], [*conf, mean]

    def _score(self, requests: Sequence[EngineRequest]) -> list[Scored]:
        """Log-probability of each target token given source + BOS (teacher forcing, one
        right-padded forward for the batch)."""
        sp = self.tokenizer.special
        logps = ar_score(self.model, [[*r.src, sp.bos] for r in requests],
                         [r.target or [] for r in requests], sp.pad)  # fmt: skip
        return scored(
            requests, logps, lambda idx, k: self._top_logprobs([requests[i] for i in idx], k)
        )

    @torch.no_grad()
    def _top_logprobs(self, requests: Sequence[EngineRequest], k: int) -> list[TopLogprobs]:
        """The k most likely next tokens at every target position (teacher forcing, as
        `ar_score`)."""
        sp = self.tokenizer.special
        prompts = [[*r.src, sp.bos] for r in requests]
        targets = [r.target or [] for r in requests]
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


def _fim(request: EngineRequest) -> bool:
    """Whether an infill request is decoded fill-in-the-middle (only its spans)."""
    plan = request.plan
    return plan is not None and plan.task == "infill" and request.options.protocol != "full"
