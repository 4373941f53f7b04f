"""Served infill quality on held-out passages, without oracle lengths: mask 1-3 consecutive words
of each passage as one bare [MASK] (the server's default span budget), fill it as /v1/infill does
(`plan_infill`, greedy, argmax routing, each gap's content positions), and score the fill against
the masked words with ROUGE-L. Reports the mean ROUGE-L and the share of empty fills, with and
without empty spans allowed.

    yan data kjv --out data/kjv
    python scripts/served_fill_eval.py --data data/kjv --n 300
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from rouge_score import rouge_scorer

from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.tasks import serving as T
from yan_serve.weights import from_pretrained, load_tokenizer


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="weights/yan-tiny-kjv")
    p.add_argument("--data", required=True, help="a corpus directory (yan data kjv / english)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--span-tokens", type=int, default=2)
    args = p.parse_args(argv)
    path = Path(args.data) / f"{args.split}.jsonl"
    if not path.is_file():
        print(f"served_fill_eval: no {path} (build the corpus first)", file=sys.stderr)
        return 2
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    model = from_pretrained(args.model).eval()
    tok = load_tokenizer(args.model, model.config)
    sampler = Sampler(model)
    items = masked_items(rows, args.n, args.seed)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    print(f"{args.model} on {len(items)} {args.split} passages of {args.data}, bare [MASK] "
          f"({args.span_tokens} positions), greedy")  # fmt: skip
    for allow_empty in (True, False):
        scores, empty = [], 0
        for j, (text, gold) in enumerate(items):
            plan = T.plan_infill(tok, text, model.config.max_length, args.span_tokens)
            content = () if allow_empty else T.content_positions(plan)
            req = GenerationRequest(plan.src, plan.tgt_len, args.seed, content=content)
            g = sampler.generate([req], routing="argmax")[0]
            fill = T.finish_infill(tok, plan, g.full)[1][0].strip()
            empty += fill == ""
            scores.append(scorer.score(gold, fill)["rougeL"].fmeasure)
            if (j + 1) % 100 == 0:
                print(f"  allow_empty={allow_empty}: {j + 1}/{len(items)}", flush=True)
        print(f"allow_empty={allow_empty!s:<5}  ROUGE-L {sum(scores) / len(scores):.3f}  "
              f"empty fills {empty}/{len(items)} ({100 * empty / len(items):.1f}%)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
