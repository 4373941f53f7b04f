"""Overfit a handful of sequences: both training stages must actually learn.

Stage 1 (denoising autoencoder) and stage 2 (MoE-FM NLL + CE through the unrolled solve) on
4 fixed source -> target pairs with a micro model. Run: python -m pytest tests/train -q
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import micro_config
from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.model import YAN
from yan_serve.train.objectives import Stage1Weights, Stage2Weights, stage1_loss, stage2_loss


def _data(g: torch.Generator):
    lengths = [12, 10, 8, 11]
    L = max(lengths)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    tgt = torch.randint(4, 61, (4, L), generator=g).masked_fill(~mask, 0)
    for i, n in enumerate(lengths):
        tgt[i, n - 1] = 2  # EOS
    return tgt, mask, tgt[:, :6].clone(), mask[:, :6].clone(), lengths


@pytest.mark.slow
def test_both_stages_overfit_a_handful_of_sequences() -> None:
    torch.manual_seed(0)
    cfg = micro_config(d_model=64, attention_heads=4, moe_sigma=1.0, latent_noise=0.1)
    model = YAN(cfg).train()
    g = torch.Generator().manual_seed(0)
    tgt, mask, src, src_mask, lengths = _data(g)

    # stage 1: reconstruct the clean sequence (identity corruption keeps the test about learning)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ce1 = []
    for _ in range(60):
        out = stage1_loss(model, tgt, tgt, mask, Stage1Weights(mmd=0.1, scale=0.01), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ce1.append(out["ce"].item())
    assert ce1[-1] < ce1[0] / 100, ce1[::10]

    # stage 2: freeze the autoencoder, train only the flow
    for mod in (model.tok_emb, model.pos_emb, model.encoder, model.decoder):
        mod.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("flow.")}
    opt = torch.optim.AdamW(model.flow.parameters(), lr=1e-3)
    const = 0.5 * cfg.d_model * math.log(2 * math.pi * cfg.moe_sigma**2)
    nll, ce2 = [], []
    for _ in range(200):
        out = stage2_loss(model, src, src_mask, tgt, mask, Stage2Weights(ce=10.0), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        nll.append(out["nll"].item() - const)  # the L2 part, which can go to 0
        ce2.append(out["ce"].item())
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} moved during stage 2"
    late_ce, late_nll = sum(ce2[-10:]) / 10, sum(nll[-10:]) / 10
    assert late_ce < ce2[0] / 20, (ce2[0], late_ce)
    assert late_nll < nll[0] / 1.5, (nll[0], late_nll)

    # the trained flow maps each source to its target from fresh noise
    model.eval()
    reqs = [GenerationRequest(src[i, :6].tolist(), n, seed=100 + i) for i, n in enumerate(lengths)]
    gens = Sampler(model).generate(reqs, steps=4)
    hits = sum(
        a == b
        for i, gen in enumerate(gens)
        for a, b in zip(gen.tokens, tgt[i].tolist(), strict=False)  # strict=False: EOS may cut
    )
    total = sum(n - 1 for n in lengths)
    assert hits / total >= 0.9, [gen.tokens for gen in gens]
