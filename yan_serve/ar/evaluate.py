"""`yan eval` for AR checkpoints: the same test examples, metrics and table as YAN.

Each example's source + BOS is the prompt; greedy KV-cache decoding stops at EOS or after the
reference target's length (the analogue of YAN's oracle length). Infill is scored twice: the
paper's protocol (`infill`: regenerate the passage) and fill-in-the-middle (`infill-fim`: only
the spans, put back into the source). tokens/s counts generated tokens over decoding time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from transformers import GPT2LMHeadModel

from yan_serve.ar.generate import ARRequest, ar_generate, ar_score
from yan_serve.tasks.corpus import Corpus, label_table
from yan_serve.tasks.evaluate import TaskResult, classify_by_label_scores, score, task_examples
from yan_serve.tasks.formats import TASKS, Example
from yan_serve.tokenizer import YANTokenizer


def fim_text(tok: YANTokenizer, ex: Example, generated: list[int]) -> str:
    """The source with each <mask> replaced by the matching generated span."""
    sp = tok.special
    spans: list[list[int]] = [[]]
    for t in generated:
        if t == sp.mask:
            spans.append([])
        else:
            spans[-1].append(t)
    ids: list[int] = []
    k = 0
    for t in ex.src:
        if t == sp.mask:
            ids += spans[k] if k < len(spans) else []
            k += 1
        elif t != sp.eos:
            ids.append(t)
    return tok.decode(ids)


def evaluate_ar(
    model: GPT2LMHeadModel,
    tok: YANTokenizer,
    corpus: Corpus,
    tasks: Sequence[str] = TASKS,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    progress=None,
    labels: dict[int, str] | None = None,
) -> list[TaskResult]:
    sp = tok.special
    max_len = int(getattr(model.config, "yan_max_length", model.config.n_positions // 2))
    results = []
    runs = [(t, "fim" if t == "infill-fim" else "full") for t in tasks]
    if "infill" in tasks and "infill-fim" not in tasks:
        runs.insert(runs.index(("infill", "full")) + 1, ("infill-fim", "fim"))
    for name, mode in runs:
        task = "infill" if name == "infill-fim" else name
        exs = task_examples(corpus, tok, task, split, limit, max_len)
        if not exs:
            raise ValueError(f"no {split} examples for task {task!r}")
        outs: list[str] = []
        n_tok, secs = 0, 0.0
        for i in range(0, len(exs), batch_size):
            chunk = exs[i : i + batch_size]
            budget = [len(e.fills) + sum(map(len, e.fills)) + 1 if mode == "fim" else len(e.tgt)
                      for e in chunk]  # fmt: skip
            reqs = [ARRequest([*e.src, sp.bos], b, seed=i + j)
                    for j, (e, b) in enumerate(zip(chunk, budget, strict=True))]  # fmt: skip
            t0 = time.perf_counter()
            gens = ar_generate(model, reqs, sp.eos, sp.pad)
            secs += time.perf_counter() - t0
            n_tok += sum(len(g.tokens) + int(g.hit_eos) for g in gens)
            if mode == "fim":
                outs += [fim_text(tok, e, g.tokens) for e, g in zip(chunk, gens, strict=True)]
            else:
                outs += [tok.decode(g.tokens) for g in gens]
        names = (labels or label_table(corpus, split)) if task == "classify" else None
        res = TaskResult(name, 0, len(exs), score(task, outs, exs, names), n_tok / max(secs, 1e-9))
        scored = [res]
        if task == "classify":
            scored.append(scored_classify_ar(model, tok, exs, names or {}, batch_size))
        for r in scored:
            results.append(r)
            if progress:
                progress(r)
    return results


def scored_classify_ar(model: GPT2LMHeadModel, tok: YANTokenizer, exs: Sequence[Example],
                       labels: dict[int, str], batch_size: int) -> TaskResult:  # fmt: skip
    """Classification by scoring every label, as the server's `labels` mode does for AR: the
    same targets and rule as YAN's `classify-scored`, each target teacher-forced after the
    example's source + BOS (`ar_score`, one forward per chunk)."""
    bos, pad = tok.special.bos, tok.special.pad

    def score(chunk: list[tuple[int, list[int]]]) -> list[list[float]]:
        return ar_score(model, [[*exs[i].src, bos] for i, _ in chunk], [t for _, t in chunk], pad)

    return classify_by_label_scores(tok, exs, labels, score, batch_size)
