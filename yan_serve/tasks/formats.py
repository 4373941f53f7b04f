"""Task formats: records -> (source ids, target ids) pairs.

| task     | source                                        | target                        |
|----------|-----------------------------------------------|-------------------------------|
| infill   | text, each masked span one <mask> (*)         | the full clean text + EOS     |
| complete | prefix + <mask>                               | last word + EOS               |
| qa       | SUMMARY/QUESTION/ANSWER template + <mask>     | the whole template with answer + EOS |
| classify | DOCUMENT/ANSWER template                      | ANSWER header + "id name" + EOS |

(*) the paper's layout; a model configured with `infill_masks = "per_position"` reads one <mask>
per target position of the span instead (`expand_masks`), so source and target align.

Every target ends with EOS; the sampler cuts there. `Example.reference` is the string the metric
compares against (clean text, last word, answer, label id). Infill and QA examples also record
the target positions the task asks for (`Example.focus`: the spans with their length slack, the
answer), which training may weight above the copied rest.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from yan_serve.config import INFILL_MASKS
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord
from yan_serve.tasks.serving import ANSWER_HEADER, CLS_SOURCE, QA_TEMPLATE, mask_runs
from yan_serve.tokenizer import YANTokenizer

TASKS = ("infill", "complete", "qa", "classify")

# Length slack for serving: a server has no oracle target length, it sizes the target from the
# request (span budgets, max_tokens) and cuts at EOS. Fine-tuning therefore also shows targets
# with up to this many extra positions: EOS after the answer (complete, qa, classify), and <pad>
# inside each masked span (infill, per span). Not EOS inside spans: the sampler cuts a sequence
# at its first EOS, and a model taught mid-text EOS truncated passages at exact lengths (infill
# ROUGE-1 fell from 75 to 66). The server's defaults stay within these budgets.
SLACK = {"infill": 3, "complete": 16, "qa": 8, "classify": 6}

# The share of an infill passage's tokens that is masked, drawn per example from this range (the
# paper's fine-tuning rate; training may ask for more with `infill_rate`).
INFILL_RATE = (0.05, 0.10)


@dataclass
class Example:
    task: str
    src: list[int]
    tgt: list[int]
    reference: str
    id: str = ""
    fills: list[list[int]] = field(default_factory=list)  # infill: the masked token runs
    # target positions the task asks for (infill: the spans, slack included; qa: the answer and
    # its EOS); the rest of such a target copies the source. Empty: every position is asked for.
    focus: list[int] = field(default_factory=list)


def span_positions(src: list[int], spans: list[int], mask_id: int) -> list[int]:
    """Target positions covered by the spans of a collapsed infill source whose i-th <mask>
    stands for `spans[i]` target positions (every other source token is one target position)."""
    out: list[int] = []
    pos = i = 0
    for tok in src:
        if tok == mask_id and i < len(spans):
            out += range(pos, pos + spans[i])
            pos += spans[i]
            i += 1
        else:
            pos += 1
    return out


def mask_spans(
    ids: list[int],
    rng: random.Random,
    rate: float,
    max_span: int = 3,
    mask_id: int = 3,
    protect: frozenset[int] = frozenset(),
) -> tuple[list[int], list[list[int]]]:
    """Mask about `rate` of the tokens in spans of 1..max_span; collapse each masked run to one
    `mask_id`. Tokens in `protect` (BOS/EOS) are never masked. Returns (source, fills)."""
    n = len(ids)
    budget = max(1, round(rate * n))
    masked = [False] * n
    candidates = [i for i in range(n) if ids[i] not in protect]
    tries = 0
    while budget > 0 and candidates and tries < 10 * n:
        tries += 1
        start = rng.choice(candidates)
        span = min(rng.randint(1, max_span), budget)
        idx = [j for j in range(start, min(start + span, n)) if ids[j] not in protect]
        if any(masked[j] for j in idx) or not idx:
            continue
        for j in idx:
            masked[j] = True
        budget -= len(idx)
    src: list[int] = []
    fills: list[list[int]] = []
    for i, tok in enumerate(ids):
        if masked[i]:
            if i == 0 or not masked[i - 1]:
                src.append(mask_id)
                fills.append([])
            fills[-1].append(tok)
        else:
            src.append(tok)
    return src, fills


def expand_masks(src: list[int], spans: list[int], mask_id: int) -> list[int]:
    """A collapsed infill source with its i-th <mask> repeated `spans[i]` times: the
    `per_position` layout, one <mask> per target position of each span."""
    out: list[int] = []
    i = 0
    for tok in src:
        if tok == mask_id and i < len(spans):
            out += [mask_id] * spans[i]
            i += 1
        else:
            out.append(tok)
    return out


def split_last_word(text: str) -> tuple[str, str] | None:
    """("prefix", "word") with the last word's trailing punctuation dropped, or None."""
    m = re.match(r"^(.*\S)\s+([A-Za-z][\w'-]*)[^\w]*$", text.strip(), flags=re.S)
    return (m.group(1), m.group(2)) if m else None


def parse_answer(text: str) -> str:
    """The answer part of generated QA text: what follows the last ANSWER header."""
    return text.split("ANSWER #######")[-1].strip()


class TaskFormatter:
    """Builds examples of every task with one tokenizer."""

    def __init__(self, tok: YANTokenizer, infill_masks: str = "collapsed",
                 infill_rate: tuple[float, float] = INFILL_RATE) -> None:  # fmt: skip
        if infill_masks not in INFILL_MASKS:
            raise ValueError(f"infill_masks must be one of {', '.join(INFILL_MASKS)}")
        lo, hi = infill_rate
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"infill_rate must be 0 < low <= high < 1, got {lo}, {hi}")
        self.infill_rate = (float(lo), float(hi))
        self.tok = tok
        self.sp = tok.special
        self.per_position = infill_masks == "per_position"

    def _eos(self, ids: list[int]) -> list[int]:
        return [*ids, self.sp.eos]

    def infill(self, rec: TextRecord, rng: random.Random, rate: tuple[float, float] | None = None,
               max_span: int = 3) -> Example:  # fmt: skip
        """`rate`: the range the masked share is drawn from (default: the formatter's)."""
        clean = self._eos(self.tok.encode(rec.text))
        share = rng.uniform(*(rate or self.infill_rate))
        src, fills = mask_spans(clean, rng, share, max_span, self.sp.mask, frozenset({self.sp.eos}))
        spans = [len(f) for f in fills]
        focus = span_positions(src, spans, self.sp.mask)
        if self.per_position:
            src = expand_masks(src, spans, self.sp.mask)
        return Example("infill", src, clean, rec.text, rec.id, fills, focus)

    def complete(self, rec: TextRecord) -> Example | None:
        parts = split_last_word(rec.text)
        if parts is None:
            return None
        prefix, word = parts
        src = [*self.tok.encode(prefix), self.sp.mask]
        return Example("complete", src, self._eos(self.tok.encode(" " + word)), word, rec.id)

    def qa(self, rec: QARecord) -> Example:
        src_text = QA_TEMPLATE.format(ctx=rec.context, q=rec.question)
        prompt = self.tok.encode(src_text)
        tgt = self._eos(self.tok.encode(src_text + rec.answers[0]))
        pairs = zip(prompt, tgt[: len(prompt)], strict=True)
        k = next((i for i, (a, b) in enumerate(pairs) if a != b), len(prompt))  # answer starts
        return Example("qa", [*prompt, self.sp.mask], tgt, rec.answers[0], rec.id,
                       focus=list(range(k, len(tgt))))  # fmt: skip

    def make(self, task: str, rec, rng: random.Random) -> Example | None:
        """The example of `task` for a record (None if the record has no such example)."""
        if task == "infill":
            return self.infill(rec, rng)
        if task == "complete":
            return self.complete(rec)
        if task == "qa":
            return self.qa(rec)
        if task == "classify":
            return self.classify(rec)
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")

    def add_slack(self, ex: Example, rng: random.Random, max_len: int) -> Example:
        """The example with a random length slack (see `SLACK`): EOS positions after the answer,
        or <pad> positions inside infill spans, kept within `max_len` target positions."""
        eos = self.sp.eos
        room = max_len - len(ex.tgt)
        if room <= 0:
            return ex
        if ex.task != "infill":
            k = min(rng.randint(0, SLACK[ex.task]), room)
            focus = ex.focus and [*ex.focus, *range(len(ex.tgt), len(ex.tgt) + k)]
            return Example(ex.task, ex.src, ex.tgt + [eos] * k, ex.reference, ex.id, ex.fills,
                           focus)  # fmt: skip
        mask = self.sp.mask
        src = mask_runs(ex.src, mask) if self.per_position else ex.src
        tgt: list[int] = []
        spans: list[int] = []
        fill = 0
        for tok in src:
            if tok == mask and fill < len(ex.fills):
                k = min(rng.randint(0, SLACK["infill"]), room)
                room -= k
                tgt += ex.fills[fill] + [self.sp.pad] * k
                spans.append(len(ex.fills[fill]) + k)
                fill += 1
            else:
                tgt.append(tok)
        focus = span_positions(src, spans, mask)
        if self.per_position:
            src = expand_masks(src, spans, mask)
        return Example(ex.task, src, tgt, ex.reference, ex.id, ex.fills, focus)

    def classify(self, rec: ClassRecord) -> Example:
        src = self.tok.encode(CLS_SOURCE.format(doc=rec.text))
        tgt = self._eos(self.tok.encode(f"{ANSWER_HEADER}{rec.label} {rec.label_name}"))
        return Example("classify", src, tgt, str(rec.label), rec.id)
