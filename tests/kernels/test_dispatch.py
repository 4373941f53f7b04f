"""Every facade in `ops.KERNEL_OPS` reaches its Triton kernel when Triton is selected, and only
then: a facade that quietly ran its reference under "triton" would pass every kernel-vs-reference
test of the engine while the fast path stayed off. Two real workloads cover every op: a YAN
sample through the fused engine (fused linears, Triton attention, a sampled and a content row)
and through the graph sampler's body, and an AR decode through the Triton step (the Triton
interpreter off CUDA).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_dispatch.py
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")

from yan_kernels import ops

from tests.conftest import micro_config

# The workloads run on the CPU with the kernels in Triton's interpreter. On a CUDA machine CPU
# tensors would go to the references by design; there the `gpu`-marked dispatch tests
# (tests/engine, tests/kernels/test_ops.py) check the kernels are reached on the device.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter workloads on the CPU (CUDA machine)"
)

# op -> (its module in yan_kernels, the kernel's launcher, the reference)
KERNELS = {
    "routed_expert_euler": ("routed_expert", "routed_expert_euler", "routed_expert_euler_ref"),
    "decoder_argmax": ("decoder_argmax", "decoder_argmax", "decoder_argmax_ref"),
    "fused_linear": ("fused_linear", "fused_linear", "fused_linear_ref"),
    "decode_attention": ("decode_attention", "decode_attention", "decode_attention_ref"),
    "greedy_select": ("greedy_select", "greedy_select", "greedy_select_ref"),
    "gate_route": ("gate_route", "gate_route", "gate_route_ref"),
    "length_masks": ("length_masks", "length_masks", "length_masks_ref"),
    "add_layer_norm": ("layer_norm", "add_layer_norm", "add_layer_norm_ref"),
    "request_noise": ("noise", "request_noise", "request_noise_ref"),
    "attention": ("attention", "attention", "attention_ref"),
}


def test_the_table_names_every_kernel_op() -> None:
    assert set(KERNELS) == set(ops.KERNEL_OPS)


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts of ("kernel" | "ref", op) for every launcher and reference in KERNELS."""
    seen: Counter = Counter()
    for op, (module, kernel, ref) in KERNELS.items():
        m = importlib.import_module(f"yan_kernels.{module}")
        for kind, name in (("kernel", kernel), ("ref", ref)):
            fn = getattr(m, name)

            def spy(*a, _fn=fn, _key=(kind, op), **k):
                seen[_key] += 1
                return _fn(*a, **k)

            monkeypatch.setattr(m, name, spy)
    return seen


def _yan_sample() -> None:
    from yan_serve.engine.graphs import GraphSampler, Ladder
    from yan_serve.engine.sampler import GenerationRequest, Sampler
    from yan_serve.model import YAN

    torch.manual_seed(0)
    model = YAN(micro_config()).eval()
    s = Sampler(model, fused=True)
    s.engine.linears, s.engine.attention = "fused", "triton"
    reqs = [GenerationRequest([5, 6, 7], 6, seed=1), GenerationRequest([8, 9], 4, seed=2),
            GenerationRequest([10, 11, 12, 13], 5, seed=3, temperature=0.9),
            GenerationRequest([14], 3, seed=4, content=(0,))]  # fmt: skip
    s.generate(reqs, steps=3)
    # the graph body (EagerReplay off CUDA): masks and key biases from the packed lengths
    gs = GraphSampler(s)
    gs.capture(Ladder(batch_sizes=(4,), tgt_lengths=(8,), src_lengths=(8,), max_tokens=None,
                      steps=3, routings=("argmax",)))  # fmt: skip
    gs.generate(reqs[:2], 3, "argmax")
    assert gs.stats["graph"] == 1


def _ar_decode() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from yan_serve.ar.fused import FusedRunner
    from yan_serve.ar.generate import ARRequest, ar_generate

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    runner = FusedRunner(model, batch_sizes=(2,), lengths=(16,), step="triton")
    runner.capture()
    ar_generate(model, [ARRequest([5, 6, 7], 4), ARRequest([8], 3)], 2, 0, static=runner)


def _run_both() -> None:
    _yan_sample()
    _ar_decode()


def test_triton_reaches_every_kernel(calls: Counter) -> None:
    with ops.force("triton"):
        _run_both()
    missing = [op for op in KERNELS if calls["kernel", op] == 0]
    assert not missing, f"ran their reference under 'triton': {missing}"


def test_ref_runs_no_kernel(calls: Counter) -> None:
    with ops.force("ref"):
        _run_both()
    ran = [op for op in KERNELS if calls["kernel", op]]
    assert not ran, f"launched a kernel under 'ref': {ran}"
    assert calls["ref", "routed_expert_euler"] and calls["ref", "request_noise"]


@pytest.mark.parametrize("off", sorted(KERNELS))
def test_kernels_off_sets_aside_one_op(calls: Counter, monkeypatch, off: str) -> None:
    monkeypatch.setenv("YAN_KERNELS_OFF", off)
    with ops.force("triton"):
        _run_both()
    assert calls["kernel", off] == 0 and calls["ref", off] > 0, off
    other = "fused_linear" if off != "fused_linear" else "request_noise"
    assert calls["kernel", other] > 0
