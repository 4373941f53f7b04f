"""Evaluate a checkpoint on the test split of every task, at several Euler step counts.

Protocol (as the paper's Table 1): ORACLE target lengths (the reference target's token count),
greedy decoding, frozen routing by argmax unless asked otherwise, one seed per example (its
index), batches of `batch_size` (results do not depend on it). tokens/s counts generated
target positions over the sampler's wall time on this device.

Infill rows also report the token accuracy at the masked spans' positions (`span_acc`) and at the
copied ones (`copy_acc`): ROUGE over the whole passage is ~95 for a plain copy of the source, so
it barely moves with what a model writes into the gaps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.model import YAN
from yan_serve.tasks import metrics
from yan_serve.tasks.corpus import Corpus, label_table
from yan_serve.tasks.formats import TASKS, Example, TaskFormatter, parse_answer
from yan_serve.tasks.serving import parse_label
from yan_serve.tokenizer import YANTokenizer


@dataclass
class TaskResult:
    task: str
    steps: int
    n: int
    scores: dict[str, float]
    tokens_per_s: float


def task_examples(corpus: Corpus, tok: YANTokenizer, task: str, split: str, limit: int | None,
                  max_len: int, seed: int = 0,
                  infill_masks: str = "collapsed") -> list[Example]:  # fmt: skip
    """The split's examples of a task, fixed by `seed` (infill masks) and cut to `limit`; infill
    sources in the model's layout (`infill_masks`), the same masks in either layout. `limit`
    keeps the first examples in the split's file order, not a sample: a file sorted by class
    gives a classification limit one class."""
    fmt = TaskFormatter(tok, infill_masks)
    rng = random.Random(seed)
    out: list[Example] = []
    for r in corpus.records(task, split):
        ex = fmt.make(task, r, rng)
        if ex is not None and len(ex.src) <= max_len and len(ex.tgt) <= max_len:
            out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    return out


def score(task: str, outputs: Sequence[str], examples: Sequence[Example],
          names: dict[int, str] | None = None) -> dict[str, float]:  # fmt: skip
    """The task's metrics; classification reads labels with `parse_label(text, names)`."""
    refs = [e.reference for e in examples]
    if task == "infill":
        return metrics.rouge(outputs, refs)
    if task == "complete":
        words = [o.strip().split()[0] if o.strip() else "" for o in outputs]
        return {"exact_match": metrics.exact_match_score(words, refs, ignore_punct=True)}
    if task == "qa":
        answers = [parse_answer(o) for o in outputs]
        return {
            "f1": metrics.token_f1_score(answers, refs),
            "exact_match": metrics.exact_match_score(answers, refs, ignore_case=True),
        }
    labels = [parse_label(o, names) for o in outputs]
    return {"accuracy": metrics.accuracy([str(x) for x in labels], refs)}


def evaluate(
    model: YAN,
    tok: YANTokenizer,
    corpus: Corpus,
    tasks: Sequence[str] = TASKS,
    steps_list: Sequence[int] = (3,),
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    routing: str = "argmax",
    progress=None,
    labels: dict[int, str] | None = None,
) -> list[TaskResult]:
    """Every task at every step count; infill adds the served protocol (`served_infill`) and
    classification adds candidate scoring over `labels` (`scored_classify`), as the server
    does them."""
    sampler = Sampler(model)
    results = []
    for task in tasks:
        exs = task_examples(corpus, tok, task, split, limit, model.config.max_length,
                            infill_masks=model.config.infill_masks)  # fmt: skip
        if not exs:
            raise ValueError(f"no {split} examples for task {task!r}")
        if task == "infill":
            # the trivial baseline any infiller must beat: the source with its masks dropped
            mask = tok.special.mask
            copies = [tok.decode([t for t in e.src if t != mask]) for e in exs]
            results.append(
                TaskResult("infill-copy-source", 0, len(exs), score(task, copies, exs), 0.0)
            )
            if progress:
                progress(results[-1])
        names = (labels or label_table(corpus, split)) if task == "classify" else None
        for T in steps_list:
            outs: list[str] = []
            tokens: list[list[int]] = []
            n_tok, secs = 0, 0.0
            for i in range(0, len(exs), batch_size):
                chunk = exs[i : i + batch_size]
                reqs = [
                    GenerationRequest(e.src, len(e.tgt), seed=i + j) for j, e in enumerate(chunk)
                ]
                t0 = time.perf_counter()
                gens = sampler.generate(reqs, steps=T, routing=routing)  # type: ignore[arg-type]
                secs += time.perf_counter() - t0
                n_tok += sum(r.tgt_len for r in reqs)
                outs += [tok.decode(g.tokens) for g in gens]
                tokens += [g.tokens for g in gens]
            scores = score(task, outs, exs, names)
            if task == "infill":
                scores.update(position_accuracy(tokens, exs))
            res = TaskResult(task, T, len(exs), scores, n_tok / max(secs, 1e-9))
            results.append(res)
            if progress:
                progress(res)
            extra = None
            if task == "infill":
                extra = served_infill(sampler, tok, exs, T, routing, batch_size)
            elif task == "classify":
                extra = scored_classify(sampler, tok, exs, names or {}, T, routing, batch_size)
            if extra is not None:
                results.append(extra)
                if progress:
                    progress(extra)
    return results


def position_accuracy(outputs: Sequence[Sequence[int]], exs: Sequence[Example]) -> dict[str, float]:
    """Token accuracy (%) of generated targets at the examples' focus positions (an infill
    example's masked spans: `span_acc`) and at the others (the text copied from the source:
    `copy_acc`); a position past a generation's end (it stopped at EOS) counts as wrong."""
    hit = {True: 0, False: 0}
    tot = {True: 0, False: 0}
    for out, e in zip(outputs, exs, strict=True):
        focus = set(e.focus)
        for p, t in enumerate(e.tgt):
            f = p in focus
            tot[f] += 1
            hit[f] += p < len(out) and out[p] == t
    return {name: 100.0 * hit[f] / tot[f] for name, f in (("span_acc", True), ("copy_acc", False))
            if tot[f]}  # fmt: skip


def scored_classify(sampler: Sampler, tok: YANTokenizer, exs: Sequence[Example],
                    labels: dict[int, str], steps: int, routing: str,
                    batch_size: int) -> TaskResult:  # fmt: skip
    """Classification by scoring every label (the server's `labels` mode): targets are padded to
    one length (so an example's candidates share one latent), and the label with the highest
    decoder log-probability after the header wins."""

    def score(chunk: list[tuple[int, list[int]]]) -> list[list[float]]:
        reqs = [GenerationRequest(exs[i].src, len(t), seed=i) for i, t in chunk]
        return sampler.score(reqs, [t for _, t in chunk], steps, routing)  # type: ignore[arg-type]

    return classify_by_label_scores(tok, exs, labels, score, batch_size, steps, pad=True)


def classify_by_label_scores(
    tok: YANTokenizer,
    exs: Sequence[Example],
    labels: dict[int, str],
    score: Callable[[list[tuple[int, list[int]]]], list[list[float]]],
    batch_size: int,
    steps: int = 0,
    pad: bool = False,
) -> TaskResult:
    """The `classify-scored` row for any model: every example against every label's target
    (`tasks.serving.label_target`, EOS-padded to one length when `pad`), `score` giving the
    log-probabilities of a chunk of (example index, target) pairs; per example the label with
    the highest summed log-probability after the answer header wins."""
    from yan_serve.tasks import serving as T

    if not labels:
        raise ValueError("classify-scored needs the label table")
    header = len(tok.encode(T.ANSWER_HEADER))
    ids = sorted(labels)
    targets = [T.label_target(tok, labels[k], labels) for k in ids]
    if pad:
        targets = T.pad_targets(targets, tok.special.eos)
    jobs = [(i, k, t) for i in range(len(exs)) for k, t in zip(ids, targets, strict=True)]
    best: dict[int, tuple[float, int]] = {}
    t0 = time.perf_counter()
    for a in range(0, len(jobs), batch_size):
        chunk = jobs[a : a + batch_size]
        logps = score([(i, t) for i, _, t in chunk])
        for (i, k, _), lp in zip(chunk, logps, strict=True):
            m = sum(lp[header:])
            if i not in best or m > best[i][0]:
                best[i] = (m, k)
    secs = time.perf_counter() - t0
    acc = metrics.accuracy([str(best[i][1]) for i in range(len(exs))], [e.reference for e in exs])
    n_tok = sum(len(t) for _, _, t in jobs)
    return TaskResult("classify-scored", steps, len(exs), {"accuracy": acc},
                      n_tok / max(secs, 1e-9))  # fmt: skip


def served_infill(sampler: Sampler, tok: YANTokenizer, exs: Sequence[Example], steps: int,
                  routing: str, batch_size: int, budget: int = 2) -> TaskResult:  # fmt: skip
    """Infill as the server does it (no oracle): every span gets the server's default budget of
    `budget` positions, the known text is kept and the fills are read from their slots."""
    from yan_serve.tasks import serving as T

    sp = tok.special
    layout = sampler.model.config.infill_masks
    plans = [T.infill_plan_from_source(e.src, budget, sp.mask, sp.eos, layout) for e in exs]
    outs: list[str] = []
    n_tok, secs = 0, 0.0
    for i in range(0, len(exs), batch_size):
        chunk = plans[i : i + batch_size]
        reqs = [GenerationRequest(p.src, p.tgt_len, seed=i + j) for j, p in enumerate(chunk)]
        t0 = time.perf_counter()
        gens = sampler.generate(reqs, steps=steps, routing=routing)  # type: ignore[arg-type]
        secs += time.perf_counter() - t0
        n_tok += sum(r.tgt_len for r in reqs)
        outs += [T.finish_infill(tok, p, g.full)[0] for p, g in zip(chunk, gens, strict=True)]
    return TaskResult("infill-served", steps, len(exs), score("infill", outs, exs),
                      n_tok / max(secs, 1e-9))  # fmt: skip


def diversity(
    model: YAN,
    tok: YANTokenizer,
    corpus: Corpus,
    n_examples: int = 50,
    n_samples: int = 5,
    steps: int = 3,
    split: str = "test",
    semantic: bool = False,
) -> dict[str, float]:
    """Diversity of sampled infills (paper's protocol): for each of `n_examples` test passages,
    `n_samples` generations with different seeds and sampled routing. Reports Dist-2 and
    Self-BLEU averaged over passages, and (if `semantic`, needs the MiniLM package) the mean
    pairwise semantic distance."""
    sampler = Sampler(model)
    exs = task_examples(corpus, tok, "infill", split, n_examples, model.config.max_length,
                        infill_masks=model.config.infill_masks)  # fmt: skip
    d2, sb, sem = [], [], []
    for e in exs:
        reqs = [GenerationRequest(e.src, len(e.tgt), seed=s) for s in range(n_samples)]
        outs = [tok.decode(g.tokens) for g in sampler.generate(reqs, steps=steps, routing="sample")]
        d2.append(metrics.dist2(outs))
        sb.append(metrics.self_bleu(outs))
        if semantic:
            sem.append(metrics.semantic_distance(outs))
    out = {"dist2": sum(d2) / len(d2), "self_bleu": sum(sb) / len(sb), "n": float(len(exs))}
    if semantic:
        out["semantic_distance"] = sum(sem) / len(sem)
    return out


def results_table(results: Sequence[TaskResult]) -> str:
    """Markdown table: one row per (task, T)."""
    lines = ["| task | T | n | scores | tokens/s |", "|---|---|---|---|---|"]
    for r in results:
        s = ", ".join(f"{k} {v:.1f}" for k, v in r.scores.items())
        lines.append(f"| {r.task} | {r.steps} | {r.n} | {s} | {r.tokens_per_s:,.0f} |")
    return "\n".join(lines)
