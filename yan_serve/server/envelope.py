"""The response envelope every task endpoint shares, built here only: candidates best first,
the model, the Euler time points, token usage and timing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from yan_serve.server import schemas as S
from yan_serve.server.batcher import Job
from yan_serve.server.state import State


def candidate(
    text: str,
    conf: Sequence[float],
    with_conf: bool,
    n_tokens: int | None = None,
    confidence: float | None = None,
    **kw: Any,
) -> S.Candidate:
    """A candidate; confidence is the mean decoder probability over its output positions
    unless the task defines its own (`confidence`: infill, per fill)."""
    if confidence is None:
        confidence = float(sum(conf) / len(conf)) if conf else 0.0
    c = S.Candidate(
        text=text, confidence=confidence, token_confidence=list(conf) if with_conf else None, **kw
    )
    c._n_tokens = len(conf) if n_tokens is None else n_tokens
    return c


def envelope(
    state: State, task: str, jobs: Sequence[Job], candidates: Sequence[S.Candidate], t0: float
) -> dict[str, Any]:
    """The fields of `S.GenerationResponse` (`jobs[i]` produced `candidates[i]`; `t0` is when
    the request started), and the token metrics counted. Candidates come back best first (by
    confidence, the earlier of equals first); usage and timing are the best one's."""
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].confidence)
    cands = [candidates[i] for i in order]
    j = jobs[order[0]]
    prompt = len(j.request.src)
    completion = cands[0]._n_tokens
    state.metrics.prompt_tokens.inc(prompt)
    state.metrics.generated_tokens.inc(sum(c._n_tokens for c in cands))
    return {
        "id": f"yan-{uuid.uuid4().hex[:16]}",
        "model": state.serving_worker().model_id,
        "task": task,
        "text": cands[0].text,
        "candidates": cands,
        "steps": j.request.steps,
        "usage": S.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
        "timing": S.Timing(
            queue_ms=1000 * (j.t_start - j.t_enqueue),
            compute_ms=1000 * (j.t_end - j.t_start),
            total_ms=1000 * (time.perf_counter() - t0),
        ),
    }
