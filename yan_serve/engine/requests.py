"""The typed contract between the server and a model worker.

The server turns each API request into one `EngineRequest` per candidate (or per target to
score) and hands batches of them to a `Worker`; the worker answers each with a `Generation` or,
for a score request, a `Scored`. Both backends implement `Worker`: `YANWorker`
(`yan_serve.engine.worker`) and the autoregressive baseline's `ARWorker`
(`yan_serve.ar.worker`). The types live in the engine so that both layers can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from yan_serve.engine.sampler import Generation
from yan_serve.flow.solver import Routing
from yan_serve.tokenizer import YANTokenizer

TopLogprobs = list[list[tuple[int, float]]]  # per target position: (token id, logprob), best first


@dataclass
class Plan:
    """A request's layout, as the task formats (`yan_serve.tasks.serving`) build it: the source,
    the target length, and where in the target the unknown content lies."""

    task: str
    src: list[int]
    tgt_len: int
    # infill: the known target pieces around the fills and each fill's target positions
    pieces: list[list[int]] | None = None
    fill_slots: list[tuple[int, int]] | None = None
    # qa / classify: the target position where the answer starts (after the known prefix)
    answer_start: int = 0


def content_positions(plan: Plan) -> tuple[int, ...]:
    """The target positions that must hold a content token: the first slot of each infill gap
    (so that no [MASK] comes back empty); none for the other tasks."""
    if plan.task != "infill" or not plan.fill_slots:
        return ()
    return tuple(a for a, b in plan.fill_slots if b > a)


@dataclass(frozen=True)
class TaskOptions:
    """Task options that change how a backend serves a request (each says which backend)."""

    # infill, YAN: a gap may come back empty; otherwise its first position holds a word token
    allow_empty: bool = False
    # infill, AR: `fim` generates only the spans, `full` regenerates the whole passage
    protocol: Literal["fim", "full"] = "fim"
    # AR: decode the whole budget instead of stopping at EOS (YAN computes every position anyway)
    ignore_eos: bool = False


@dataclass(eq=False)
class EngineRequest:
    """One candidate to generate, or (with `target`) one target to score, with every generation
    parameter and task option typed. Requests in one `Worker.run` batch share `steps`,
    `routing` and the mode (all generate or all score)."""

    src: list[int]  # source token ids
    tgt_len: int  # target positions to generate (the task's budget, never an oracle)
    seed: int  # this request's own noise: the same seed, the same output in any batch
    steps: int  # Euler time points T on [0, 1] (T - 1 Euler steps); the AR worker ignores it
    routing: Routing = "argmax"  # how each position's expert is frozen at t = 0
    temperature: float = 0.0  # 0: greedy decoding; > 0: sample from the tempered decoder
    top_k: int = 0  # with temperature > 0: sample among the k most likely tokens (0: all)
    target: list[int] | None = None  # score this target instead of generating
    top_logprobs: int = 0  # score requests: also the k most likely tokens at each position
    plan: Plan | None = None  # the task's layout (infill gaps, answer start), when there is one
    options: TaskOptions = TaskOptions()
    # generate requests: called on the worker thread with (time point, target tokens) at each
    # Euler time point, for streamed previews
    on_step: Callable[[int, list[int]], None] | None = None

    @property
    def scores(self) -> bool:
        """A score request (a `target` to score) rather than a generation."""
        return self.target is not None


@dataclass
class Scored:
    """A score request's result: the target's log-probabilities and, when the request asked
    for `top_logprobs = k`, the k most likely (token id, logprob) at every target position."""

    logprobs: list[float]
    top: TopLogprobs | None = None


Result = Generation | Scored


def scored(
    requests: Sequence[EngineRequest],
    logprobs: list[list[float]],
    top_of: Callable[[list[int], int], list[TopLogprobs]],
) -> list[Scored]:
    """Score results; `top_of(indices, k)` computes the top log-probabilities of the requests
    that asked for them (only those), k being the largest of their `top_logprobs`, in one pass.
    Each request then keeps its own `top_logprobs` best entries per position, so that what it
    gets does not depend on what its batch-mates asked for."""
    want = [i for i, r in enumerate(requests) if r.top_logprobs > 0]
    tops: dict[int, TopLogprobs] = {}
    if want:
        k = max(requests[i].top_logprobs for i in want)
        for i, top in zip(want, top_of(want, k), strict=True):
            tops[i] = [pos[: requests[i].top_logprobs] for pos in top]
    return [Scored(lp, tops.get(i)) for i, lp in enumerate(logprobs)]


class Runner(Protocol):
    """What the batcher needs of a worker."""

    def run(self, requests: Sequence[EngineRequest]) -> list[Result]:
        """Results for a batch of compatible requests (see `EngineRequest`), in order: a
        `Generation` per generate request, a `Scored` per score request. Runs on the model
        thread; raises ValueError for a request the model cannot serve."""
        ...


class Worker(Runner, Protocol):
    """A loaded checkpoint serving `EngineRequest`s: everything the server uses of it."""

    kind: str  # the backend: "yan" or "ar"
    model_id: str  # the served model's id (the checkpoint directory's name)
    created: int  # the checkpoint's modification time (Unix seconds), for /v1/models
    device: torch.device
    tokenizer: YANTokenizer
    labels: dict[int, str] | None  # the checkpoint's class labels (labels.json), if any
    max_length: int  # the most source and target positions a request may have
    infill_masks: str  # how an infill source marks a span (YANConfig.infill_masks)
    default_steps: int  # the checkpoint's Euler time points T when a request gives none

    def warmup(self, steps: int) -> float:
        """Run the shapes first requests will meet (and capture CUDA graphs where the backend
        has them) before the server says it is ready; returns the seconds it took."""
        ...
