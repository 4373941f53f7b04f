"""Served infill quality on held-out passages, without oracle lengths: mask 1-3 consecutive words
of each passage as one bare [MASK] (the server's default span budget) and fill it exactly as
/v1/infill does (the same plan, worker and options: greedy, argmax routing; YAN at the
checkpoint's default T, an AR checkpoint by fill-in-the-middle), then score each fill against
the masked words with ROUGE-L. Reports the mean ROUGE-L and the share of empty fills, with and
without empty spans allowed (YAN; the AR baseline writes what it writes either way).

`--candidates K` asks for K candidates per passage as a request with `"n": K` does (seeds seed,
seed + 1, ...; YAN only: the AR baseline fills greedily, every candidate alike) and scores the
one the server returns first, the highest fill confidence; it also prints the ROUGE-L of the best
candidate per passage (an oracle: how much a perfect ranking could gain).

    yan data kjv --out data/kjv
    python scripts/served_fill_eval.py --data data/kjv --n 300
    python scripts/served_fill_eval.py --data data/kjv --n 300 --model weights/ar-tiny-kjv
    python scripts/served_fill_eval.py --data data/kjv --n 300 --candidates 4
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

from rouge_score import rouge_scorer

from yan_serve.argtypes import count_int, fail, first_line, positive_int
from yan_serve.engine.requests import EngineRequest, TaskOptions
from yan_serve.server.loader import load_worker
from yan_serve.tasks import serving as T
from yan_serve.tasks.corpus import read_jsonl
from yan_serve.weights import is_ar_checkpoint


def masked_items(rows: list[dict], n: int, seed: int) -> list[tuple[str, str]]:
    """(text with one [MASK], the masked words) for n passages, 1-3 words each."""
    rng = random.Random(seed)
    items = []
    for r in rng.sample(rows, min(n, len(rows))):
        words = r["text"].split()
        k = rng.randint(1, 3)
        i = rng.randrange(1, max(2, len(words) - k))
        items.append(
            (" ".join([*words[:i], "[MASK]", *words[i + k :]]), " ".join(words[i : i + k]))
        )
    return items


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "weights" / "yan-tiny-kjv"  # wherever the script is run from
PROG = "served_fill_eval"


def read_passages(path: Path) -> list[dict]:
    """The corpus split's passages (rows with a non-empty "text"; `read_jsonl` names a line
    that is not a corpus row); ValueError for a split without any."""
    rows = [r for r in read_jsonl(path) if str(r.get("text", "")).split()]
    if not rows:
        raise ValueError(f"{path} holds no passages")
    return rows


def candidate_fills(worker, plans: list[T.Plan], seed: int, k: int, steps: int,
                    opts: TaskOptions) -> list[list[tuple[float, str]]]:  # fmt: skip
    """Per plan (one [MASK] each), its k candidates as the server makes them for `"n": k`:
    (fill confidence, fill text) for seeds seed, seed + 1, ..., in seed order (the AR baseline's
    confidence reads 0.0: it is not ranked)."""
    tok = worker.tokenizer
    specials = set(tok.special.ids())
    out: list[list[tuple[float, str]]] = [[] for _ in plans]
    for j in range(k):
        reqs = [EngineRequest(pl.src, pl.tgt_len, seed + j, steps, plan=pl, options=opts)
                for pl in plans]  # fmt: skip
        for cs, pl, g in zip(out, plans, worker.run(reqs), strict=True):
            conf = (T.infill_confidence(pl, g.full, g.full_confidence, specials)[1]
                    if worker.kind == "yan" else 0.0)  # fmt: skip
            cs.append((conf, T.finish_infill(tok, pl, g.full)[1][0].strip()))
    return out


def first(cands: list[tuple[float, str]]) -> tuple[float, str]:
    """The candidate the server returns first: the highest confidence, the earlier of equals."""
    return max(cands, key=lambda c: c[0])


def _fail(msg: str) -> int:
    return fail(PROG, msg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="a YAN or AR checkpoint (default: the repository's"
                   " weights/yan-tiny-kjv)")  # fmt: skip
    p.add_argument("--data", required=True, help="a corpus directory (yan data kjv / english)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=positive_int, default=300, help="passages (at most the split's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--span-tokens", type=positive_int, default=2)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--steps", type=count_int, default=0,
                   help="YAN: Euler time points T (0: the server's default)")  # fmt: skip
    p.add_argument("--candidates", type=positive_int, default=1,
                   help="YAN: candidates per passage; the most confident is scored")  # fmt: skip
    args = p.parse_args(argv)
    path = Path(args.data) / f"{args.split}.jsonl"
    if not path.is_file():
        return _fail(f"no {path} (build the corpus first)")
    if not Path(args.model).is_dir():
        return _fail(f"no checkpoint directory {args.model}")
    try:
        rows = read_passages(path)
    except (ValueError, OSError) as e:
        return _fail(first_line(e))
    if args.candidates > 1 and is_ar_checkpoint(args.model):
        return _fail(f"--candidates {args.candidates}: the AR baseline fills greedily, every "
                     "candidate the same (YAN checkpoints only)")  # fmt: skip
    try:
        worker = load_worker(args.model, "cpu")
    except (ValueError, OSError, KeyError, NotImplementedError) as e:
        return _fail(f"cannot load {args.model}: {first_line(e)}")
    tok = worker.tokenizer
    items = masked_items(rows, args.n, args.seed)
    try:
        plans = [T.plan_infill(tok, text, worker.max_length, args.span_tokens,
                               infill_masks=worker.infill_masks) for text, _ in items]  # fmt: skip
    except T.PlanError as e:
        return _fail(first_line(e))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    steps = args.steps or worker.default_steps
    at = f", T = {steps}" if worker.kind == "yan" else ""
    print(f"{args.model} ({worker.kind}) on {len(items)} {args.split} passages of {args.data}, "
          f"bare [MASK] ({args.span_tokens} positions), greedy{at}")  # fmt: skip
    pick = f", the most confident of {args.candidates} candidates" if args.candidates > 1 else ""
    for allow_empty in (True, False):
        opts = TaskOptions(allow_empty=allow_empty)
        scores, best, empty = [], [], 0
        for a in range(0, len(items), args.batch_size):
            chunk = plans[a : a + args.batch_size]
            golds = [gold for _, gold in items[a : a + args.batch_size]]
            for gold, cs in zip(golds, candidate_fills(worker, chunk, args.seed, args.candidates,
                                                       steps, opts), strict=True):  # fmt: skip
                fill = first(cs)[1]
                empty += fill == ""
                scores.append(scorer.score(gold, fill)["rougeL"].fmeasure)
                best.append(max(scorer.score(gold, f)["rougeL"].fmeasure for _, f in cs))
            if len(scores) // 100 > (len(scores) - len(chunk)) // 100:
                print(f"  allow_empty={allow_empty}: {len(scores)}/{len(items)}", flush=True)
        se = statistics.stdev(scores) / len(scores) ** 0.5 if len(scores) > 1 else 0.0
        print(f"allow_empty={allow_empty!s:<5}  ROUGE-L {statistics.mean(scores):.3f}  "
              f"empty fills {empty}/{len(items)} ({100 * empty / len(items):.1f}%)  "
              f"(standard error of the mean {se:.3f}){pick}")  # fmt: skip
        if args.candidates > 1:
            print(f"{'':19}best of the {args.candidates} candidates by ROUGE-L (oracle): "
                  f"{statistics.mean(best):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
