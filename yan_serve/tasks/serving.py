"""Serving-side task formats: a user request -> (source, target length), and the generated row
-> the user's answer. Shared by the HTTP server and `yan generate`.

The formats are the training ones (`yan_serve.tasks.formats`, which takes its prompt templates
from here); a request's layout is a `Plan` (`yan_serve.engine.requests`, part of the engine
contract); the target length always comes from the request (span budgets, max_tokens), never
from an oracle. Where the target's content is known in advance (the text around infill masks,
the QA template the model regenerates before its answer) the server keeps the known tokens and
reads only the unknown positions out of the generated row.
"""

from __future__ import annotations

import re

from yan_serve.engine.requests import Plan
from yan_serve.engine.requests import content_positions as content_positions  # re-exported
from yan_serve.tokenizer import YANTokenizer

# The prompt templates the model is trained on (yan_serve.tasks.formats) and served with.
QA_TEMPLATE = (
    "####### SUMMARY #######\n\n{ctx}\n\n####### QUESTION #######\n\n{q}\n\n"
    "####### ANSWER #######\n\n"
)
CLS_SOURCE = "####### DOCUMENT #######\n\n{doc}\n\n####### ANSWER #######\n\n"
ANSWER_HEADER = "####### ANSWER #######\n\n"

MASK_PATTERN = re.compile(r"\[MASK(?::([0-9]+))?\]")  # ASCII digits, as the request schema


def parse_label(text: str, labels: dict[int, str] | None = None) -> int | None:
    """The label id from generated classification text ("... ANSWER ...\\n\\n3 wisdom").

    A non-autoregressive decoder picks every position independently, so the id and the name can
    disagree ("1 history"); the name carries more tokens, so a generated word that is one of
    `labels`' names decides, and the id is read only when no name matches."""
    tail = text.split("ANSWER #######")[-1]
    if labels:
        by_name = {v.lower(): k for k, v in labels.items()}
        for word in re.findall(r"[A-Za-z][\w/-]*", tail):
            if word.lower() in by_name:
                return by_name[word.lower()]
    m = re.search(r"(\d+)", tail)
    return int(m.group(1)) if m else None


class PlanError(ValueError):
    """A request that parses but cannot be served (HTTP 400)."""


def _check(tok: YANTokenizer, src: list[int], tgt_len: int, max_length: int, what: str) -> None:
    if len(src) > max_length:
        raise PlanError(
            f"{what} is {len(src)} tokens; this model reads at most {max_length} source tokens"
        )
    if tgt_len > max_length:
        raise PlanError(
            f"the output needs {tgt_len} target positions; this model generates at most "
            f"{max_length} (shorten the text or the token budget)"
        )


def plan_infill(
    tok: YANTokenizer,
    text: str,
    max_length: int,
    span_tokens: int = 2,
    max_span_tokens: int = 64,
    infill_masks: str = "collapsed",
) -> Plan:
    """`text` with `[MASK]` / `[MASK:n]` placeholders. Source: the text with each placeholder
    as the model's training format marks a span (`infill_masks`: one <mask>, or one per
    position); target: the whole clean text + EOS, with n (default `span_tokens`) positions per
    placeholder."""
    matches = list(MASK_PATTERN.finditer(text))
    if not matches:
        raise PlanError("infill text has no [MASK] placeholder (write [MASK] or [MASK:n])")
    pieces: list[list[int]] = []
    budgets: list[int] = []
    last = 0
    for m in matches:
        seg = text[last : m.start()]
        # A masked word carries its own leading space in byte-level BPE: keep it for the fill.
        pieces.append(tok.encode(seg.rstrip(" ")) if seg.strip() else [])
        budgets.append(_span_budget(m.group(1), span_tokens, max_span_tokens))
        last = m.end()
    pieces.append(tok.encode(text[last:]) if text[last:] else [])
    plan = infill_plan_from_pieces(pieces, budgets, tok.special.mask, tok.special.eos, infill_masks)
    budgets_in_source = " with its span budgets" if infill_masks == "per_position" else ""
    _check(tok, plan.src, plan.tgt_len, max_length, "the infill text" + budgets_in_source)
    return plan


def _span_budget(digits: str | None, default: int, limit: int) -> int:
    """A placeholder's span budget: `default` for a bare [MASK], n for [MASK:n] (leading zeros
    allowed); PlanError outside 1..limit (either), checked on the digits' length first, so that a
    budget of thousands of digits never reaches int()."""
    if digits is None:
        if not 1 <= default <= limit:
            raise PlanError(f"span budget {default}: must be between 1 and {limit}")
        return default
    value = digits.lstrip("0") or "0"
    if len(value) > len(str(limit)) or not 1 <= int(value) <= limit:
        shown = digits if len(digits) <= 12 else f"{digits[:6]}... ({len(digits)} digits)"
        raise PlanError(f"[MASK:{shown}]: a span budget must be between 1 and {limit}")
    return int(value)


def infill_plan_from_pieces(
    pieces: list[list[int]],
    budgets: list[int],
    mask: int,
    eos: int,
    infill_masks: str = "collapsed",
) -> Plan:
    """Source = pieces joined by one <mask> each (`per_position`: `budgets[i]` of them), then
    EOS, as training masks the clean text + EOS; target = pieces with `budgets[i]` positions
    for span i, then EOS. `len(pieces) == len(budgets) + 1`."""
    per_position = infill_masks == "per_position"
    src: list[int] = []
    slots: list[tuple[int, int]] = []
    pos = 0
    for i, piece in enumerate(pieces):
        src += piece
        pos += len(piece)
        if i < len(budgets):
            src += [mask] * (budgets[i] if per_position else 1)
            slots.append((pos, pos + budgets[i]))
            pos += budgets[i]
    return Plan("infill", [*src, eos], pos + 1, pieces=pieces, fill_slots=slots)


def mask_runs(src: list[int], mask_id: int) -> list[int]:
    """A per-position infill source -> the collapsed one: each run of <mask> becomes one (spans
    never touch: training's span masking merges adjacent masked tokens into one run)."""
    return [t for i, t in enumerate(src) if t != mask_id or i == 0 or src[i - 1] != mask_id]


def infill_plan_from_source(
    src: list[int], budget: int, mask: int, eos: int, infill_masks: str = "collapsed"
) -> Plan:
    """The serving plan for a training-format infill source (EOS at the end; a span is one
    <mask> or a run of them), every span given `budget` positions: what the server does with
    `[MASK]` placeholders."""
    body = src[:-1] if src and src[-1] == eos else list(src)
    pieces: list[list[int]] = [[]]
    for t in mask_runs(body, mask):
        if t == mask:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return infill_plan_from_pieces(pieces, [budget] * (len(pieces) - 1), mask, eos, infill_masks)


def fill_confidences(
    plan: Plan, row: list[int], conf: list[float], specials: set[int]
) -> list[float]:
    """Each fill's confidence, from its own tokens: the mean decoder probability of the content
    tokens at its slots; 0.0 for a fill left empty (padding and other special tokens are not
    the fill's words, so a gap the model leaves empty never reports a high confidence)."""
    assert plan.fill_slots is not None
    out = []
    for a, b in plan.fill_slots:
        kept = [conf[i] for i in range(a, b) if row[i] not in specials]
        out.append(sum(kept) / len(kept) if kept else 0.0)
    return out


def infill_confidence(
    plan: Plan, row: list[int], conf: list[float], specials: set[int]
) -> tuple[list[float], float]:
    """(each fill's confidence, the candidate's): `fill_confidences` and their mean, the number an
    infill candidate reports as `confidence` and the server ranks a request's `n` candidates by."""
    per_fill = fill_confidences(plan, row, conf, specials)
    return per_fill, sum(per_fill) / len(per_fill)


def finish_infill(tok: YANTokenizer, plan: Plan, row: list[int]) -> tuple[str, list[str]]:
    """(filled text, each fill's text) from the generated full-length row: known text is kept,
    fills are the tokens at their slots (special tokens dropped)."""
    assert plan.pieces is not None and plan.fill_slots is not None
    specials = set(tok.special.ids())
    fills = [[t for t in row[a:b] if t not in specials] for a, b in plan.fill_slots]
    ids: list[int] = []
    for i, piece in enumerate(plan.pieces):
        ids += piece
        if i < len(fills):
            ids += fills[i]
    return tok.decode(ids), [tok.decode(f) for f in fills]


def plan_complete(tok: YANTokenizer, prompt: str, max_tokens: int, max_length: int) -> Plan:
    """Source: prompt + <mask>; target: up to `max_tokens` tokens + EOS."""
    if not prompt.strip():
        raise PlanError("the prompt is empty")
    src = [*tok.encode(prompt), tok.special.mask]
    plan = Plan("complete", src, max_tokens + 1)
    _check(tok, src, plan.tgt_len, max_length, "the prompt")
    return plan


def finish_complete(plan: Plan, tokens: list[int], hit_eos: bool) -> tuple[list[int], str]:
    """(at most max_tokens tokens, "stop" | "length"): "stop" when EOS ended the text in time."""
    limit = plan.tgt_len - 1
    if hit_eos and len(tokens) <= limit:
        return tokens, "stop"
    return tokens[:limit], "length"


def plan_qa(
    tok: YANTokenizer, context: str, question: str, max_tokens: int, max_length: int
) -> Plan:
    """Source: the SUMMARY/QUESTION/ANSWER template + <mask>; target: the template again, then
    up to `max_tokens` answer tokens + EOS. The answer is read after the template's positions."""
    if not question.strip():
        raise PlanError("the question is empty")
    body = tok.encode(QA_TEMPLATE.format(ctx=context, q=question))
    src = [*body, tok.special.mask]
    plan = Plan("qa", src, len(body) + max_tokens + 1, answer_start=len(body))
    _check(tok, src, plan.tgt_len, max_length, "context + question")
    return plan


def plan_classify(tok: YANTokenizer, text: str, max_tokens: int, max_length: int) -> Plan:
    """Source: the DOCUMENT/ANSWER template; target: the answer header + "id name" + EOS."""
    if not text.strip():
        raise PlanError("the text is empty")
    src = tok.encode(CLS_SOURCE.format(doc=text))
    header = len(tok.encode(ANSWER_HEADER))
    plan = Plan("classify", src, header + max_tokens + 1, answer_start=header)
    _check(tok, src, plan.tgt_len, max_length, "the text")
    return plan


def answer_tokens(tok: YANTokenizer, plan: Plan, row: list[int]) -> list[int]:
    """The generated tokens after the known prefix, cut at the first EOS, specials dropped."""
    eos = tok.special.eos
    tail = row[plan.answer_start :]
    if eos in tail:
        tail = tail[: tail.index(eos)]
    specials = set(tok.special.ids())
    return [t for t in tail if t not in specials]


def label_target(tok: YANTokenizer, label: str, labels: dict[int, str] | None) -> list[int]:
    """The classification target for a candidate label: header + "id name" + EOS when the label
    is one of the checkpoint's named labels, else header + the label text + EOS."""
    text = label.strip()
    if labels:
        by_name = {v.lower(): k for k, v in labels.items()}
        if text.lower() in by_name:
            k = by_name[text.lower()]
            text = f"{k} {labels[k]}"
    return [*tok.encode(f"{ANSWER_HEADER}{text}"), tok.special.eos]


def parse_class(text: str, labels: dict[int, str] | None) -> tuple[str, int | None]:
    """(label name, label id) from the generated answer text "3 wisdom" (`parse_label`: a known
    label name wins over a disagreeing id); the name falls back to the generated words when the
    checkpoint has no label table or the id is unknown."""
    k = parse_label(text, labels)
    if k is None:
        return text.strip(), None
    if labels and k in labels:
        return labels[k], k
    m = re.search(r"\d+\s*(.*)", text)
    return ((m.group(1).strip() if m else "") or str(k)), k


def pad_targets(targets: list[list[int]], eos: int) -> list[list[int]]:
    """Candidate label targets EOS-padded to one common length: same length, same seed means the
    same latent for every candidate, so their decoder log-probabilities compare directly (the
    EOS filler after an answer is what fine-tuning's length slack taught)."""
    n = max(len(t) for t in targets)
    return [t + [eos] * (n - len(t)) for t in targets]
