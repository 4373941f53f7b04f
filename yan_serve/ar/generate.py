"""Batched autoregressive decoding with a KV cache (hand loop over `past_key_values`, which was
faster than `generate` on CPU). Prompts are left-padded; position ids skip the padding, so a
row's tokens do not depend on its batch-mates. Greedy unless a row has temperature > 0, which
samples with the row's own seeded generator.

The forward passes come from a runner: `HFRunner` (Hugging Face's growing cache, any shape, the
reference) or a `StaticRunner` (static KV cache, each decode step one CUDA-graph replay on GPU;
yan_serve/ar/static.py) when one of its captured windows holds the batch. A `FusedRunner`
(yan_serve/ar/fused.py: fused decode step, token choice and stopping on the device) passed as
`static` generates the whole batch itself when one of its windows holds it, with the same
outputs (`left_pad` and `collect_outputs` are the rules both paths share)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import GPT2LMHeadModel

from yan_serve.ar.static import HFRunner, StaticRunner
from yan_serve.ar.train import collate_ar
from yan_serve.engine.sampler import effective_temperature, sample_tokens

if TYPE_CHECKING:
    from yan_serve.ar.fused import FusedRunner


@dataclass
class ARRequest:
    prompt: list[int]
    max_new: int
    seed: int = 0
    temperature: float = 0.0
    top_k: int = 0
    ignore_eos: bool = False  # benchmarking: decode all max_new tokens


@dataclass
class AROutput:
    tokens: list[int]  # generated tokens, EOS excluded
    confidence: list[float]  # model probability of each kept token
    hit_eos: bool


def left_pad(requests: Sequence[ARRequest], pad: int, device: torch.device) -> tuple[Tensor, ...]:
    """Left-padded prompts: ids, attention mask and position ids [B, Lp] on `device`; position
    ids count real tokens only, so padding never shifts a row's positions."""
    B, Lp = len(requests), max(len(r.prompt) for r in requests)
    ids = torch.full((B, Lp), pad, dtype=torch.long)
    att = torch.zeros(B, Lp, dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, Lp - len(r.prompt) :] = torch.as_tensor(r.prompt, dtype=torch.long)
        att[i, Lp - len(r.prompt) :] = 1
    ids, att = ids.to(device), att.to(device)
    return ids, att, (att.cumsum(-1) - 1).clamp_min(0)


def collect_outputs(requests: Sequence[ARRequest], picked: Sequence[Sequence[int]],
                    probs: Sequence[Sequence[float]], eos: int) -> list[AROutput]:  # fmt: skip
    """Outputs from every row's chosen tokens step by step (and their probabilities), by the
    rules of `ar_generate`'s loop: a row keeps tokens until EOS (dropped, `hit_eos`) unless it
    ignores EOS, and stops once it holds `max_new` (a step's token is kept before that check)."""
    outs = []
    for r, row, ps in zip(requests, picked, probs, strict=True):
        toks: list[int] = []
        conf: list[float] = []
        hit = False
        for t, p in zip(row, ps, strict=True):
            if t == eos and not r.ignore_eos:
                hit = True
                break
            toks.append(t)
            conf.append(p)
            if len(toks) >= r.max_new:
                break
        outs.append(AROutput(toks, conf, hit))
    return outs


@torch.no_grad()
def ar_generate(
    model: GPT2LMHeadModel,
    requests: Sequence[ARRequest],
    eos: int,
    pad: int,
    static: StaticRunner | FusedRunner | None = None,
) -> list[AROutput]:
    dev = next(model.parameters()).device
    B = len(requests)
    limit = max(r.max_new for r in requests)
    Lp = max(len(r.prompt) for r in requests)
    if hasattr(static, "generate") and static.fits(B, Lp, limit):  # a FusedRunner
        return static.generate(requests, eos, pad)
    ids, att, pos = left_pad(requests, pad, dev)
    gens = [torch.Generator().manual_seed(int(r.seed)) for r in requests]
    use_static = static is not None and static.fits(B, Lp, limit)
    runner = static if use_static else HFRunner(model)
    logp = runner.start(ids, att, pos, limit)
    toks: list[list[int]] = [[] for _ in range(B)]
    conf: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    hit = [False] * B
    for step in range(limit):
        nxt = logp.argmax(-1)
        for i, r in enumerate(requests):
            if r.temperature > 0 and not done[i]:
                u = torch.rand(1, generator=gens[i]).to(logp.device)
                t = effective_temperature(r.temperature)
                nxt[i] = sample_tokens(logp[i : i + 1], t, r.top_k, u)[0]
        probs = logp.gather(-1, nxt[:, None]).squeeze(-1).exp().tolist()
        picked = nxt.tolist()
        for i, r in enumerate(requests):
            if done[i]:
                continue
            if picked[i] == eos and not r.ignore_eos:
                done[i] = hit[i] = True
            else:
                toks[i].append(picked[i])
                conf[i].append(probs[i])
                if len(toks[i]) >= r.max_new:
                    done[i] = True
        if all(done) or step == limit - 1:
            break
        logp = runner.step(nxt)
    return [AROutput(t, c, h) for t, c, h in zip(toks, conf, hit, strict=True)]


@torch.no_grad()
def ar_score(
    model: GPT2LMHeadModel, prompts: Sequence[list[int]], targets: Sequence[list[int]], pad: int
) -> list[list[float]]:
    """Log-probability of each target token after its prompt (teacher forcing), one forward for
    the batch. Rows are right-padded, so every real position keeps its own positions and sees
    only its own earlier tokens: the padding after a row never reaches it."""
    if len(prompts) != len(targets):
        raise ValueError("one target per prompt")
    if not prompts:
        return []
    dev = next(model.parameters()).device
    # right-padded as the training batches are
    ids, att, _ = collate_ar([([*p, *t], len(p)) for p, t in zip(prompts, targets, strict=True)],
                             pad)  # fmt: skip
    h = model.transformer(input_ids=ids.to(dev), attention_mask=att.to(dev)).last_hidden_state
    out = []
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        if not t:
            out.append([])
            continue
        # the hidden state at position q predicts token q + 1
        logp = torch.log_softmax(model.lm_head(h[i, len(p) - 1 : len(p) - 1 + len(t)]).float(), -1)
        out.append(logp.gather(-1, torch.tensor(t, device=dev)[:, None]).squeeze(-1).tolist())
    return out
