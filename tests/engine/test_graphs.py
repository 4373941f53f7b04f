"""The graph sampler: ladder shapes, bucket choice, padding, and equality with the eager sampler.

On CPU, `GraphSampler` runs with `EagerReplay` in place of CUDA graphs: the same static buffers,
padding and read-back as on the GPU, with the captured function called eagerly. The `gpu` tests
capture real CUDA graphs and hold them to the eager sampler token for token.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/engine/test_graphs.py
"""

from __future__ import annotations

import pytest
import torch

from yan_serve.config import YANConfig
from yan_serve.engine.graphs import (
    EagerReplay,
    GraphSampler,
    GraphShape,
    Ladder,
    length_buckets,
    pack_inputs,
    packed_size,
    pick_shape,
    unpack_inputs,
)
from yan_serve.engine.sampler import GenerationRequest, Sampler
from yan_serve.model import YAN


def _requests(
    n: int, seed: int, max_src: int = 30, max_tgt: int = 34, sampled: bool = False
) -> list[GenerationRequest]:
    """Mixed source / target lengths and seeds; with `sampled`, every third row has a
    temperature (some with top-k)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lx = int(torch.randint(1, max_src + 1, (1,), generator=g))
        ly = int(torch.randint(1, max_tgt + 1, (1,), generator=g))
        src = torch.randint(4, 61, (lx,), generator=g).tolist()
        hot = sampled and i % 3 == 0
        out.append(
            GenerationRequest(
                src, ly, seed=500 + i, temperature=1.3 if hot else 0.0, top_k=4 if i % 2 else 0
            )
        )
    return out


def _assert_same_tokens(graph, eager) -> None:
    """Tokens, experts and EOS cut equal; confidences equal to rounding (padding changes matmul
    shapes, hence the last float bits, as batching does for the eager sampler)."""
    assert len(graph) == len(eager)
    for g, e in zip(graph, eager, strict=True):
        assert g.full == e.full
        assert g.expert == e.expert
        assert (g.tokens, g.finish_reason) == (e.tokens, e.finish_reason)
        assert g.full_confidence == pytest.approx(e.full_confidence, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------- pure logic
def test_length_buckets_are_powers_of_two_clamped_to_max_length() -> None:
    assert length_buckets(256) == (16, 32, 64, 128, 256)
    assert length_buckets(40) == (16, 32, 40)
    assert length_buckets(16) == (16,)
    assert length_buckets(10) == (10,)
    assert length_buckets(2048)[-2:] == (1024, 2048)
    with pytest.raises(ValueError):
        length_buckets(0)


def test_ladder_is_the_grid_under_the_token_limit_largest_first() -> None:
    shapes = Ladder(batch_sizes=(1, 4), max_tokens=64).shapes(40)
    want = {
        GraphShape(b, ly, lx)
        for b in (1, 4)
        for ly in (16, 32, 40)
        for lx in (16, 32, 40)
        if b * max(ly, lx) <= 64
    }
    assert set(shapes) == want and len(shapes) == len(want) == 9 + 1
    costs = [s.cost for s in shapes]
    assert costs == sorted(costs, reverse=True)
    assert shapes[0] == GraphShape(4, 16, 16) and shapes[-1] == GraphShape(1, 16, 16)
    # explicit source buckets, no token limit
    shapes = Ladder(batch_sizes=(2,), tgt_lengths=(8,), src_lengths=(16, 32), max_tokens=None)
    assert set(shapes.shapes(40)) == {GraphShape(2, 8, 16), GraphShape(2, 8, 32)}


@pytest.mark.parametrize(
    "bad, match",
    [
        (Ladder(tgt_lengths=(64,)), "max_length"),
        (Ladder(src_lengths=(16, 41)), "max_length"),
        (Ladder(batch_sizes=(0, 1)), "batch size"),
        (Ladder(routings=("top1",)), "routing"),  # type: ignore[arg-type]
    ],
)
def test_ladder_rejects_what_cannot_be_captured(bad: Ladder, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bad.shapes(40)


def test_pick_shape_takes_the_cheapest_fit() -> None:
    shapes = Ladder(batch_sizes=(1, 2, 4, 8), max_tokens=None).shapes(40)
    assert pick_shape(shapes, 1, 1, 1) == GraphShape(1, 16, 16)
    assert pick_shape(shapes, 3, 16, 17) == GraphShape(4, 16, 32)
    assert pick_shape(shapes, 5, 33, 2) == GraphShape(8, 40, 16)
    assert pick_shape(shapes, 8, 40, 40) == GraphShape(8, 40, 40)
    assert pick_shape(shapes, 9, 1, 1) is None  # more rows than any shape
    assert pick_shape(shapes, 1, 41, 1) is None
    assert pick_shape(shapes, 1, 1, 41) is None
    assert pick_shape([], 1, 1, 1) is None
    # cost, not the first fit: a wider batch with shorter rows can be cheaper
    odd = [GraphShape(2, 64, 64), GraphShape(4, 16, 16)]
    assert pick_shape(odd, 2, 10, 10) == GraphShape(4, 16, 16)


def test_pack_inputs_keeps_real_rows_and_adds_one_token_padding_rows(micro_model: YAN) -> None:
    """The packed input unpacks to the eager batch (real rows) plus padding rows of one source
    token and one target position; every element of a stale buffer is overwritten."""
    s = Sampler(micro_model)
    reqs = _requests(3, seed=1, sampled=True)
    batch = s.prepare(reqs)
    n, lx = batch.src.shape
    ly = batch.tgt_mask.shape[1]
    shape = GraphShape(5, ly + 3, lx + 2)
    pad = micro_model.config.pad_token_id
    fresh = pack_inputs(reqs, shape, pad, torch.empty(packed_size(shape) + 9, dtype=torch.long))
    stale = torch.full((packed_size(shape),), 7, dtype=torch.long)
    again = pack_inputs(reqs, shape, pad, stale)
    assert torch.equal(fresh, again) and fresh.numel() == packed_size(shape)
    p = unpack_inputs(again, shape)
    assert p.src.shape == (5, lx + 2) and p.tgt_mask.shape == (5, ly + 3)
    assert torch.equal(p.src[:n, :lx], batch.src) and (p.src[:n, lx:] == pad).all()
    assert torch.equal(p.src_mask[:n, :lx], batch.src_mask) and not p.src_mask[:n, lx:].any()
    assert torch.equal(p.tgt_mask[:n, :ly], batch.tgt_mask) and not p.tgt_mask[:n, ly:].any()
    assert torch.equal(p.seed[:n], batch.seed)
    # padding rows: one pad source token, one target position, seed 0, greedy
    assert (p.src[n:] == pad).all()
    assert p.src_mask[n:].sum(1).tolist() == [1, 1] and p.src_mask[n:, 0].all()
    assert p.tgt_mask[n:].sum(1).tolist() == [1, 1] and p.tgt_mask[n:, 0].all()
    assert (p.seed[n:] == 0).all() and (p.temperature == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        pack_inputs(reqs, GraphShape(n - 1, ly, lx), pad, stale)
    with pytest.raises(ValueError, match="does not fit"):
        pack_inputs(reqs, GraphShape(n, ly - 1, lx), pad, stale)
    with pytest.raises(ValueError, match="does not fit"):
        pack_inputs(reqs, GraphShape(n, ly, lx - 1), pad, stale)


# ------------------------------------------------------- the padded path on CPU (eager replay)
@pytest.fixture
def graphs(micro_model: YAN) -> GraphSampler:
    gs = GraphSampler(Sampler(micro_model))
    assert not gs.cuda_graphs  # CPU: EagerReplay stands in for CUDA graphs
    gs.capture(Ladder(batch_sizes=(1, 4, 8), max_tokens=None, steps=3))
    return gs


@pytest.mark.parametrize("routing", ["argmax", "sample"])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_padded_path_gives_the_eager_samplers_tokens(
    graphs: GraphSampler, micro_model: YAN, routing: str, n: int
) -> None:
    reqs = _requests(n, seed=10 + n, sampled=True)
    assert graphs.plan(reqs, 3, routing) is not None
    out = graphs.generate(reqs, steps=3, routing=routing)
    assert graphs.stats == {"graph": 1, "eager": 0}
    _assert_same_tokens(out, Sampler(micro_model).generate(reqs, steps=3, routing=routing))


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("linears", ["cublas", "fused"])
def test_padded_path_through_the_fused_engine(micro_model: YAN, backend: str, linears: str) -> None:
    """The graph body as a GPU runs it: the fused engine, fed the masks and key biases that
    `ops.length_masks` builds from the packed lengths (the kernel in the interpreter with
    `triton`), on padded batches: the eager sampler's tokens."""
    pytest.importorskip("triton")
    from yan_kernels import ops

    with ops.force(backend):
        gs = GraphSampler(Sampler(micro_model, fused=True, linears=linears))
        gs.capture(Ladder(batch_sizes=(4,), tgt_lengths=(32,), src_lengths=(32,), max_tokens=None,
                          steps=3, routings=("argmax",)))  # fmt: skip
        for seed in (40, 41):
            reqs = _requests(3, seed=seed, max_src=30, max_tgt=30)
            out = gs.generate(reqs, 3, "argmax")
            eager = Sampler(micro_model, fused=True, linears=linears).generate(reqs, 3, "argmax")
            _assert_same_tokens(out, eager)
        assert gs.stats["graph"] == 2


def test_a_batch_that_fills_its_shape_is_bitwise_eager(
    graphs: GraphSampler, micro_model: YAN
) -> None:
    """No padding at all (4 rows, longest target 16, longest source 16): identical tensors go
    through identical code, so every float matches."""
    reqs = _requests(4, seed=20, max_src=16, max_tgt=16, sampled=True)
    reqs[0].src, reqs[1].tgt_len = [5] * 16, 16
    assert graphs.plan(reqs, 3, "sample") == GraphShape(4, 16, 16)
    assert graphs.generate(reqs, steps=3) == Sampler(micro_model).generate(reqs, steps=3)


def test_static_buffers_shared_across_shapes_leave_no_trace(
    graphs: GraphSampler, micro_model: YAN
) -> None:
    """Shapes view prefixes of the same flat buffers: a small batch after a large one, and the
    same graph replayed for different batches, still give the eager tokens."""
    eager = Sampler(micro_model)
    big = _requests(8, seed=30, max_src=40, max_tgt=40)
    small = _requests(2, seed=31, max_src=10, max_tgt=10)
    other = _requests(2, seed=32, max_src=10, max_tgt=10)
    assert graphs.plan(big, 3, "argmax") == GraphShape(8, 40, 40)
    assert graphs.plan(small, 3, "argmax") == graphs.plan(other, 3, "argmax")
    for reqs in (big, small, other, small):
        _assert_same_tokens(graphs.generate(reqs, 3, "argmax"), eager.generate(reqs, 3, "argmax"))
    assert graphs.stats["graph"] == 4


def test_replays_reuse_the_captured_graphs(micro_model: YAN) -> None:
    made = []

    def counting(fn):
        made.append(fn)
        return EagerReplay(fn)

    gs = GraphSampler(Sampler(micro_model), capturer=counting)
    ladder = Ladder(batch_sizes=(2, 4), tgt_lengths=(16, 40), src_lengths=(40,), steps=2)
    report = gs.capture(ladder)
    assert report.graphs == len(made) == gs.captures == 2 * 2 * 2  # batches x targets x routing
    assert report.buffer_bytes > 0
    reqs = _requests(3, seed=40)
    for _ in range(3):
        gs.generate(reqs, steps=2, routing="argmax")
    assert gs.captures == len(made) == 8 and gs.stats == {"graph": 3, "eager": 0}
    assert gs.capture(ladder).graphs == 0 and len(made) == 8  # nothing new to capture
    (entry,) = [e for e in gs._entries[(2, "argmax")] if e.replays]
    assert entry.replays == 3 and entry.shape == gs.plan(reqs, 2, "argmax")


def test_outside_the_ladder_runs_the_eager_sampler(micro_model: YAN) -> None:
    gs = GraphSampler(Sampler(micro_model))
    gs.capture(Ladder(batch_sizes=(1, 2), tgt_lengths=(16,), routings=("argmax",), steps=3))
    eager = Sampler(micro_model)
    fits = _requests(2, seed=50, max_src=16, max_tgt=16)
    cases = [
        (_requests(3, seed=51, max_src=16, max_tgt=16), 3, "argmax", {}),  # too many rows
        ([GenerationRequest([5] * 4, 17, 1)], 3, "argmax", {}),  # target too long
        ([GenerationRequest([5] * 17, 4, 1)], 3, "argmax", {}),  # source too long
        (fits, 4, "argmax", {}),  # steps not captured
        (fits, 3, "sample", {}),  # routing not captured
        (fits, 3, "argmax", {"return_previews": True}),
        (fits, 3, "argmax", {"on_step": lambda i, t: None}),
    ]
    for k, (reqs, steps, routing, kw) in enumerate(cases, 1):
        assert gs.generate(reqs, steps, routing, **kw) == eager.generate(reqs, steps, routing, **kw)
        assert gs.stats == {"graph": 0, "eager": k}
    assert gs.generate(fits, 3, "argmax") is not None and gs.stats["graph"] == 1


def test_bad_requests_raise_the_eager_errors(graphs: GraphSampler) -> None:
    with pytest.raises(ValueError, match="empty source"):
        graphs.generate([GenerationRequest([], 3)], steps=3)
    for bad in (61, -1, 2**70):  # checked on the packed ids; too large for int64 too
        with pytest.raises(ValueError, match=f"token id {bad} outside the vocabulary"):
            graphs.generate([GenerationRequest([4, 5], 3), GenerationRequest([4, bad], 3)], steps=3)
    assert graphs.stats["graph"] == 0
    with pytest.raises(ValueError, match="no requests"):
        graphs.generate([], steps=3)
    with pytest.raises(ValueError, match="max_length"):
        graphs.generate([GenerationRequest([4], 41)], steps=3)


_HOST_SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique")


def _host_sync_ops(fn) -> list[str]:
    """The aten ops `fn` dispatches that make a CUDA stream wait for the host (or the host for
    the device): any of them inside a capture aborts it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(k in str(func) for k in _HOST_SYNC_OPS):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests capture for real")
def test_captured_work_never_waits_on_the_host(micro_model: YAN) -> None:
    """The CUDA graph body on CPU: the fused engine with the Triton kernels (in the
    interpreter), the device-side noise and the fused decoder; no op that would synchronize
    with the host may run. The modules' reference routed expert (`nonzero`) is the positive
    control."""
    pytest.importorskip("triton")
    from yan_kernels import ops

    reqs = _requests(2, seed=60, max_src=16, max_tgt=16)
    ladder = Ladder(batch_sizes=(2,), tgt_lengths=(16,), routings=("sample",))
    tokens = {}
    for fused in (False, True):
        with ops.force("triton" if fused else "ref"):
            gs = GraphSampler(Sampler(micro_model, fused=fused))
            gs.capture(ladder)
            (entry,) = gs._entries[(3, "sample")]
            entry.io.packed.copy_(pack_inputs(reqs, entry.shape, 0, entry.io.stage))
            seen = _host_sync_ops(entry.graph.replay)
            tokens[fused] = entry.io.out[0].clone()
        if fused:
            assert seen == []
        else:
            assert "aten.nonzero.default" in seen
    for i, r in enumerate(reqs):  # the same tokens at real positions (padding may differ)
        assert torch.equal(tokens[True][i, : r.tgt_len], tokens[False][i, : r.tgt_len])


def test_cpu_worker_keeps_the_eager_sampler() -> None:
    """The graph sampler is a CUDA-only addition: on CPU the worker has none and its warm-up
    captures nothing."""
    from pathlib import Path

    from yan_serve.engine.worker import YANWorker

    ckpt = Path(__file__).resolve().parents[2] / "weights" / "yan-tiny-kjv"
    w = YANWorker(ckpt, "cpu")
    assert w.graphs is None


# ----------------------------------------------------------------------------------- GPU
def _cuda_model(name: str = "yan-tiny", dtype: torch.dtype = torch.float32) -> YAN:
    torch.manual_seed(0)
    return YAN(YANConfig.from_name(name)).to("cuda", dtype).eval()


def _gpu_requests(n: int, seed: int, max_src: int, max_tgt: int, sampled: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lx = int(torch.randint(1, max_src + 1, (1,), generator=g))
        ly = int(torch.randint(1, max_tgt + 1, (1,), generator=g))
        src = torch.randint(4, 8192, (lx,), generator=g).tolist()
        hot = sampled and i % 3 == 0
        out.append(GenerationRequest(src, ly, 900 + i, 0.9 if hot else 0.0, 5 if i % 2 else 0))
    return out


_GPU_LADDER = Ladder(
    batch_sizes=(1, 4, 16), tgt_lengths=(16, 64, 256), src_lengths=(16, 64, 256), max_tokens=None
)


@pytest.fixture(scope="module")
def cuda_graphs() -> tuple[GraphSampler, GraphSampler]:
    """yan-tiny (random weights, fp32) on CUDA: captured graphs, and the same padding replayed
    eagerly (the oracle for the capture itself)."""
    model = _cuda_model()
    graphs = GraphSampler(Sampler(model))
    report = graphs.capture(_GPU_LADDER)
    assert graphs.cuda_graphs and report.graphs == 3 * 9 * 2 and report.skipped == 0
    # the graphs' pool is what they hold: positive, and within what the device lost
    assert 0 < report.pool_bytes <= report.device_bytes, report
    padded = GraphSampler(Sampler(model), capturer=EagerReplay)
    padded.capture(_GPU_LADDER)
    return graphs, padded


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n, max_src, max_tgt",
    [(1, 5, 7), (1, 256, 256), (3, 40, 60), (4, 64, 64), (13, 200, 120), (16, 256, 256)],
)
@pytest.mark.parametrize("routing", ["argmax", "sample"])
def test_cuda_graphs_equal_the_eager_sampler(
    cuda_graphs, n: int, max_src: int, max_tgt: int, routing: str
) -> None:
    graphs, padded = cuda_graphs
    reqs = _gpu_requests(n, seed=n * 1000 + max_tgt, max_src=max_src, max_tgt=max_tgt)
    before = graphs.stats["graph"]
    out = graphs.generate(reqs, routing=routing)
    assert graphs.stats["graph"] == before + 1
    _assert_same_tokens(out, graphs.sampler.generate(reqs, routing=routing))
    # the replay against the same padded batch run eagerly: same kernels, same shapes
    same = padded.generate(reqs, routing=routing)
    for g, p in zip(out, same, strict=True):
        assert (g.full, g.expert) == (p.full, p.expert)
        assert g.full_confidence == pytest.approx(p.full_confidence, rel=1e-6, abs=0)


@pytest.mark.gpu
def test_cuda_graphs_sampled_rows_and_reuse(cuda_graphs) -> None:
    graphs, _ = cuda_graphs
    captures = graphs.captures
    reqs = _gpu_requests(11, seed=7, max_src=60, max_tgt=60, sampled=True)
    for _ in range(3):
        _assert_same_tokens(graphs.generate(reqs), graphs.sampler.generate(reqs))
    assert graphs.captures == captures  # replays never capture
    shape = graphs.plan(reqs, 3, "sample")
    (entry,) = [e for e in graphs._entries[(3, "sample")] if e.shape == shape]
    assert entry.replays >= 3


@pytest.mark.gpu
def test_cuda_graphs_bf16_model() -> None:
    """bf16 weights and activations (fp32 accumulation in the kernels): the graph equals the
    same padded batch run eagerly, and equals the eager sampler bit for bit when the batch fills
    its shape. Padding a batch changes cuBLAS shapes, which moves bf16 values by an ulp; the
    token agreement with the unpadded eager batch is measured, not assumed to be exact."""
    model = _cuda_model(dtype=torch.bfloat16)
    ladder = Ladder(batch_sizes=(4, 8), tgt_lengths=(16, 64), src_lengths=(16, 64))
    graphs = GraphSampler(Sampler(model))
    graphs.capture(ladder)
    padded = GraphSampler(Sampler(model), capturer=EagerReplay)
    padded.capture(ladder)
    reqs = _gpu_requests(6, seed=3, max_src=50, max_tgt=50)
    out = graphs.generate(reqs, routing="argmax")
    same = padded.generate(reqs, routing="argmax")
    assert [(g.full, g.expert) for g in out] == [(p.full, p.expert) for p in same]
    full = _gpu_requests(4, seed=4, max_src=16, max_tgt=16)
    full[0].src, full[1].tgt_len = [9] * 16, 16
    assert graphs.plan(full, 3, "argmax") == GraphShape(4, 16, 16)
    a, b = graphs.generate(full, routing="argmax"), graphs.sampler.generate(full, routing="argmax")
    assert [(g.full, g.expert) for g in a] == [(e.full, e.expert) for e in b]
    eager = graphs.sampler.generate(reqs, routing="argmax")
    agree = sum(
        x == y for g, e in zip(out, eager, strict=True) for x, y in zip(g.full, e.full, strict=True)
    )
    total = sum(r.tgt_len for r in reqs)
    assert agree >= 0.9 * total, f"bf16: {total - agree}/{total} tokens changed by padding"


@pytest.mark.gpu
@pytest.mark.parametrize("linears", ["cublas", "fused"])
def test_worker_captures_at_warmup_and_serves_generate_from_graphs(linears: str) -> None:
    """The served path (fp32 weights on CUDA), with the default linear layers and with every
    norm and residual in the Triton GEMMs (`--linears fused`): graphs equal the eager sampler."""
    from pathlib import Path

    from yan_serve.engine.requests import EngineRequest
    from yan_serve.engine.worker import YANWorker

    ckpt = Path(__file__).resolve().parents[2] / "weights" / "yan-tiny-kjv"
    w = YANWorker(ckpt, "cuda", linears=linears)
    assert w.sampler.engine is not None and w.sampler.engine.linears == linears
    assert w.graphs is not None and w.graphs.captures == 0
    w.warmup(w.default_steps)
    assert w.graphs is not None, "capture failed: the worker fell back to eager (see the log)"
    assert w.graphs.captures > 0
    jobs = [EngineRequest([5, 6, 7, 8][: 1 + i % 4], 10 + i, i, w.default_steps) for i in range(5)]
    out = w.run(jobs)
    assert w.graphs.stats["graph"] == 1
    reqs = [GenerationRequest(j.src, j.tgt_len, j.seed) for j in jobs]
    _assert_same_tokens(out, w.sampler.generate(reqs, w.default_steps, "argmax"))
    seen = []
    jobs[0].on_step = lambda i, toks: seen.append(i)
    w.run(jobs)  # previews: eager
    assert w.graphs.stats["graph"] == 1 and seen == list(range(w.default_steps))


def test_graph_replay_keeps_infill_content_positions(micro_model: YAN) -> None:
    """The replayed path applies the same content constraint as the eager sampler."""
    import dataclasses

    model = YAN(micro_model.config).eval()
    model.load_state_dict(micro_model.state_dict())
    with torch.no_grad():
        model.decoder.lm_head.bias[model.config.pad_token_id] += 50.0
    gs = GraphSampler(Sampler(model))
    gs.capture(Ladder(batch_sizes=(4,), tgt_lengths=(16,), src_lengths=(16,), max_tokens=None,
                      steps=3, routings=("argmax",)))  # fmt: skip
    reqs = [GenerationRequest([5, 6, 7][: 1 + i], 9, seed=i, content=(1, 4)) for i in range(3)]
    reqs.append(dataclasses.replace(reqs[0], content=()))
    got = gs.generate(reqs, 3, "argmax")
    assert gs.stats["graph"] == 1
    want = gs.sampler.generate(reqs, 3, "argmax")
    assert [g.full for g in got] == [g.full for g in want]
    pad = model.config.pad_token_id
    assert all(g.full[1] != pad and g.full[4] != pad for g in got[:3])
    assert got[3].full == [pad] * 9


@pytest.mark.gpu
@pytest.mark.parametrize("linears, attention", [("cublas", "sdpa"), ("fused", "triton")])
def test_pdl_graphs_equal_the_plain_graphs(linears: str, attention: str) -> None:
    """Graphs captured with programmatic dependent launch (`yan_kernels.pdl`: every Triton
    kernel of the sample waits on the grid before it, then lets the next one start) give the
    plain graphs' tokens, experts and confidences exactly: the same kernels at the same shapes,
    launched earlier. With "fused/triton" nearly every launch of the sample is such a kernel;
    below sm_90 both captures are plain."""
    from yan_kernels import pdl

    model = _cuda_model(dtype=torch.bfloat16)
    ladder = Ladder(batch_sizes=(1, 8), tgt_lengths=(16, 64), src_lengths=(16, 64),
                    max_tokens=None, steps=3, routings=("argmax", "sample"))  # fmt: skip
    reqs = _gpu_requests(6, seed=11, max_src=60, max_tgt=60, sampled=True)
    got = {}
    for on in (False, True):
        sampler = Sampler(model, linears=linears)
        assert sampler.engine is not None
        sampler.engine.attention = attention
        graphs = GraphSampler(sampler)
        with pdl.use(on):
            graphs.capture(ladder)
        runs = [graphs.generate(reqs, 3, r) for r in ("argmax", "sample", "argmax")]
        assert graphs.stats["graph"] == 3
        got[on] = [[(o.full, o.expert, o.full_confidence) for o in run] for run in runs]
    assert got[True] == got[False]
    assert got[True][0] == got[True][2]  # replays repeat themselves
