"""Both backends implement every member of the `Worker` protocol the server calls, with the
types the protocol states, and answer the same typed requests."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from yan_serve.config import INFILL_MASKS
from yan_serve.engine.requests import EngineRequest, Scored, Worker
from yan_serve.engine.sampler import Generation
from yan_serve.tokenizer import YANTokenizer

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


def protocol_members(proto: type) -> tuple[set[str], set[str]]:
    """(attributes, methods) the protocol and its base protocols declare."""
    attrs: set[str] = set()
    methods: set[str] = set()
    for cls in proto.__mro__:
        if cls is object or not getattr(cls, "_is_protocol", False):
            continue
        attrs |= set(inspect.get_annotations(cls))
        methods |= {n for n, v in vars(cls).items() if inspect.isfunction(v) and n[0] != "_"}
    return attrs, methods


def load(kind: str) -> Worker:
    if kind == "yan":
        from yan_serve.engine.worker import YANWorker

        return YANWorker(WEIGHTS / "yan-tiny-kjv", "cpu")
    from yan_serve.ar.worker import ARWorker

    return ARWorker(WEIGHTS / "ar-tiny-kjv", "cpu")


def test_the_protocol_lists_what_the_server_uses() -> None:
    attrs, methods = protocol_members(Worker)
    assert {"kind", "tokenizer", "default_steps", "model_id", "max_length", "infill_masks"} <= attrs
    assert {"run", "warmup"} <= methods


@pytest.mark.parametrize("kind", ["yan", "ar"])
def test_each_worker_implements_the_protocol(kind: str) -> None:
    w = load(kind)
    attrs, methods = protocol_members(Worker)
    missing = sorted(n for n in attrs | methods if not hasattr(w, n))
    assert not missing, f"{type(w).__name__} lacks {missing}"
    assert all(callable(getattr(w, m)) for m in methods)
    assert w.kind == kind and isinstance(w.tokenizer, YANTokenizer)
    assert isinstance(w.device, torch.device) and w.device.type == "cpu"
    assert isinstance(w.default_steps, int) and w.default_steps >= 1
    assert isinstance(w.max_length, int) and isinstance(w.created, int)
    assert w.infill_masks in INFILL_MASKS
    assert w.labels is None or isinstance(w.labels, dict)
    assert w.warmup(w.default_steps) >= 0.0

    sp = w.tokenizer.special
    src = [*w.tokenizer.encode("In the beginning"), sp.mask]
    gen = w.run([EngineRequest(src, 4, seed, w.default_steps) for seed in (0, 1)])
    assert len(gen) == 2 and all(isinstance(g, Generation) for g in gen)
    assert all(len(g.full) == 4 for g in gen)
    target = [*w.tokenizer.encode(" God"), sp.eos]
    (s,) = w.run([EngineRequest(src, len(target), 0, w.default_steps, target=target,
                                top_logprobs=2)])  # fmt: skip
    assert isinstance(s, Scored) and len(s.logprobs) == len(target)
    assert s.top is not None and len(s.top) == len(target) and len(s.top[0]) == 2


@pytest.mark.parametrize("kind", ["yan", "ar"])
def test_top_logprobs_are_the_requests_own_whatever_its_batch_mates_ask(kind: str) -> None:
    """A `top_logprobs = 1` request batched with a `top_logprobs = 5` one gets what it gets
    alone: one entry per position, the same tokens (the batch computes the top 5 for both)."""
    w = load(kind)
    sp = w.tokenizer.special
    ids = w.tokenizer.encode("In the beginning God created the heaven")

    def echo_scores(k: int, seed: int) -> list[EngineRequest]:  # as /v1/completions' echo
        return [EngineRequest([*ids[:i], sp.mask], len(ids) - i + 1, seed, w.default_steps,
                              target=[*ids[i:], sp.eos], top_logprobs=k)
                for i in range(1, 4)]  # fmt: skip

    alone = w.run(echo_scores(1, 3))
    batched = w.run([*echo_scores(1, 3), *echo_scores(5, 4)])
    for a, b in zip(alone, batched[:3], strict=True):
        assert isinstance(a, Scored) and isinstance(b, Scored) and a.top and b.top
        assert all(len(pos) == 1 for pos in b.top)
        assert [[t for t, _ in pos] for pos in b.top] == [[t for t, _ in pos] for pos in a.top]
        assert [v for pos in b.top for _, v in pos] == pytest.approx(
            [v for pos in a.top for _, v in pos], rel=1e-5, abs=1e-5
        )
    assert all(len(pos) == 5 for b in batched[3:] for pos in b.top or [])
