"""Host work of one graph-served `generate` call, with the replay stubbed out.

`GraphSampler.generate` validates the requests, packs them into the pinned input buffer, replays
the graph and turns the read-back into `Generation`s. On a GPU the replay overlaps nothing: the
host part adds to every batch's wall time. This script captures one shape with a replay that
does nothing, on the CPU, and prints the median time of the rest and of its pieces.

    python scripts/graph_host_time.py --batch 64 --length 1024
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable

import torch

from yan_serve.argtypes import positive_int
from yan_serve.config import YANConfig
from yan_serve.engine.graphs import GraphSampler, Ladder, pack_inputs
from yan_serve.engine.sampler import GenerationRequest, Sampler, assemble
from yan_serve.model import YAN


class _NoReplay:
    def __init__(self, fn: Callable[[], None]) -> None:
        pass

    def replay(self) -> None:
        pass


def _times_ms(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    """(median, min) of `iters` calls after one warm-up, with the garbage collector paused
    (its pauses otherwise dominate the spread at these sizes)."""
    fn()
    gc.collect()
    gc.disable()
    try:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="graph_host_time", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--length", type=positive_int, default=1024, help="source = target positions")
    p.add_argument("--iters", type=positive_int, default=200)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(args: argparse.Namespace) -> None:
    cfg = YANConfig.from_name("yan-tiny", max_length=args.length, d_model=32, attention_heads=4)
    gs = GraphSampler(Sampler(YAN(cfg).eval()), capturer=_NoReplay)
    B, L = args.batch, args.length
    gs.capture(Ladder(batch_sizes=(B,), tgt_lengths=(L,), max_tokens=None, steps=3,
                      routings=("argmax",)))  # fmt: skip
    rng = random.Random(0)
    vocab = cfg.vocab_size
    reqs = [GenerationRequest([rng.randrange(4, vocab) for _ in range(L)], L, seed=i)
            for i in range(B)]  # fmt: skip
    entry = gs._entries[(3, "argmax")][0]
    out = entry.io.host_out
    tok, conf, expert = out[0, :B].long(), out[1, :B].clone(), out[2, :B].long()
    rows = {
        "generate (no replay)": lambda: gs.generate(reqs, 3, "argmax"),
        "  validate": lambda: gs.sampler.validate(reqs, token_ids=False),
        "  pack": lambda: pack_inputs(reqs, entry.shape, cfg.pad_token_id, entry.io.stage),
        "  assemble": lambda: assemble(reqs, tok, conf, expert, cfg.eos_token_id),
    }
    print(f"batch {B} x {L}, one thread, {args.iters} calls: median and min ms")
    for name, fn in rows.items():
        med, low = _times_ms(fn, args.iters)
        print(f"{name:<24}{med:8.2f}{low:8.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
