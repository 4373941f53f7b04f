"""Programmatic dependent launch (`yan_kernels.pdl`): when launches ask for it, and that a chain
of PDL kernels captured in a CUDA graph computes what the plain chain computes (GPU).

The compile guard checks the PDL variants' PTX (tests/kernels/test_compile_guard.py).
Run: python -m pytest -q tests/kernels/test_pdl.py
"""

from __future__ import annotations

import pytest
import torch
from yan_kernels import pdl


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(pdl.ENV, raising=False)
    return monkeypatch


def test_off_unless_asked(no_env: pytest.MonkeyPatch) -> None:
    assert not pdl.requested()
    for on in ("1", "true", "ON", " yes "):
        no_env.setenv(pdl.ENV, on)
        assert pdl.requested(), on
    for off in ("0", "", "false", "no"):
        no_env.setenv(pdl.ENV, off)
        assert not pdl.requested(), off


def test_use_overrides_the_environment_innermost_first(no_env: pytest.MonkeyPatch) -> None:
    no_env.setenv(pdl.ENV, "1")
    with pdl.use(False):
        assert not pdl.requested()
        with pdl.use(True):
            assert pdl.requested()
        assert not pdl.requested()
    assert pdl.requested()
    no_env.setenv(pdl.ENV, "0")
    with pdl.use(True):
        assert pdl.requested()
    assert not pdl.requested()


def test_never_off_a_hopper_gpu(no_env: pytest.MonkeyPatch) -> None:
    """The CPU (and the interpreter, whatever the device) get the plain launch: the PDL
    constexpr False and no `launch_pdl` option, even when asked for."""
    with pdl.use(True):
        assert not pdl.supported(torch.device("cpu"))
        assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
        no_env.setenv("TRITON_INTERPRET", "1")
        assert not pdl.supported(torch.device("cuda"))  # no CUDA call needed to say so


def _chain(x: torch.Tensor, layers: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Each layer reads the previous one's output: LayerNorm -> up + GELU, then down + residual
    (two `fused_linear` launches a layer, each depending on the one before)."""
    from yan_kernels.fused_linear import fused_linear

    for nw, ns, w1, b1, w2, b2 in layers:
        h = fused_linear(x, w1, b1, norm=(nw, ns, 1e-5), gelu=True)
        x = fused_linear(h, w2, b2, residual=x)
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 300])
def test_pdl_chain_in_a_cuda_graph_equals_the_plain_chain(rows: int) -> None:
    """24 dependent launches captured with PDL (on sm_90+; elsewhere both runs are plain)
    replay to the same bits as the plain chain, eager and replayed again after the inputs
    change: no launch reads its input before the one that writes it has finished."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    d, f = 384, 1536

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * scale).bfloat16()

    layers = [(1 + rand(d, scale=0.1), rand(d, scale=0.1), rand(f, d, scale=d**-0.5),
               rand(f, scale=0.1), rand(d, f, scale=f**-0.5), rand(d, scale=0.1))
              for _ in range(12)]  # fmt: skip
    x = rand(rows, d)
    with pdl.use(False):
        want = _chain(x, layers)
    static_x = x.clone()
    with pdl.use(True):
        _chain(static_x, layers)  # compile the PDL variants outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(static_x, layers)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    x2 = rand(rows, d)
    static_x.copy_(x2)
    graph.replay()
    with pdl.use(False):
        want2 = _chain(x2, layers)
    torch.cuda.synchronize()
    assert torch.equal(out, want2)
