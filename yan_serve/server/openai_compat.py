"""OpenAI's /v1/completions mapped onto YAN: completion (source: prompt + <mask>; target:
`max_tokens` + EOS) or, with `suffix`, infilling; `echo` with `logprobs` scores every prompt
token. Errors take OpenAI's shape (`param`, OpenAI's string `code` where one applies)."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from yan_serve.engine.requests import EngineRequest, Result, Scored, TopLogprobs, Worker
from yan_serve.engine.sampler import Generation
from yan_serve.server import schemas as S
from yan_serve.server.dispatch import generation_requests, new_seed, run
from yan_serve.server.errors import APIError, bad_request
from yan_serve.server.state import State, resolve_steps
from yan_serve.server.streaming import openai_stream
from yan_serve.tasks import serving as T
from yan_serve.tokenizer import YANTokenizer

MAX_CHOICES = 64  # prompts x n
DEFAULT_MAX_TOKENS = 16  # OpenAI's default

# (token, logprob, top logprobs, text offset) of one row of OpenAI's `logprobs`
Row = tuple[str, float | None, dict[str, float] | None, int]


@dataclass
class _Prompt:
    text: str  # as echoed (a token-id prompt is decoded)
    ids: list[int]
    is_text: bool = True  # given as a string (not token ids)
    plan: T.Plan | None = None  # None when nothing is generated (max_tokens 0)


def _prompts(w: Worker, prompt: Any) -> list[_Prompt]:
    """The request's prompts as text and token ids (strings are encoded, ids are checked)."""
    tok = w.tokenizer
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]  # one prompt of token ids
    else:
        items = list(prompt)
    if not items:
        raise bad_request("the prompt list is empty", param="prompt")
    out = []
    vocab = w.tokenizer.vocab_size
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise bad_request("the prompt is empty", param="prompt")
            out.append(_Prompt(item, tok.encode(item)))
            continue
        bad = next((t for t in item if t >= vocab), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} in the prompt is outside the vocabulary of {vocab}", "prompt"
            )
        out.append(_Prompt(tok.decode(item), list(item), is_text=False))
    return out


def _context_error(message: str, param: str) -> APIError:
    return APIError(400, message, "invalid_request_error", code="context_length_exceeded",
                    param=param)  # fmt: skip


def _plan(w: Worker, p: _Prompt, max_tokens: int, suffix: list[int] | None) -> T.Plan | None:
    """Completion (source: prompt + <mask>; target: max_tokens + EOS) or, with a suffix,
    infilling (source: prompt <mask> suffix; target: prompt, max_tokens gap positions, suffix,
    EOS). 400 in OpenAI's words when it does not fit the model."""
    n = w.max_length
    head = f"This model's maximum context length is {n} tokens."
    extra = len(suffix) if suffix is not None else 0
    src_len = len(p.ids) + extra + 1
    if src_len > n:
        with_suffix = f" and the suffix {extra}" if suffix is not None else ""
        raise _context_error(
            f"{head} However, your prompt has {len(p.ids)} tokens{with_suffix}, {src_len} "
            "source positions with the <mask> for the completion. Please reduce the length of "
            "the prompt.",
            "prompt",
        )
    if max_tokens == 0:
        return None
    if suffix is None:
        plan = T.Plan("complete", [*p.ids, w.tokenizer.special.mask], max_tokens + 1)
    else:
        # as /v1/infill: a string prompt's trailing spaces go to the fill (byte-level BPE words
        # carry their leading space)
        ids = w.tokenizer.encode(p.text.rstrip(" ")) if p.is_text else p.ids
        plan = T.infill_plan_from_pieces(
            [ids, suffix],
            [max_tokens],
            w.tokenizer.special.mask,
            w.tokenizer.special.eos,
            w.infill_masks,
        )
    if plan.tgt_len > n:
        around = " (with the prompt and suffix around them)" if suffix is not None else ""
        raise _context_error(
            f"{head} However, you requested {max_tokens} completion tokens, "
            f"{plan.tgt_len} output positions{around} with EOS. Please reduce max_tokens.",
            "max_tokens",
        )
    return plan


def _score_requests(state: State, p: _Prompt, seed: int, k: int) -> list[EngineRequest]:
    """Echo log-probabilities: token i of the prompt is scored as the first token of the
    completion of tokens 0..i-1 (source: prefix + <mask>; target: the rest of the prompt + EOS,
    so the model also knows how many tokens follow). One score request per token after the
    first."""
    steps = resolve_steps(state, None)
    special = state.serving_worker().tokenizer.special
    return [
        EngineRequest([*p.ids[:i], special.mask], len(p.ids) - i + 1, seed, steps,
                      target=[*p.ids[i:], special.eos], top_logprobs=k)
        for i in range(1, len(p.ids))
    ]  # fmt: skip


def _token(tok: YANTokenizer, t: int) -> str:
    return tok.decode([t], skip_special=False)


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e4


def _top(tok: YANTokenizer, top: list[tuple[int, float]], actual: int, lp: float):
    """OpenAI's top_logprobs entry: the k most likely tokens, and always the actual one (with
    its own log-probability, so it equals the maximum exactly when it is the most likely)."""
    d = {_token(tok, t): v for t, v in top}
    d[_token(tok, actual)] = lp
    return d


def _echo_rows(tok: YANTokenizer, p: _Prompt, scored: list[Scored], k: int | None) -> list[Row]:
    """A row for every prompt token; the first has no logprob."""
    rows: list[Row] = []
    for i, t in enumerate(p.ids):
        offset = len(tok.decode(p.ids[:i]))
        if i == 0:
            rows.append((_token(tok, t), None, None, offset))
            continue
        r = scored[i - 1]
        lp = r.logprobs[0]
        top: TopLogprobs | None = r.top
        rows.append((_token(tok, t), lp, _top(tok, top[0], t, lp) if k and top else None, offset))
    return rows


def _generated(tok: YANTokenizer, plan: T.Plan, g: Generation):
    """(tokens, their probabilities, finish_reason, ended at EOS) of one generated choice: the
    completion cut at EOS, or with a suffix the gap's tokens (special tokens dropped)."""
    if plan.fill_slots is None:
        toks, reason = T.finish_complete(plan, g.tokens, g.finish_reason == "eos")
        # the EOS is listed as a token only where it is within max_tokens (as OpenAI counts)
        at_eos = reason == "stop" and len(toks) < plan.tgt_len - 1
        return toks, g.confidence[: len(toks)], reason, at_eos
    a, b = plan.fill_slots[0]
    specials = set(tok.special.ids())
    kept = [(t, c) for t, c in zip(g.full[a:b], g.full_confidence[a:b], strict=True)
            if t not in specials]  # fmt: skip
    reason = "stop" if tok.special.eos in g.full[a:b] else "length"
    return [t for t, _ in kept], [c for _, c in kept], reason, False


def _choice(
    tok: YANTokenizer,
    req: S.OpenAICompletionRequest,
    p: _Prompt,
    g: Generation | None,
    echo_rows: list[Row],
    stops: list[str],
) -> tuple[S.OpenAIChoice, int]:
    """One choice (its index set by the caller) and how many tokens it generated."""
    toks: list[int] = []
    conf: list[float] = []
    reason, at_eos = "length", False
    if p.plan is not None and g is not None:
        toks, conf, reason, at_eos = _generated(tok, p.plan, g)
    text = tok.decode(toks)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        text, reason, at_eos = text[:cut], "stop", False
    k = req.logprobs
    logprobs = None
    if k is not None:
        start = len(p.text) if req.echo else 0
        rows = list(echo_rows)
        for j, (t, q) in enumerate(zip(toks, conf, strict=True)):
            off = len(tok.decode(toks[:j]))
            if off >= len(text) and j > 0:
                break  # cut by a stop string
            lp = _log(q)
            rows.append((_token(tok, t), lp, {_token(tok, t): lp} if k else None, start + off))
        if at_eos and g is not None:  # the EOS that ended the text, as OpenAI lists it
            lp = _log(g.full_confidence[len(toks)])
            eos = _token(tok, tok.special.eos)
            rows.append((eos, lp, {eos: lp} if k else None, start + len(text)))
        logprobs = S.OpenAILogprobs(
            tokens=[r[0] for r in rows],
            token_logprobs=[r[1] for r in rows],
            top_logprobs=[r[2] for r in rows] if k else None,
            text_offset=[r[3] for r in rows],
        )
    text = (p.text + text) if req.echo else text
    choice = S.OpenAIChoice(text=text, index=0, logprobs=logprobs, finish_reason=reason)
    return choice, len(toks)


def _check(w: Worker, req: S.OpenAICompletionRequest, max_tokens: int) -> None:
    """What the schema cannot refuse: another model, echo with suffix, a suffix with no gap."""
    if req.model is not None and req.model != w.model_id:
        raise APIError(
            404,
            f"The model `{req.model}` does not exist; this server serves `{w.model_id}` "
            "(GET /v1/models)",
            "invalid_request_error",
            code="model_not_found",
            param="model",
        )
    if req.suffix is not None and req.echo:
        raise bad_request("echo is not supported with suffix", "echo")
    if req.suffix is not None and max_tokens == 0:
        raise bad_request("max_tokens must be >= 1 with suffix (the gap's length)", "max_tokens")


async def completions(state: State, request: Request, req: S.OpenAICompletionRequest) -> Any:
    """The /v1/completions response (a `text_completion`, or its stream)."""
    w = state.serving_worker()
    tok = w.tokenizer
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    _check(w, req, max_tokens)
    prompts = _prompts(w, req.prompt)
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(f"give 1 to {MAX_CHOICES} prompts x n choices", "n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stops = [s for s in stops if s]
    temperature = float(req.temperature or 0.0)
    seed = req.seed
    if seed is None and temperature == 0:
        seed = S.OPENAI_GREEDY_SEED  # greedy without a seed: deterministic
    base = new_seed(seed)
    suffix = tok.encode(req.suffix) if req.suffix is not None else None
    for p in prompts:
        p.plan = _plan(w, p, max_tokens, suffix)
    gen = [[] if p.plan is None else generation_requests(
               state, p.plan, n=req.n, seed=base, steps=None, routing="argmax",
               temperature=temperature)
           for p in prompts]  # fmt: skip
    k = req.logprobs
    scoring = req.echo and k is not None
    score = [_score_requests(state, p, base, k or 0) if scoring else [] for p in prompts]
    requests = [r for rs in gen for r in rs] + [r for rs in score for r in rs]
    results: list[Result] = []
    if requests:
        what = f"{len(prompts)} prompt(s) x n = {req.n}"
        if scoring:
            what += " + one per echoed prompt token for its log-probability"
        _, results = await run(state, request, requests, what)
    it = iter(results)
    gen_res = [[next(it) for _ in rs] for rs in gen]
    score_res = [[next(it) for _ in rs] for rs in score]

    choices = []
    completion_tokens = 0
    for pi, p in enumerate(prompts):
        echo_rows = _echo_rows(tok, p, score_res[pi], k) if scoring else []
        for c in range(req.n):
            g = gen_res[pi][c] if p.plan is not None else None
            choice, n_tokens = _choice(tok, req, p, g, echo_rows, stops)
            choice.index = len(choices)
            choices.append(choice)
            completion_tokens += n_tokens
    # the prompt (and suffix): the known tokens, without the <mask>s and the infill source's EOS
    prompt_tokens = sum(_prompt_tokens(p.plan) if p.plan else len(p.ids) for p in prompts)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.generated_tokens.inc(completion_tokens)
    body = S.OpenAICompletion(
        id=f"cmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=w.model_id,
        choices=choices,
        usage=S.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )
    if not req.stream:
        return body
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return openai_stream(body, include_usage)


def _prompt_tokens(plan: T.Plan) -> int:
    """The user's tokens in a completion plan: prompt + suffix for infilling, the prompt before
    the <mask> otherwise."""
    if plan.pieces is not None:
        return sum(len(piece) for piece in plan.pieces)
    return len(plan.src) - 1
