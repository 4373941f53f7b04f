"""The task endpoints as a table: each `Task` names its request schema and the pieces that
differ (plan, task options, finish, response fields); one handler, `serve_task`, runs them all:
request -> plan -> engine requests -> results -> candidates -> response (or a stream)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from yan_serve.engine.requests import Result, TaskOptions, Worker
from yan_serve.engine.sampler import Generation
from yan_serve.server import schemas as S
from yan_serve.server.batcher import Job
from yan_serve.server.dispatch import generation_requests, plan_or_400, run
from yan_serve.server.envelope import candidate, envelope
from yan_serve.server.labels import score_labels
from yan_serve.server.state import State
from yan_serve.server.streaming import preview_stream, result_stream
from yan_serve.tasks import serving as T

# scoring instead of generating, where the request asks for it: the response, else None
Scorer = Callable[[State, Request, Any, T.Plan], Awaitable[S.GenerationResponse | None]]


@dataclass(frozen=True)
class Task:
    """One task endpoint, POST /v1/<name>."""

    name: str
    request: type[S.GenerationOptions]
    response: type[S.GenerationResponse]
    doc: str  # the endpoint's description on the OpenAPI page
    plan: Callable[[Worker, Any], T.Plan]  # 400 through T.PlanError or APIError
    finish: Callable[[Worker, T.Plan, Any, Generation], S.Candidate]  # one candidate's output
    fields: Callable[[Worker, S.Candidate], dict[str, Any]]  # the response's own fields (best)
    options: Callable[[Any], TaskOptions] = lambda req: TaskOptions()
    score: Scorer | None = None


async def serve_task(state: State, request: Request, task: Task, req: S.GenerationOptions) -> Any:
    """The handler of every task endpoint."""
    w = state.serving_worker()
    plan = plan_or_400(lambda: task.plan(w, req))
    if task.score is not None:
        scored = await task.score(state, request, req, plan)
        if scored is not None:
            # scoring has no Euler previews: the stream is the one `result` event
            return result_stream(scored) if req.stream else scored
    t0 = time.perf_counter()
    requests = generation_requests(
        state, plan, n=req.n, seed=req.seed, steps=req.steps, routing=req.routing,
        options=task.options(req),
    )  # fmt: skip

    def respond(jobs: list[Job], results: list[Result]) -> S.GenerationResponse:
        cands = [task.finish(w, plan, req, g) for g in results]
        body = envelope(state, task.name, jobs, cands, t0)
        return task.response(**body, **task.fields(w, body["candidates"][0]))

    if req.stream:
        return preview_stream(state, requests, respond, t0)
    return respond(*await run(state, request, requests))


# ---------------------------------------------------------------------------------- infill
def _plan_infill(w: Worker, req: S.InfillRequest) -> T.Plan:
    return T.plan_infill(w.tokenizer, req.text, w.max_length, req.span_tokens,
                         infill_masks=w.infill_masks)  # fmt: skip


def _finish_infill(w: Worker, plan: T.Plan, req: S.InfillRequest, g: Generation) -> S.Candidate:
    text, fills = T.finish_infill(w.tokenizer, plan, g.full)
    slots = plan.fill_slots or []
    conf = [g.full_confidence[a + i] for a, b in slots for i in range(b - a)]
    specials = set(w.tokenizer.special.ids())
    per_fill, mean = T.infill_confidence(plan, g.full, g.full_confidence, specials)
    written = sum(g.full[a + i] not in specials for a, b in slots for i in range(b - a))
    return candidate(text, conf, req.return_confidence, written, fills=fills,
                     fill_confidence=per_fill, confidence=mean)  # fmt: skip


# -------------------------------------------------------------------------------- complete
def _uncut(g: Generation, n: int) -> Generation:
    """The generation's first n positions, EOS included (for ignore_eos)."""
    return Generation(
        tokens=g.full[:n],
        finish_reason="length",
        confidence=g.full_confidence[:n],
        expert=g.expert,
        full=g.full,
        full_confidence=g.full_confidence,
    )


def _finish_complete(w: Worker, plan: T.Plan, req: S.CompleteRequest, g: Generation) -> S.Candidate:
    if req.ignore_eos:
        g = _uncut(g, plan.tgt_len - 1)
    toks, reason = T.finish_complete(plan, g.tokens, g.finish_reason == "eos")
    return candidate(w.tokenizer.decode(toks), g.confidence[: len(toks)], req.return_confidence,
                     finish_reason=reason)  # fmt: skip


# ------------------------------------------------------------------------- qa and classify
def _finish_answer(w: Worker, plan: T.Plan, req: Any, g: Generation) -> S.Candidate:
    """The answer after the plan's header (QA's answer, a generated class label)."""
    ans = T.answer_tokens(w.tokenizer, plan, g.full)
    conf = g.full_confidence[plan.answer_start :][: len(ans)]  # empty answer: confidence 0.0
    return candidate(w.tokenizer.decode(ans).strip(), conf, req.return_confidence, len(ans))


def _class_fields(w: Worker, best: S.Candidate) -> dict[str, Any]:
    name, k = T.parse_class(best.text, w.labels)
    return {"label": name, "label_id": k}


async def _score_classify(
    state: State, request: Request, req: S.ClassifyRequest, plan: T.Plan
) -> S.ClassifyResponse | None:
    return await score_labels(state, request, req, plan) if req.labels else None


TASKS: tuple[Task, ...] = (
    Task(
        "infill", S.InfillRequest, S.InfillResponse,
        "Fill every `[MASK]` / `[MASK:n]` span of the text in one non-autoregressive pass.",
        plan=_plan_infill,
        finish=_finish_infill,
        fields=lambda w, best: {"fills": best.fills or []},
        options=lambda req: TaskOptions(req.allow_empty, req.protocol, req.ignore_eos),
    ),
    Task(
        "complete", S.CompleteRequest, S.CompleteResponse,
        "Continue a prompt with up to `max_tokens` tokens, all generated at once.",
        plan=lambda w, req: T.plan_complete(w.tokenizer, req.prompt, req.max_tokens, w.max_length),
        finish=_finish_complete,
        fields=lambda w, best: {"finish_reason": best.finish_reason or "length"},
        options=lambda req: TaskOptions(ignore_eos=req.ignore_eos),
    ),
    Task(
        "qa", S.QARequest, S.QAResponse,
        "Answer a question about a context.",
        plan=lambda w, req: T.plan_qa(w.tokenizer, req.context, req.question, req.max_tokens,
                                      w.max_length),
        finish=_finish_answer,
        fields=lambda w, best: {"answer": best.text},
    ),
    Task(
        "classify", S.ClassifyRequest, S.ClassifyResponse,
        "Label a text: generate the label, or score the given candidate labels.",
        plan=lambda w, req: T.plan_classify(w.tokenizer, req.text, req.max_tokens, w.max_length),
        finish=_finish_answer,
        fields=_class_fields,
        score=_score_classify,
    ),
)  # fmt: skip
