"""Where a YAN checkpoint's infill guesses come from: token accuracy at the masked positions of
held-out passages (the paper's masks, oracle lengths, greedy, argmax routing) for

- the whole model, the flow solved with T time points (what `yan eval` reports as span_acc);
- the frozen stage-1 autoencoder alone, D(E(source)) read at the <mask> positions of the
  source in the per-position layout, where source and target align: what the flow could copy;
- always writing the most frequent token of the training text: the prior.

If the whole model is no better than the autoencoder alone, the flow adds nothing at the gaps.

    python scripts/masked_token_probe.py --model weights/yan-tiny-kjv --data data/kjv
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from yan_serve.argtypes import fail, first_line, positive_int
from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.model import YAN
from yan_serve.tasks.corpus import load_corpus
from yan_serve.tasks.evaluate import position_accuracy, task_examples
from yan_serve.train.data import pad_stack
from yan_serve.weights import from_pretrained, is_ar_checkpoint, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "weights" / "yan-tiny-kjv"  # wherever the script is run from
PROG = "masked_token_probe"


def probe(model_dir: str, data: str, split: str, steps: int, limit: int | None,
          batch_size: int = 64, model: YAN | None = None) -> dict[str, float]:  # fmt: skip
    """{'masked': n, 'model': %, 'autoencoder': %, 'prior': %, 'prior_token': id}; `model`:
    the checkpoint already loaded from `model_dir`."""
    model = model if model is not None else from_pretrained(model_dir)
    tok = load_tokenizer(model_dir, model.config)
    corpus = load_corpus(data, splits=("train", split))
    L = model.config.max_length
    served = task_examples(corpus, tok, "infill", split, limit, L,
                           infill_masks=model.config.infill_masks)  # fmt: skip
    aligned = task_examples(corpus, tok, "infill", split, limit, L, infill_masks="per_position")
    prior = Counter(t for r in corpus.text["train"] for t in tok.encode(r.text)).most_common(1)
    top = prior[0][0]
    sampler = Sampler(model)
    n = hit_ae = hit_prior = 0
    outputs: list[list[int]] = []
    for i in range(0, len(served), batch_size):
        chunk, same = served[i : i + batch_size], aligned[i : i + batch_size]
        reqs = [GenerationRequest(e.src, len(e.tgt), seed=i + j) for j, e in enumerate(chunk)]
        outputs += [list(g.tokens) for g in sampler.generate(reqs, steps=steps, routing="argmax")]
        src, mask = pad_stack([e.src for e in same], tok.special.pad)
        with torch.no_grad():
            ae = model.decode_logits(model.encode(src, mask)).argmax(-1)
        for j, (e, a) in enumerate(zip(chunk, same, strict=True)):
            assert e.tgt == a.tgt and e.focus == a.focus, "the two layouts drew different masks"
            for p in e.focus:
                n += 1
                hit_ae += int(ae[j, p]) == e.tgt[p]
                hit_prior += e.tgt[p] == top
    pct = 100.0 / max(n, 1)
    span_acc = position_accuracy(outputs, served).get("span_acc", 0.0)
    return {"masked": n, "model": span_acc, "autoencoder": hit_ae * pct, "prior": hit_prior * pct,
            "prior_token": top}  # fmt: skip


def _fail(msg: str) -> int:
    return fail(PROG, msg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="a YAN checkpoint (default: the repository's weights/yan-tiny-kjv)",
    )
    p.add_argument("--data", required=True, help="a corpus directory (yan data kjv / english)")
    p.add_argument("--split", default="test")
    p.add_argument("--steps", type=positive_int, default=3,
                   help="Euler time points T of the whole model")  # fmt: skip
    p.add_argument(
        "--limit", type=positive_int, help="at most this many passages (default: all of the split)"
    )
    args = p.parse_args(argv)
    for f in ("train.jsonl", f"{args.split}.jsonl"):
        if not (Path(args.data) / f).is_file():
            return _fail(f"no {Path(args.data) / f} (build the corpus first)")
        if not (Path(args.data) / f).read_text().strip():
            return _fail(f"{Path(args.data) / f} holds no passages")
    if not Path(args.model).is_dir():
        return _fail(f"no checkpoint directory {args.model}")
    if is_ar_checkpoint(args.model):
        return _fail(f"{args.model} is an AR checkpoint; it probes YAN")
    torch.set_num_threads(1)
    try:
        model = from_pretrained(args.model)
        tok = load_tokenizer(args.model, model.config)
    except (ValueError, OSError, KeyError, NotImplementedError) as e:
        return _fail(f"cannot load {args.model}: {first_line(e)}")
    try:
        r = probe(args.model, args.data, args.split, args.steps, args.limit, model=model)
    except (ValueError, OSError, KeyError) as e:  # a corpus row the tasks cannot read
        return _fail(f"{args.data}: {first_line(e)}")
    if not r["masked"]:
        return _fail(f"no masked tokens in {args.data} ({args.split}): no passage to probe")
    top = tok.decode([int(r["prior_token"])])
    rows = [(f"whole model, T = {args.steps}", r["model"]),
            ("autoencoder alone, D(E(source))", r["autoencoder"]),
            (f"always {top!r} (most frequent)", r["prior"])]  # fmt: skip
    print(f"{args.model} on {args.data} ({args.split}): of {r['masked']:,} masked tokens, right")
    for name, value in rows:
        print(f"  {name:<34} {value:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
