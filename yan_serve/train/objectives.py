"""The training objectives of YAN: the two stage losses as functions of a model and a batch,
and `YANObjective`, a stage as the trainer's `Objective`.

Stage 1 trains the latent autoencoder (embeddings, encoder, decoder); stage 2 trains the flow
(trunk, experts, gate) on the frozen autoencoder's latents, with a CE term through the unrolled
frozen-routing Euler solve; fine-tuning is stage 2's loss on the task mixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from yan_serve.flow.losses import (
    distill_mse,
    gate_entropy,
    load_balance_kl,
    mmd2,
    moe_fm_nll,
    scale_loss,
    token_ce,
)
from yan_serve.flow.path import LinearPath
from yan_serve.flow.solver import FrozenRoutingEuler, Routing
from yan_serve.model.yan import YAN
from yan_serve.tasks.corpus import Corpus, label_table
from yan_serve.tasks.formats import INFILL_RATE, TASKS
from yan_serve.tokenizer import YANTokenizer
from yan_serve.train.data import Batch
from yan_serve.train.recipes import stage_batches
from yan_serve.train.trainer import Objective
from yan_serve.weights import from_pretrained, save_labels, save_pretrained

STAGES = ("stage1", "stage2", "finetune")
LATENT_NOISE = ("none", "target", "both")  # `Stage2Weights.latent_noise`


def check_latent_noise(mode: str) -> None:
    if mode not in LATENT_NOISE:
        raise ValueError(f"latent_noise must be one of {', '.join(LATENT_NOISE)}, got {mode!r}")


@dataclass
class Stage1Weights:
    ce: float = 1.0
    mmd: float = 1.0
    scale: float = 0.01
    mmd_samples: int = 512  # the paper allows up to 2000; 512 keeps the O(N^2) kernel cheap on CPU


@dataclass
class Stage2Weights:
    fm: float = 1.0  # MoE-FM NLL
    ce: float = 1.0  # CE of D(z1_hat): essential, the NLL alone lands on wrong tokens
    entropy: float = 0.0  # gate entropy bonus (subtracted)
    balance: float = 0.0  # KL(mean gate || uniform)
    distill: float = 0.0  # ||z1_hat - z1||^2
    focus: float = 1.0  # CE weight of a task's focus positions against the others (1: uniform)
    # the encoder's training latent noise u * N(0, I), u ~ U(0, latent_noise) per sequence, on
    # the target latents z1 = E(y) ("target") or on them and the encoded source ("both"), as the
    # method's reference adds it whenever it encodes in training; "none" (ours): z1 is a
    # noise-free regression target, the latents the decoder reads at serving
    latent_noise: str = "none"

    def __post_init__(self) -> None:
        if not self.focus > 0:
            raise ValueError(f"the focus CE weight must be positive, got {self.focus}")
        check_latent_noise(self.latent_noise)


def stage1_loss(
    model: YAN,
    corrupted: Tensor,  # [B, L] corrupted tokens, right-padded with <pad> to the target length
    targets: Tensor,  # [B, L] clean tokens, position-aligned with `corrupted`
    mask: Tensor,  # [B, L] bool, the target's valid positions
    weights: Stage1Weights | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Regularized denoising autoencoder: CE(D(E(corrupt(y))), y) + MMD^2(z, N(0, I)) + mean z^2.

    The encoder reads the corrupted sequence over the target's positions (a collapsed mask span
    leaves <pad> slots at the tail), adds training latent noise, and the decoder must recover the
    clean token at every target position. Returns the weighted `loss` and each term.
    """
    w = weights or Stage1Weights()
    z = model.encode(corrupted, mask, add_noise=model.training, generator=generator)
    ce = token_ce(model.decode_logits(z), targets, mask)
    terms = {"ce": ce}
    loss = w.ce * ce
    if w.mmd:
        terms["mmd"] = mmd2(z[mask].float(), max_samples=w.mmd_samples, generator=generator)
        loss = loss + w.mmd * terms["mmd"]
    if w.scale:
        terms["scale"] = scale_loss(z, mask)
        loss = loss + w.scale * terms["scale"]
    terms["loss"] = loss
    return terms


@dataclass
class Stage2Draws:
    """The random draws of one stage-2 step, all on the batch's device: latent noise
    N(0, I) [B, Ly, d] (before `init_noise` and the target mask), one time per sequence t [B],
    routing uniforms [B, Ly]; with `Stage2Weights.latent_noise`, the encoder's training noise
    u * N(0, I) added to the target latents [B, Ly, d] and to the encoded source [B, Lx, d]
    (None: not added)."""

    noise: Tensor
    t: Tensor
    uniforms: Tensor
    tgt_latent: Tensor | None = None
    src_latent: Tensor | None = None


def _latent_noise(model: YAN, shape: torch.Size, generator: torch.Generator | None,
                  gdev: torch.device, dev: torch.device) -> Tensor:  # fmt: skip
    """The encoder's training noise (`Encoder.forward` with `add_noise`): u * N(0, I) with one
    u ~ U(0, latent_noise) per sequence."""
    B = shape[0]
    u = torch.rand((B, 1, 1), generator=generator, device=gdev) * model.config.latent_noise
    eps = torch.randn(shape, generator=generator, device=gdev)
    return (u * eps).to(dev)


def stage2_draws(
    model: YAN,
    tgt: Tensor,
    generator: torch.Generator | None = None,
    latent_noise: str = "none",
    src: Tensor | None = None,  # latent_noise "both": the source, whose encoding gets noise too
) -> Stage2Draws:
    """`stage2_loss`'s draws from `generator`, in the order it takes them itself. The latent
    noise (`Stage2Weights.latent_noise`) is drawn after the rest, so that "none" takes exactly
    the draws it always took."""
    check_latent_noise(latent_noise)
    cfg = model.config
    dev = tgt.device
    gdev = generator.device if generator is not None else dev
    B, Ly = tgt.shape
    noise = torch.randn((B, Ly, cfg.d_model), generator=generator, device=gdev).to(dev)
    t = LinearPath(cfg.beta_a, cfg.beta_b).sample_t(B, dev, generator)
    uniforms = torch.rand(tgt.shape, generator=generator, device=gdev).to(dev)
    draws = Stage2Draws(noise, t, uniforms)
    if latent_noise != "none":
        draws.tgt_latent = _latent_noise(model, noise.shape, generator, gdev, dev)
    if latent_noise == "both":
        if src is None:
            raise ValueError('latent_noise "both" needs the source to draw its noise for')
        shape = torch.Size((src.shape[0], src.shape[1], cfg.d_model))
        draws.src_latent = _latent_noise(model, shape, generator, gdev, dev)
    return draws


def stage2_loss(
    model: YAN,
    src: Tensor,  # [B, Lx]
    src_mask: Tensor,  # [B, Lx] bool
    tgt: Tensor,  # [B, Ly]
    tgt_mask: Tensor,  # [B, Ly] bool
    weights: Stage2Weights | None = None,
    steps: int | None = None,
    routing: Routing = "sample",
    freeze_autoencoder: bool = True,
    generator: torch.Generator | None = None,
    focus: Tensor | None = None,  # [B, Ly] bool: the positions the task asks for
    draws: Stage2Draws | None = None,  # given: `generator` is not used
) -> dict[str, Tensor]:
    """MoE-FM NLL at a random time on the linear path + CE through the unrolled Euler solve.

    z_1 = E(y), z_0 ~ N(0, init_noise^2 I), t ~ Beta(a, b) per sequence. By default z_1 and the
    encoded source carry no latent noise; `weights.latent_noise` adds the encoder's training
    noise to z_1 ("target") or to both ("both") in training mode, drawn with the rest. The
    solve from the same z_0 uses `steps` time points (default `train_ode_steps`) with experts
    drawn once from pi(z_0, 0); gradients flow through every Euler step into the trunk, the
    experts and (through the NLL) the gate.

    `weights.focus` != 1 reweights the CE at the `focus` positions (`Example.focus`: an infill
    batch's spans, a QA batch's answers): they are a few percent of such a target, the rest is a
    copy of the source, so under the uniform CE the copy dominates what the flow is taught.
    """
    cfg = model.config
    w = weights or Stage2Weights()
    steps = cfg.train_ode_steps if steps is None else steps
    if draws is None:
        noise = w.latent_noise if model.training else "none"  # validation: noise-free, as stage 1
        draws = stage2_draws(model, tgt, generator, noise, src)
    frozen = torch.no_grad() if freeze_autoencoder else contextlib.nullcontext()
    with frozen:
        src_h = model.encode(src, src_mask)
        z1 = model.encode(tgt, tgt_mask)
    # the encoder's training noise, masked as `Encoder.forward` masks its output
    if draws.src_latent is not None:
        src_h = src_h + draws.src_latent.to(src_h.dtype) * src_mask[..., None].to(src_h.dtype)
    if draws.tgt_latent is not None:
        z1 = z1 + draws.tgt_latent.to(z1.dtype) * tgt_mask[..., None].to(z1.dtype)
    cond = model.condition(src_h, src_mask, tgt_mask)
    m = tgt_mask[..., None].to(z1.dtype)

    z0 = draws.noise.to(z1.dtype) * cfg.init_noise * m
    ps = LinearPath(cfg.beta_a, cfg.beta_b).sample(z0, z1, draws.t)

    state = model.flow.trunk(ps.x_t, draws.t, cond)
    logits = model.flow.gate_logits(state)
    nll = moe_fm_nll(model.flow.expert_fields(state), logits, ps.dx_t, tgt_mask, cfg.moe_sigma)

    z1_hat = FrozenRoutingEuler().solve(model.flow, z0, cond, steps, routing, draws.uniforms).z
    ce_weight = None
    if focus is not None and w.focus != 1.0:
        ce_weight = 1.0 + (w.focus - 1.0) * focus.to(torch.float32)
    ce = token_ce(model.decode_logits(z1_hat), tgt, tgt_mask, ce_weight)

    terms = {"nll": nll, "ce": ce}
    loss = w.fm * nll + w.ce * ce
    if w.entropy:
        terms["entropy"] = gate_entropy(logits, tgt_mask)
        loss = loss - w.entropy * terms["entropy"]
    if w.balance:
        terms["balance"] = load_balance_kl(logits, tgt_mask)
        loss = loss + w.balance * terms["balance"]
    if w.distill:
        terms["distill"] = distill_mse(z1_hat, z1, tgt_mask)
        loss = loss + w.distill * terms["distill"]
    terms["loss"] = loss
    return terms


@dataclass
class StageConfig:
    """The YAN part of a run: the stage, its loss weights and what it trains on."""

    stage: str
    stage1: Stage1Weights = field(default_factory=Stage1Weights)
    stage2: Stage2Weights = field(default_factory=Stage2Weights)
    freeze_autoencoder: bool = True  # stage 2 and fine-tuning train only the flow
    # the fine-tuning mixture, one task per batch; a task named w times takes w of each round
    tasks: tuple[str, ...] = TASKS
    slack: float = 0.5  # fine-tuning: the share of targets given serving length slack
    infill_rate: tuple[float, float] = INFILL_RATE  # stage 2 / fine-tuning: masked share range

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")


def _stage_parts(model: YAN, spec: StageConfig) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the modules a stage trains, those it keeps frozen)."""
    if spec.stage == "stage1":
        return [model.tok_emb, model.pos_emb, model.encoder, model.decoder], [model.flow]
    if spec.freeze_autoencoder:
        return [model.flow], [model.tok_emb, model.pos_emb, model.encoder, model.decoder]
    return [model], []


def frozen_modules(model: YAN, spec: StageConfig) -> list[nn.Module]:
    """The modules `spec`'s stage does not train: they run in eval mode (`YANObjective.train`)."""
    return _stage_parts(model, spec)[1]


def trainable_parameters(model: YAN, spec: StageConfig) -> list[nn.Parameter]:
    """Stage 1: embeddings + encoder + decoder. Stage 2 / fine-tune: the flow (unless unfrozen)."""
    train, frozen = _stage_parts(model, spec)
    for m in frozen:
        m.requires_grad_(False)
    for m in train:
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class YANObjective(Objective):
    """A YAN stage for the trainer: stage 1 on corrupted text, stage 2 on infilling, fine-tuning
    on the task mixture (`recipes.stage_batches`). Checkpoints are YAN directories
    (`save_pretrained`), with the corpus's label table when the run trains classification.
    Without a corpus the trainer must be given its batches."""

    def __init__(
        self, model: YAN, tokenizer: YANTokenizer, spec: StageConfig, corpus: Corpus | None = None
    ) -> None:
        super().__init__(model)
        self.tokenizer = tokenizer
        self.spec = spec
        self.corpus = corpus
        self.name = spec.stage
        self.default_lr = 1e-5 if spec.stage == "finetune" else 1e-4
        self.tasks = {"stage1": (), "stage2": ("infill",)}.get(spec.stage, spec.tasks)
        self._compiled: Any = None  # stage2_loss under torch.compile (`compile_loss`)

    def trainable(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, self.spec)

    def train(self, mode: bool = True) -> YANObjective:
        """Train mode for what the stage trains; what it keeps frozen stays in eval mode (no
        dropout), whatever mode the trainer sets: stage 2's targets z1 = E(y) and the decoder
        its CE reads are then the deterministic functions serving runs, not dropout-noised."""
        super().train(mode)
        for m in frozen_modules(self.model, self.spec):
            m.eval()
        return self

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        if self.corpus is None:
            raise ValueError(f"{self.name}: no corpus to draw {split} batches from")
        s = self.spec
        return stage_batches(s.stage, self.corpus, self.tokenizer, self.model, split, batch_size,
                             seed, s.tasks, s.slack, s.infill_rate)  # fmt: skip

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        s, b = self.spec, batch
        if s.stage == "stage1":
            return stage1_loss(self.model, b.src, b.tgt, b.tgt_mask, s.stage1, generator)
        # the draws stay eager (they take the trainer's generator); the rest may be compiled.
        # The latent noise is a training draw: validation (eval mode) encodes without it
        noise = s.stage2.latent_noise if self.training else "none"
        draws = stage2_draws(self.model, b.tgt, generator, noise, b.src)
        return (self._compiled or stage2_loss)(
            self.model, b.src, b.src_mask, b.tgt, b.tgt_mask, s.stage2,
            freeze_autoencoder=s.freeze_autoencoder, focus=b.focus, draws=draws,
        )  # fmt: skip

    def compile_loss(self) -> bool:
        """Run stage 2's loss (stage 2 and fine-tuning) under `torch.compile` with dynamic
        shapes (batches differ in length): the step's ~2,000 small operators become a few
        fused kernels, which is what a launch-bound GPU step needs. The routed experts take
        their dense form there (no data-dependent shapes). Stage 1 stays eager (False)."""
        if self.spec.stage == "stage1":
            return False
        self._compiled = torch.compile(stage2_loss, dynamic=True)
        return True

    def target_tokens(self, batch: Batch) -> int:
        return int(batch.tgt_mask.sum())

    def save(self, out: Path, step: int) -> None:
        save_pretrained(self.model, out, self.tokenizer, {"stage": self.name, "step": str(step)})
        if "classify" in self.tasks and self.corpus is not None:  # the server's label table
            save_labels(out, label_table(self.corpus))

    def load(self, out: Path, device: torch.device) -> None:
        self.model.load_state_dict(from_pretrained(out, device=device).state_dict())

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.spec).items() if k != "stage"}
