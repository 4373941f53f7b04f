"""`python -m yan_serve.bench versus`: YAN against a same-vocabulary AR model of matched size.

Pairs (random weights; latency does not depend on them): yan-paper vs the GPT-2-124M shape
(`ar-gpt2`, 185M parameters with the 128,258 vocabulary), yan-small vs ar-small, yan-tiny vs
ar-tiny; the AR model takes the YAN preset's vocabulary. Protocols, each at every batch size:

- `complete`: a 128-token prompt, 128 new tokens (YAN: source 128, target 128);
- `infill` (the paper's protocol): a 512-token passage; AR regenerates all 512 tokens after the
  passage + BOS (YAN: source 512, target 512);
- `fim` (fill-in-the-middle, the strong AR baseline): the same passage with 10% of its tokens
  masked in spans of 2; AR writes only the spans, each closed by <mask>, then EOS
  (51 + 26 + 1 = 78 tokens for 512); YAN does the same work as for `infill`.

AR rows decode every token of their budget (`ignore_eos`: a fixed amount of work). Columns:
YAN ms (CPU: `Sampler.generate` with the reference ops; CUDA: the fused engine replayed from a
CUDA graph), AR ms (the fused AR decoder, `FusedRunner`, with its decode step's body as
`--ar-steps` names it: eager torch ops, the same under torch.compile, or Triton GEMMs carrying
the norms, GELU and residual adds, optionally chained by programmatic dependent launch
(`triton+pdl`, sm_90 and newer); a pair's rows say `+compile` / `+triton`), AR ref ms (the
AR path before it: Hugging Face's runner on a CPU, the static-cache CUDA-graph runner on CUDA)
and its speed-up,
AR floor ms (a roofline, `ar_floor_ms`: per weight pass, the prefill and each decode step, the
larger of its bytes over the measured copy bandwidth and its flops over the measured matmul
rate; no launches), YAN/AR and
YAN/AR-floor (below 1: YAN is faster), and "same tok", the share of AR rows where the fused
decoder's tokens equal the reference's. Every time is the wall time of a whole call (host work
included), median of --iters after the warm-up calls (two on CUDA, one on a CPU).
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import torch

from yan_serve.bench.common import (
    DTYPES,
    bench_device,
    bench_model,
    choice_list,
    copy_bandwidth,
    euler_steps,
    finish,
    int_list,
    matmul_rate,
    print_header,
    random_requests,
    run_header,
    suite_parser,
    wall_timer,
)
from yan_serve.config import AR_PAIRS

PROTOCOLS = ("complete", "infill", "fim")
COMPLETE_PROMPT, COMPLETE_NEW, PASSAGE = 128, 128, 512
EOS, PAD, BOS = 2, 0, 1
ITERS = {"cuda": 10, "cpu": 3}  # timed calls per measurement by default


@dataclass
class VersusRow:
    pair: str
    protocol: str
    batch: int
    yan_ms: float
    ar_ms: float
    ar_ref_ms: float | None  # the AR path before the fused decoder (None: --no-ref)
    ar_floor_ms: float
    ar_prompt: int  # prompt tokens per AR row (BOS included)
    ar_new: int  # tokens each AR row decodes
    same_tokens: float | None  # share of rows where fused == reference tokens

    @property
    def yan_over_ar(self) -> float:
        return self.yan_ms / self.ar_ms

    @property
    def yan_over_floor(self) -> float:
        return self.yan_ms / self.ar_floor_ms


def fim_budget(length: int) -> int:
    """AR tokens for fill-in-the-middle on a `length`-token passage with 10% masked in spans of
    2: the masked tokens, one <mask> closing each span, and EOS."""
    masked = max(1, length // 10)
    return masked + (masked + 1) // 2 + 1


def protocol_shape(protocol: str) -> tuple[int, int, int]:
    """(YAN source = target length, AR prompt length with BOS, AR new tokens)."""
    if protocol == "complete":
        return COMPLETE_PROMPT, COMPLETE_PROMPT + 1, COMPLETE_NEW
    if protocol == "infill":
        return PASSAGE, PASSAGE + 1, PASSAGE
    if protocol == "fim":
        return PASSAGE, PASSAGE + 1, fim_budget(PASSAGE)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def ar_model(preset: str, vocab: int, device: str, dtype: torch.dtype):
    """A GPT-2 preset with random weights, the given vocabulary and room for 1025 slots."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from yan_serve.ar.model import AR_PRESETS

    cfg = GPT2Config(vocab_size=vocab, n_positions=2 * PASSAGE + 2, bos_token_id=BOS,
                     eos_token_id=EOS, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, **AR_PRESETS[preset])  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return GPT2LMHeadModel(cfg).to(dtype).eval()


def ar_floor_ms(model, batch: int, prompt: int, new: int, bw: float, rate: float) -> float:
    """The roofline floor of one generate call: each weight pass (the prefill, then each of the
    `new` - 1 decode steps) costs the larger of its bytes over the copy bandwidth `bw` and its
    flops over the matmul rate `rate`, and the passes add up.

    Bytes: every pass reads the weights once (the position table excepted: a row per token); the
    prefill writes the prompt's keys/values, each step reads the cache so far. Flops: 2 per
    block weight per token (QKV, out, MLP), 4 * d per token per layer and attended slot (QK and
    AV, causal in the prefill), 2 * d * V per token the head scores (the prefill's last position
    only). At batch 64 the prefill is compute-bound: a floor of bytes alone understates it."""
    cfg = model.config
    elt = next(model.parameters()).element_size()
    d, layers, vocab = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    weights = sum(p.numel() for p in model.parameters()) - cfg.n_positions * d
    block = sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)
    kv_per_slot = batch * layers * 2 * d * elt

    def cost(nbytes: float, flops: float) -> float:
        return max(nbytes / bw, flops / rate)

    total = cost(
        weights * elt + prompt * kv_per_slot,
        batch * (2 * block * prompt + 2 * layers * d * prompt * (prompt + 1) + 2 * d * vocab),
    )
    for t in range(new - 1):
        slots = prompt + t + 1
        total += cost(
            weights * elt + slots * kv_per_slot,
            batch * (2 * block + 4 * layers * d * slots + 2 * d * vocab),
        )
    return total * 1e3


def _ar_requests(vocab: int, batch: int, prompt: int, new: int):
    from yan_serve.ar.generate import ARRequest

    g = torch.Generator().manual_seed(batch * 7919 + prompt)
    return [ARRequest([*torch.randint(4, vocab, (prompt - 1,), generator=g).tolist(), BOS], new,
                      seed=i, ignore_eos=True) for i in range(batch)]  # fmt: skip


def _yan_timer(model, device: str, batch: int, length: int, steps: int, iters: int) -> float:
    from yan_kernels import ops

    from yan_serve.engine.sampler import Sampler

    reqs = random_requests(model.config, batch, length)
    timer = wall_timer(device)
    if device == "cuda":
        from yan_serve.engine.graphs import GraphSampler, Ladder

        graphs = GraphSampler(Sampler(model, fused=True))
        ladder = Ladder(batch_sizes=(batch,), tgt_lengths=(length,), max_tokens=None,
                        steps=steps, routings=("argmax",))  # fmt: skip
        with ops.force("triton"):
            graphs.capture(ladder)
            ms = timer(lambda: graphs.generate(reqs, steps, "argmax"), iters)
        del graphs
        torch.cuda.empty_cache()
        return ms
    sampler = Sampler(model)
    with ops.force("ref"):
        return timer(lambda: sampler.generate(reqs, steps, "argmax"), iters)


def ar_step_launches(model, step: str, length: int) -> int:
    """Kernel-launching operators of one greedy batch-1 decode step with body `step` ("torch" or
    "triton": inductor's kernels are not aten operators), counted on the CPU with the reference
    ops (`count_dispatched`: each fused op as its Triton launches):
    the launch proxy of what a GPU graph replays per token."""
    from yan_kernels import ops

    from yan_serve.ar.fused import FusedGPT2
    from yan_serve.engine.launches import count_dispatched

    f = FusedGPT2(model, 1, length, step=step)
    f.trim = False
    f.valid[:1, 0] = True
    run = f.fused_step_fn(1, length, False)
    with ops.force("ref"), torch.no_grad():
        run()  # the first call builds what later calls reuse
        return sum(count_dispatched(run).values())


def _pair_rows(yan_name: str, args: argparse.Namespace, device: str, dtype: torch.dtype,
               bw: float, rate: float, header: dict) -> list[VersusRow]:  # fmt: skip
    from yan_serve.ar.fused import FusedRunner
    from yan_serve.ar.generate import ar_generate
    from yan_serve.ar.static import StaticRunner

    ar_name = AR_PAIRS[yan_name]
    protocols = args.protocols or list(PROTOCOLS)
    batches = args.batches or ([1, 8, 64] if device == "cuda" else [1, 8])
    iters = args.iters or ITERS[device]
    timer = wall_timer(device)
    lengths = sorted({protocol_shape(p)[0] for p in protocols})
    yan, yan_label = bench_model(yan_name, lengths, device, dtype)
    steps = euler_steps(yan.config)
    ar = ar_model(ar_name, yan.config.vocab_size, device, dtype)
    n_yan = sum(p.numel() for p in yan.parameters())
    n_ar = sum(p.numel() for p in ar.parameters())
    slots = sorted({protocol_shape(p)[1] + protocol_shape(p)[2] for p in protocols})
    runners = {}
    for step in args.ar_steps:
        body, _, pdl = step.partition("+")  # "triton+pdl": programmatic dependent launch
        runners[step] = FusedRunner(ar, batch_sizes=tuple(batches), lengths=tuple(slots),
                                    step=body, pdl=bool(pdl))  # fmt: skip
        graphs, secs = runners[step].capture()
        print(f"pair: {yan_label}, {n_yan / 1e6:.1f}M parameters, T = {steps} vs {ar_name} "
              f"(vocabulary {yan.config.vocab_size}), {n_ar / 1e6:.1f}M parameters; fused AR "
              f"({step} step) windows: {graphs} captured in {secs:.1f} s", flush=True)  # fmt: skip
        if device == "cpu" and body != "compile" and not pdl:  # inductor's are not aten ops
            n = ar_step_launches(ar, body, slots[0])
            print(f"AR {step} step: {n} kernel launches per token at batch 1 (CPU proxy)")
    ref = None
    if device == "cuda" and not args.no_ref:
        ref = StaticRunner(ar, batch_sizes=tuple(batches), lengths=tuple(slots))
        ref.capture()
    header.setdefault("pairs", []).append(
        {"yan": yan_label, "yan_params": n_yan, "ar": ar_name, "ar_params": n_ar, "steps": steps}
    )
    rows = []
    for protocol in protocols:
        length, prompt, new = protocol_shape(protocol)
        for batch in batches:
            reqs = _ar_requests(yan.config.vocab_size, batch, prompt, new)
            yan_ms = _yan_timer(yan, device, batch, length, steps, iters)
            out: dict[str, list] = {}

            def run(key: str, static, out=out, reqs=reqs) -> None:
                out[key] = ar_generate(ar, reqs, EOS, PAD, static=static)

            ref_ms = None
            if not args.no_ref:
                ref_ms = timer(lambda: run("ref", ref), iters)
            for step, fused in runners.items():
                t0 = time.perf_counter()
                ar_ms = timer(lambda fused=fused: run("fused", fused), iters)
                same = None
                if ref_ms is not None:
                    pairs = zip(out["fused"], out["ref"], strict=True)
                    same = sum(a.tokens == b.tokens for a, b in pairs) / batch
                label = f"{yan_name}/{ar_name}" + ("" if step == "torch" else f"+{step}")
                floor = ar_floor_ms(ar, batch, prompt, new, bw, rate)
                r = VersusRow(label, protocol, batch, yan_ms, ar_ms, ref_ms, floor, prompt, new,
                              same)  # fmt: skip
                rows.append(r)
                print(_line(r) + f"   {step} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


COLUMNS = (
    f"{'protocol':<10}{'batch':>6}{'AR new':>8}{'YAN ms':>10}{'AR ms':>10}{'AR ref ms':>11}"
    f"{'AR speedup':>11}{'AR floor ms':>13}{'YAN/AR':>9}{'YAN/floor':>11}{'same tok':>10}"
)


def _line(r: VersusRow) -> str:
    ref = "-" if r.ar_ref_ms is None else f"{r.ar_ref_ms:.2f}"
    up = "-" if r.ar_ref_ms is None else f"{r.ar_ref_ms / r.ar_ms:.2f}x"
    same = "-" if r.same_tokens is None else f"{100 * r.same_tokens:.0f}%"
    return (f"{r.protocol:<10}{r.batch:>6}{r.ar_new:>8}{r.yan_ms:10.2f}{r.ar_ms:10.2f}{ref:>11}"
            f"{up:>11}{r.ar_floor_ms:13.3f}{r.yan_over_ar:9.3f}{r.yan_over_floor:11.3f}"
            f"{same:>10}")  # fmt: skip


def run_versus(args: argparse.Namespace) -> int:
    if (device := bench_device(args, "versus")) is None:
        return 2
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # HF's reference runner
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    bw = copy_bandwidth(10 if device == "cuda" else 5, device)
    rate = matmul_rate(DTYPES[dtype_name], 10 if device == "cuda" else 3, device)
    header = {**run_header(device), "dtype": dtype_name, "copy_GBps": round(bw / 1e9, 1),
              "matmul_TFLOPs": round(rate / 1e12, 2),
              "ar_steps": ",".join(args.ar_steps)}  # fmt: skip
    print_header(header)
    rows: list[VersusRow] = []
    for i, name in enumerate(args.pairs or (["yan-paper"] if device == "cuda" else ["yan-tiny"])):
        if i:
            print()
        rows += _pair_rows(name, args, device, DTYPES[dtype_name], bw, rate, header)
    print(COLUMNS)
    for r in rows:
        print(f"{r.pair}  " + _line(r))
    return finish(
        args,
        header,
        rows,
        "YAN ms / AR ms: whole generate calls (CPU: YAN reference ops; CUDA: YAN graph-replayed\n"
        "fused engine). AR: the fused decoder; AR ref: the path before it (CPU: Hugging Face,\n"
        "CUDA: static-cache graphs); AR speedup = ref / fused. AR floor: per weight pass the\n"
        "larger of its bytes over the copy rate and its flops over the matmul rate, summed.\n"
        "YAN/AR and YAN/floor below 1: YAN faster. same tok: rows\n"
        "whose fused tokens equal the reference's.",
    )


def _pair_list(text: str) -> list[str]:
    return choice_list(text, list(AR_PAIRS), "YAN preset")


def _step_list(text: str) -> list[str]:
    from yan_serve.ar.fused import STEPS

    # "+pdl": the Triton step's kernels chained by programmatic dependent launch (sm_90+)
    return choice_list(text, [*STEPS, "triton+pdl"], "AR step")


def _protocol_list(text: str) -> list[str]:
    return choice_list(text, PROTOCOLS, "protocol")


def add_versus(sub: argparse._SubParsersAction) -> None:
    p = suite_parser(sub, "versus", "YAN vs a same-size, same-vocabulary AR: ms and AR floor",
                     run_versus, (ITERS["cuda"], ITERS["cpu"]))  # fmt: skip
    p.add_argument("--pairs", type=_pair_list,
                   help="YAN presets, each against its AR match (default: yan-paper on CUDA, "
                        "yan-tiny on CPU; also yan-small)")  # fmt: skip
    p.add_argument("--protocols", type=_protocol_list, help="default complete,infill,fim")
    p.add_argument("--batches", type=int_list, help="default 1,8,64 (CPU: 1,8)")
    p.add_argument("--ar-steps", type=_step_list, default=["torch"],
                   help="the fused AR decode step's body, one row set each: torch (default),"
                        " compile (torch.compile), triton (fused-linear Triton GEMMs),"
                        " triton+pdl (those with programmatic dependent launch, sm_90+);"
                        " e.g. torch,compile,triton")  # fmt: skip
    p.add_argument("--no-ref", action="store_true", help="skip the AR reference path")
