"""Batched autoregressive decoding with a KV cache (hand loop over `past_key_values`, which was
faster than `generate` on CPU). Prompts are left-padded; position ids skip the padding, so a
row's tokens do not depend on its batch-mates. Greedy unless a row has temperature > 0, which
samples with the row's own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GPT2LMHeadModel

from yan_serve.engine.sampler import sample_tokens


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


@torch.no_grad()
def ar_generate(
    model: GPT2LMHeadModel, requests: Sequence[ARRequest], eos: int, pad: int
) -> list[AROutput]:
    dev = next(model.parameters()).device
    B = len(requests)
    Lp = max(len(r.prompt) for r in requests)
    ids = torch.full((B, Lp), pad, dtype=torch.long)
    att = torch.zeros(B, Lp, dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, Lp - len(r.prompt) :] = torch.as_tensor(r.prompt)
        att[i, Lp - len(r.prompt) :] = 1
    ids, att = ids.to(dev), att.to(dev)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    gens = [torch.Generator().manual_seed(int(r.seed)) for r in requests]
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1].float()
    next_pos = pos[:, -1:] + 1
    toks: list[list[int]] = [[] for _ in range(B)]
    conf: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    hit = [False] * B
    limit = max(r.max_new for r in requests)
    for step in range(limit):
        logp = torch.log_softmax(logits, -1)
        nxt = logp.argmax(-1)
        for i, r in enumerate(requests):
            if r.temperature > 0 and not done[i]:
                u = torch.rand(1, generator=gens[i]).to(logits.device)
                nxt[i] = sample_tokens(logits[i : i + 1], r.temperature, r.top_k, u)[0]
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
        att = torch.cat([att, torch.ones(B, 1, dtype=att.dtype, device=dev)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=next_pos,
                    past_key_values=past, use_cache=True)  # fmt: skip
        past = out.past_key_values
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return [AROutput(t, c, h) for t, c, h in zip(toks, conf, hit, strict=True)]
