"""Batch-independent YAN inference: requests in, tokens out.

Every request's random draws (its z_0, its expert draws and its token-sampling draws) come from
a counter-based generator (Philox) keyed by the request's `seed` and indexed by (position,
channel), generated on the model's device (`yan_kernels.ops.request_noise`: a Triton kernel on
CUDA, the same numbers from pure torch on the CPU). So a request's output depends neither on
which other requests share its batch nor on how long the batch is padded, and the same seed
gives the same draws on the CPU and the GPU (up to float rounding of the normals).

Two forward paths compute the same sample: the model's modules (the reference, and the CPU
path) and `FusedEngine` (packed weights, per-step constants and fused Triton kernels: the fast
path wherever the Triton kernels run). `Sampler(model, fused=...)` picks one; the default takes
the engine on CUDA when the Triton kernels are selected.

Decoding is greedy by default; a request with `temperature > 0` samples each position from the
tempered (optionally top-k) decoder distribution by inverse CDF with its own uniforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from yan_kernels import ops

from yan_serve.flow.solver import FrozenRoutingEuler, Routing, SolveResult
from yan_serve.model.yan import YAN

if TYPE_CHECKING:
    from yan_serve.engine.fused import FusedEngine

# The smallest temperature a sampled row runs at: logits divided by a smaller one overflow
# float32 (1e-40 is subnormal, and every logit / it is -inf), so a positive temperature below
# this is raised to it, which is greedy in effect. 0 stays greedy.
MIN_TEMPERATURE = 1e-4


def effective_temperature(temperature: float) -> float:
    """The temperature a request samples at: 0 (greedy) for t <= 0, else at least
    MIN_TEMPERATURE."""
    return 0.0 if temperature <= 0 else max(float(temperature), MIN_TEMPERATURE)


@dataclass
class GenerationRequest:
    src: Sequence[int]  # source token ids
    tgt_len: int  # number of target positions to generate (chosen by the caller, no oracle)
    seed: int = 0
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # with temperature > 0: sample among the k most likely tokens (0: all)
    # target positions that must hold a content token, not a special one (pad, EOS, BOS, mask):
    # the first position of each infill gap, so that no [MASK] comes back empty
    content: tuple[int, ...] = ()


@dataclass
class Generation:
    tokens: list[int]  # greedy tokens, cut before the first EOS
    finish_reason: str  # "eos" if an EOS was decoded, else "length"
    confidence: list[float]  # decoder probability of each kept token
    expert: list[int]  # frozen expert per target position
    previews: list[list[int]] | None = None  # tokens decoded at each of the T time points
    full: list[int] = field(default_factory=list)  # all tgt_len decoded tokens (EOS not cut)
    full_confidence: list[float] = field(default_factory=list)  # their decoder probabilities


@dataclass
class PreparedBatch:
    src: Tensor  # [B, Lx] long
    src_mask: Tensor  # [B, Lx] bool
    tgt_mask: Tensor  # [B, Ly] bool
    seed: Tensor  # [B] int64, each request's own
    temperature: Tensor  # [B]
    top_k: Tensor  # [B] long
    # where the batch was built from lengths on the device (a captured graph's input): the
    # additive key biases (0 / -inf) [B, Lx] / [B, Ly] in the model's dtype, and the target
    # lengths [B] long, so the solve need not derive them from the masks
    src_bias: Tensor | None = None
    tgt_bias: Tensor | None = None
    tgt_len: Tensor | None = None


@dataclass
class Noise:
    """A batch's random draws, zero past each request's target length."""

    z0: Tensor  # [B, Ly, d] in the model's dtype
    uniforms: Tensor  # [B, Ly] fp32 expert draws
    token_uniforms: Tensor  # [B, Ly] fp32 token-sampling draws


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # seeds are int64 (their bits key the generator)


def request_noise(
    seed: int, length: int, d: int, init_noise: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One request's draws on the CPU: z_0 [length, d] ~ N(0, init_noise^2 I), expert uniforms
    [length] and token-sampling uniforms [length] (the same numbers any batch gives it)."""
    from yan_kernels.noise import request_noise_ref

    z0, u, u_tok = request_noise_ref(
        torch.tensor([int(seed)]), torch.tensor([length]), length, d, init_noise, torch.float32
    )
    return z0[0], u[0], u_tok[0]


def fused_available(model: YAN) -> bool:
    """Whether the default is the fused engine: a CUDA model with the Triton kernels selected."""
    return ops.triton_selected(next(model.parameters()).device)


StepCallback = Callable[[int, Tensor], None]  # (time-point index, tokens [B, Ly]) per preview


class Sampler:
    """Encode once, solve the latent ODE with frozen routing, decode greedily, cut at EOS.

    `fused`: True runs the fused engine (`FusedEngine`), False the model's modules, None (the
    default) the engine where `fused_available` says so. The engine is never used while the
    model is in training mode (it has no dropout). `linears`: the engine's linear layers
    (`FusedEngine`'s modes)."""

    def __init__(
        self,
        model: YAN,
        solver: FrozenRoutingEuler | None = None,
        fused: bool | None = None,
        linears: str = "cublas",
    ) -> None:
        self.model = model
        self.solver = solver or FrozenRoutingEuler()
        self.fused = fused
        self.linears = linears
        self._engine: FusedEngine | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def engine(self) -> FusedEngine | None:
        """The fused engine when this sampler uses it (refreshed if the weights changed)."""
        use = self.fused if self.fused is not None else fused_available(self.model)
        if not use or self.model.training:
            return None
        if self._engine is None:
            from yan_serve.engine.fused import FusedEngine

            self._engine = FusedEngine(self.model, linears=self.linears)
        elif self._engine.stale():
            self._engine.refresh()
        return self._engine

    def validate(self, requests: Sequence[GenerationRequest], token_ids: bool = True) -> None:
        """Raise ValueError naming the first bad request field. `token_ids=False` leaves out
        the vocabulary range check of the source ids (a caller that checks them in bulk)."""
        if not requests:
            raise ValueError("no requests")
        cfg = self.model.config
        for r in requests:
            if len(r.src) == 0:
                raise ValueError("a request has an empty source")
            if r.tgt_len < 1:
                raise ValueError(f"tgt_len must be >= 1, got {r.tgt_len}")
            if r.temperature < 0 or r.top_k < 0:
                raise ValueError("temperature and top_k must be >= 0")
            if not SEED_MIN <= int(r.seed) <= SEED_MAX:
                raise ValueError(f"seed {r.seed} is outside the int64 range")
            if token_ids:
                lo, hi = min(r.src), max(r.src)
                if lo < 0 or hi >= cfg.vocab_size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"token id {bad} outside the vocabulary of {cfg.vocab_size}")
            self.model.check_length(len(r.src), "source")
            self.model.check_length(r.tgt_len, "target")

    def prepare(self, requests: Sequence[GenerationRequest]) -> PreparedBatch:
        """Validate, pad sources and targets to the batch maximum, move to the device."""
        self.validate(requests)
        cfg = self.model.config
        B, Lx, Ly = (
            len(requests),
            max(len(r.src) for r in requests),
            max(r.tgt_len for r in requests),
        )
        src = torch.full((B, Lx), cfg.pad_token_id, dtype=torch.long)
        src_len = torch.tensor([len(r.src) for r in requests])
        tgt_len = torch.tensor([r.tgt_len for r in requests])
        for i, r in enumerate(requests):
            src[i, : len(r.src)] = torch.as_tensor(list(r.src), dtype=torch.long)
        src_mask, tgt_mask = length_mask(src_len, Lx), length_mask(tgt_len, Ly)
        seed = torch.tensor([int(r.seed) for r in requests], dtype=torch.long)
        temperature = torch.tensor([effective_temperature(r.temperature) for r in requests])
        top_k = torch.tensor([int(r.top_k) for r in requests], dtype=torch.long)
        dev = self.device
        return PreparedBatch(
            src.to(dev), src_mask.to(dev), tgt_mask.to(dev), seed.to(dev), temperature.to(dev),
            top_k.to(dev),
        )  # fmt: skip

    def draw(self, batch: PreparedBatch) -> Noise:
        """Every request's draws, generated on the batch's device from its seed."""
        cfg = self.model.config
        dtype = next(self.model.parameters()).dtype
        length = batch.tgt_len if batch.tgt_len is not None else batch.tgt_mask.sum(1)
        z0, u, u_tok = ops.request_noise(
            batch.seed, length, batch.tgt_mask.shape[1], cfg.d_model, cfg.init_noise, dtype
        )
        return Noise(z0, u, u_tok)

    @torch.no_grad()
    def solve(
        self,
        batch: PreparedBatch,
        steps: int,
        routing: Routing = "sample",
        return_trajectory: bool = False,
        naive: bool = False,
        step_hook: Callable[[int, Tensor], None] | None = None,
        noise: Noise | None = None,
    ) -> SolveResult:
        """Latents at t = 1 for a prepared batch (`naive` uses the T-pass reference schedule,
        on the modules). `step_hook(i, z)` sees the state at every time point as soon as it is
        computed. `noise` defaults to the batch's own draws (`draw`)."""
        noise = noise if noise is not None else self.draw(batch)
        engine = None if naive or return_trajectory else self.engine
        if engine is not None:
            return engine.solve(
                batch.src, batch.src_mask, batch.tgt_mask, noise.z0, noise.uniforms, steps,
                routing, step_hook, src_bias=batch.src_bias, tgt_bias=batch.tgt_bias,
            )  # fmt: skip
        m = self.model
        cond = m.condition(m.encode(batch.src, batch.src_mask), batch.src_mask, batch.tgt_mask)
        if naive:
            return self.solver.solve_naive(m.flow, noise.z0, cond, steps, routing, noise.uniforms)
        return self.solver.solve(
            m.flow, noise.z0, cond, steps, routing, noise.uniforms, return_trajectory, step_hook
        )

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        steps: int | None = None,
        routing: Routing = "sample",
        return_previews: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[Generation]:
        """Generate every request in one batch; results are independent of the batching.

        `on_step(i, tokens)` is called with the greedy tokens decoded at each time point as soon
        as the solver reaches it (progressive previews for streaming)."""
        steps = self.model.config.ode_steps if steps is None else steps
        batch = self.prepare(requests)
        noise = self.draw(batch)
        want_traj = return_previews or on_step is not None
        previews: list[Tensor] = []

        def step_hook(i: int, z: Tensor) -> None:
            toks = self.decode(z)[0]
            previews.append(toks)
            if on_step is not None:
                on_step(i, toks)

        hook = step_hook if want_traj else None
        res = self.solve(batch, steps, routing, step_hook=hook, noise=noise)
        tokens, conf = self.decode(res.z, batch, noise)
        self.fill_content(res.z, requests, tokens, conf)
        return assemble(requests, tokens, conf, res.expert, self.model.config.eos_token_id,
                        previews if return_previews else None)  # fmt: skip

    @torch.no_grad()
    def score(
        self,
        requests: Sequence[GenerationRequest],
        targets: Sequence[Sequence[int]],
        steps: int | None = None,
        routing: Routing = "sample",
    ) -> list[list[float]]:
        """Decoder log-probability of each given target token, per position: the request's
        latent is generated as usual (`tgt_len` must equal the target's length), then scored.

        Requests that are the same (source, length, seed and sampling fields) have the same
        latent, so it is solved and decoded once and every target sharing it is read from the
        one [L, V] table: scoring K candidate labels costs one sample, not K."""
        if len(targets) != len(requests):
            raise ValueError("one target per request")
        for r, t in zip(requests, targets, strict=False):
            if len(t) != r.tgt_len:
                raise ValueError(f"target of {len(t)} tokens for tgt_len {r.tgt_len}")
        steps = self.model.config.ode_steps if steps is None else steps
        row: dict[tuple, int] = {}  # a distinct request -> its row in `unique`
        unique: list[GenerationRequest] = []
        which = []
        for r in requests:
            key = (tuple(r.src), r.tgt_len, r.seed, r.temperature, r.top_k)
            if key not in row:
                row[key] = len(unique)
                unique.append(r)
            which.append(row[key])
        batch = self.prepare(unique)
        z = self.solve(batch, steps, routing).z
        logp = torch.log_softmax(self.model.decode_logits(z).float(), dim=-1)
        out = []
        for i, t in zip(which, targets, strict=True):
            idx = torch.as_tensor(list(t), dtype=torch.long, device=logp.device)
            out.append(logp[i, torch.arange(len(t), device=logp.device), idx].tolist())
        return out

    def decode(
        self, z: Tensor, batch: PreparedBatch | None = None, noise: Noise | None = None
    ) -> tuple[Tensor, Tensor]:
        """z [B, L, d] -> (tokens [B, L], their decoder probabilities [B, L]) on the CPU.

        Greedy, except rows of `batch` with temperature > 0, which sample by inverse CDF from
        their own token uniforms (`noise`, drawn for the batch when not given; top-k restricted
        when top_k > 0)."""
        temps = [] if batch is None else batch.temperature.tolist()
        hot = [i for i, t in enumerate(temps) if t > 0]
        if hot and noise is None:
            assert batch is not None
            noise = self.draw(batch)
        engine = self.engine
        if engine is not None:  # fused lm_head + argmax: no [B, L, V] logits for greedy rows
            tok, best = engine.greedy(z)
            for i in hot:  # sampled rows: the reference draw (inverse CDF, top-k)
                tok[i], best[i] = self._sample_row(engine.logits(z[i]), batch, noise, i)
            return tok.cpu(), best.cpu()
        logits = self.model.decode_logits(z).float()
        tok, best = greedy_of(logits)
        for i in hot:
            tok[i], best[i] = self._sample_row(logits[i], batch, noise, i)
        return tok.cpu(), best.cpu()

    @torch.no_grad()
    def fill_content(
        self, z: Tensor, requests: Sequence[GenerationRequest], tokens: Tensor, conf: Tensor
    ) -> None:
        """Where a request's `content` position decoded to a special token, put the most likely
        content token there instead (in place in `tokens` / `conf`, host tensors [B, L]), with
        its probability under the full softmax: a position the model would rather leave empty
        reports a low confidence. Only those positions' logits are computed (z [B, L, d] is the
        latent the tokens were decoded from); each row's result depends on that row only."""
        cfg = self.model.config
        special = [cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.mask_token_id]
        rows, cols = [], []
        for i, r in enumerate(requests):
            for p in r.content:
                if 0 <= p < r.tgt_len and int(tokens[i, p]) in special:
                    rows.append(i)
                    cols.append(p)
        if not rows:
            return
        zz = z[torch.tensor(rows, device=z.device), torch.tensor(cols, device=z.device)]  # [K, d]
        engine = self.engine
        logits = engine.logits(zz) if engine is not None else self.model.decode_logits(zz).float()
        logp = torch.log_softmax(logits, dim=-1)  # over every token: the reported probability
        logp[:, special] = float("-inf")  # then the choice among content tokens
        best, tok = logp.max(-1)
        for k, (i, p) in enumerate(zip(rows, cols, strict=True)):
            tokens[i, p] = int(tok[k])
            conf[i, p] = float(best[k].exp())

    def greedy(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """`decode`'s greedy path kept on the device (no `.cpu()`, capturable): z [B, L, d] ->
        (tokens [B, L] long, probabilities [B, L] fp32)."""
        engine = self.engine
        if engine is not None:
            return engine.greedy(z)
        return greedy_of(self.model.decode_logits(z).float())

    @staticmethod
    def _sample_row(
        logits: Tensor, batch: PreparedBatch | None, noise: Noise | None, i: int
    ) -> tuple[Tensor, Tensor]:
        """Row i's sampled tokens [L] and their probabilities [L] from its logits [L, V]."""
        assert batch is not None and noise is not None
        tok = sample_tokens(
            logits, float(batch.temperature[i]), int(batch.top_k[i]), noise.token_uniforms[i]
        )
        prob = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1).exp()
        return tok, prob


def greedy_of(logits: Tensor) -> tuple[Tensor, Tensor]:
    """logits [..., V] -> (argmax [...] long, its softmax probability [...])."""
    best, tok = torch.log_softmax(logits, dim=-1).max(-1)
    return tok, best.exp()


def length_mask(length: Tensor, L: int) -> Tensor:
    """length [B] -> [B, L] bool, True on each row's first `length` positions."""
    return torch.arange(L, device=length.device)[None] < length[:, None]


def assemble(
    requests: Sequence[GenerationRequest],
    tokens: Tensor,  # [B, L] long, L >= every tgt_len
    conf: Tensor,  # [B, L]
    expert: Tensor,  # [B, L]
    eos: int,
    previews: list[Tensor] | None = None,  # T x [B, L]
) -> list[Generation]:
    """Per-request `Generation`s from decoded rows, cut at the first EOS. The cut is found for
    every row at once (numpy), and each row converts only its own `tgt_len` positions to Python
    lists, once each (a padded [64, 1024] batch: ~1 ms of host time less than converting whole
    tensors and then slicing the lists)."""
    n = len(requests)
    tok_np, conf_np, exp_np = (_host_array(t[:n]) for t in (tokens, conf, expert))
    lengths = np.array([r.tgt_len for r in requests], dtype=np.int64)
    cols = np.arange(tok_np.shape[1])
    is_eos = (tok_np == eos) & (cols[None, :] < lengths[:, None])
    cuts = np.where(is_eos.any(1), is_eos.argmax(1), lengths).tolist()
    prev_np = [_host_array(p[:n]) for p in previews] if previews else None
    out = []
    for i, (r, cut) in enumerate(zip(requests, cuts, strict=True)):
        L = r.tgt_len
        toks = tok_np[i, :L].tolist()
        probs = conf_np[i, :L].tolist()
        out.append(
            Generation(
                tokens=toks[:cut],
                finish_reason="eos" if cut < L else "length",
                confidence=probs[:cut],
                expert=exp_np[i, :L].tolist(),
                previews=[p[i, :L].tolist() for p in prev_np] if prev_np else None,
                full=toks,
                full_confidence=probs,
            )
        )
    return out


def _host_array(t: Tensor):
    """A tensor on the host as a numpy array (torch's own conversion for dtypes numpy lacks,
    e.g. bfloat16, through float32)."""
    t = t.detach().cpu()
    if t.dtype in (torch.float32, torch.float64, torch.int64, torch.int32, torch.bool):
        return t.numpy()
    return t.float().numpy() if t.is_floating_point() else t.long().numpy()


def sample_tokens(logits: Tensor, temperature: float, top_k: int, uniforms: Tensor) -> Tensor:
    """One token per row of logits [L, V] from softmax(logits / temperature), restricted to the
    top_k largest when top_k > 0, by inverse CDF with uniforms [L] in [0, 1)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)  # sorted, so ties break the same way everywhere
    else:
        vals, idx = logits, None
    probs = torch.softmax(vals / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True)
    pick = pick.clamp_max(vals.shape[-1] - 1).squeeze(-1)
    return pick if idx is None else idx.gather(-1, pick[:, None]).squeeze(-1)
