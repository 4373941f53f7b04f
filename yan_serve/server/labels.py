"""Classification by scoring candidate labels: each label's target is scored under one latent
(all targets EOS-padded to one length) and the labels ranked by a softmax over their scores."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from fastapi import Request

from yan_serve.engine.requests import EngineRequest
from yan_serve.server import schemas as S
from yan_serve.server.dispatch import new_seed, run
from yan_serve.server.envelope import envelope
from yan_serve.server.errors import bad_request
from yan_serve.server.state import State, resolve_steps
from yan_serve.tasks import serving as T
from yan_serve.tokenizer import YANTokenizer


def label_scores(labels: Sequence[str], logprobs: Sequence[float]) -> list[S.LabelScore]:
    """Each label's probability among the candidates (a softmax over their log-probabilities),
    most likely first."""
    top = max(logprobs)
    z = sum(math.exp(m - top) for m in logprobs)
    scores = [
        S.LabelScore(label=lab, score=math.exp(m - top) / z, logprob=m)
        for lab, m in zip(labels, logprobs, strict=False)
    ]
    scores.sort(key=lambda s: -s.score)
    return scores


def label_targets(
    tok: YANTokenizer, labels: list[str], names: dict[int, str] | None, max_length: int
) -> list[list[int]]:
    """Each label's target tokens, EOS-padded to one length; 400 for a label given twice (the
    same candidate would split its probability) or one longer than the model's target."""
    targets = [T.label_target(tok, lab, names) for lab in labels]
    first: dict[tuple[int, ...], str] = {}
    for lab, t in zip(labels, targets, strict=True):
        if tuple(t) in first:
            raise bad_request(
                f"labels {first[tuple(t)]!r} and {lab!r} are the same candidate; give each once"
            )
        first[tuple(t)] = lab
    too_long = [lab for lab, t in zip(labels, targets, strict=False) if len(t) > max_length]
    if too_long:
        raise bad_request(f"label {too_long[0][:40]!r} is too long")
    return T.pad_targets(targets, tok.special.eos)


async def score_labels(
    state: State, request: Request, req: S.ClassifyRequest, plan: T.Plan
) -> S.ClassifyResponse:
    """The classify response for `req.labels`: every label scored after the answer header."""
    t0 = time.perf_counter()
    w = state.serving_worker()
    steps = resolve_steps(state, req.steps)
    seed = new_seed(req.seed)
    labels = [lab for lab in req.labels or [] if lab.strip()]
    if not labels:
        raise bad_request("labels are all empty")
    targets = label_targets(w.tokenizer, labels, w.labels, w.max_length)
    requests = [
        EngineRequest(plan.src, len(t), seed, steps, req.routing, target=t) for t in targets
    ]
    jobs, results = await run(state, request, requests)
    header = plan.answer_start
    scores = label_scores(labels, [sum(r.logprobs[header:]) for r in results])
    best = scores[0]
    k = None
    if w.labels:
        k = {v.lower(): i for i, v in w.labels.items()}.get(best.label.strip().lower())
    cand = S.Candidate(text=best.label, confidence=best.score)
    body = envelope(state, "classify", jobs[:1], [cand], t0)
    return S.ClassifyResponse(**body, label=best.label, label_id=k, scores=scores)
