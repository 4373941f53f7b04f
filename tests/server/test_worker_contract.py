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
