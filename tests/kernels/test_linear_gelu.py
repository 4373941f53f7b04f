"""Linear + bias + exact GELU kernel against its pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_linear_gelu.py
(no CUDA: the kernel runs in Triton's CPU interpreter, in fp32 and fp16 — the interpreter has
no bf16 arithmetic; GPU tests, marked `gpu`, cover bf16 at the model's shapes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.tolerances import TOL

pytest.importorskip("triton")

from yan_kernels import ops
from yan_kernels.linear_gelu import (
    GPU_LARGE,
    GPU_SMALL,
    SWEEP,
    Config,
    default_config,
    linear_gelu,
    linear_gelu_ref,
)


def _problem(M: int, K: int, N: int, device, dtype=torch.float32, bias: bool = True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = (torch.rand(N, K, generator=g) * 2 - 1) * 2 / max(K, 1) ** 0.5
    b = torch.rand(N, generator=g) * 2 - 1 if bias else None
    cast = [t if t is None else t.to(device, dtype) for t in (x, w, b)]
    return cast[0], cast[1], cast[2]


def _oracle(x, w, b):
    """fp32 from the (rounded) inputs, exact GELU: what the kernel computes before its one
    rounding to the output dtype."""
    return F.gelu(F.linear(x.float(), w.float(), None if b is None else b.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "M,K,N,bias",
    [(1, 64, 128, True), (37, 70, 130, True), (65, 33, 96, False), (3, 1, 5, True)],
)
def test_matches_the_fp32_oracle_on_awkward_shapes(device, dtype, M, K, N, bias) -> None:
    """Rows, columns and the reduction each cut mid-tile; one output column, one input."""
    x, w, b = _problem(M, K, N, device, dtype, bias)
    got = linear_gelu(x, w, b)
    assert got.shape == (M, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), _oracle(x, w, b), **TOL[dtype])


def test_the_gelu_is_the_exact_erf_form(device) -> None:
    """fp32 holds the kernel closer to the erf GELU than to the tanh one (which the model does
    not use): a tanh epilogue would fail here."""
    x, w, b = _problem(40, 64, 96, device)
    x = x * 3  # pre-activations of a few units, where the two forms differ by up to ~5e-4
    got = linear_gelu(x, w, b)
    pre = F.linear(x, w, b)
    torch.testing.assert_close(got, F.gelu(pre), **TOL[torch.float32])
    assert (F.gelu(pre, approximate="tanh") - got).abs().max() > 10 * TOL[torch.float32]["atol"]


def test_leading_dims_strides_and_empty_inputs(device) -> None:
    x, w, b = _problem(2 * 7, 48, 40, device)
    x3 = x.view(2, 7, 48)
    torch.testing.assert_close(
        linear_gelu(x3, w, b), linear_gelu_ref(x3, w, b), **TOL[torch.float32]
    )
    wide = torch.randn(14, 96, device=device)[:, ::2]  # rows with a stride of 2: copied first
    torch.testing.assert_close(linear_gelu(wide, w, b), linear_gelu_ref(wide, w, b),
                               **TOL[torch.float32])  # fmt: skip
    assert linear_gelu(x[:0], w, b).shape == (0, 40)
    no_k = linear_gelu(x[:, :0], w[:, :0], b)  # an empty sum: gelu(bias) in every row
    torch.testing.assert_close(no_k, F.gelu(b).expand(14, 40), **TOL[torch.float32])


@pytest.mark.parametrize("cfg", [GPU_SMALL, SWEEP[2], Config(16, 32, 16, 2, 4, 1)])
def test_every_tile_configuration_gives_the_same_result(device, cfg) -> None:
    """The GPU tiles and the grouped tile order (a group larger than the row tiles, and one
    smaller) are the same function: run in the interpreter they match the oracle too."""
    x, w, b = _problem(70, 40, 150, device)
    torch.testing.assert_close(linear_gelu(x, w, b, config=cfg), _oracle(x, w, b),
                               **TOL[torch.float32])  # fmt: skip


def test_default_config_by_rows() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_config(cuda, 128) == GPU_SMALL and default_config(cuda, 65536) == GPU_LARGE
    assert default_config(cpu, 10**6) not in (GPU_SMALL, GPU_LARGE)  # the interpreter's


def test_facade_runs_the_kernel_where_triton_is_selected(device) -> None:
    x, w, b = _problem(9, 24, 33, device)
    with ops.force("triton"):
        fused = ops.linear_gelu(x, w, b)
    with ops.force("ref"):
        ref = ops.linear_gelu(x, w, b)
    torch.testing.assert_close(fused, ref, **TOL[torch.float32])
    w.requires_grad_()
    with ops.force("triton"):  # recording autograd: the reference (the kernel has no backward)
        out = ops.linear_gelu(x, w, b)
    assert out.requires_grad and out.grad_fn is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 128, 3000, 64 * 1024])
def test_model_shapes_on_gpu(M, dtype) -> None:
    """yan-paper's FFN up-projection (d 512 -> 2048) at batch-1 to 64 x 1024 token counts, with
    the configuration the launcher chooses."""
    x, w, b = _problem(M, 512, 2048, torch.device("cuda"), dtype)
    torch.testing.assert_close(linear_gelu(x, w, b).float(), _oracle(x, w, b), **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_sweep_configuration_on_gpu() -> None:
    """The tiles `bench kernels --sweep gelu` times compute the same function (bf16, a row
    count that cuts the large tiles)."""
    x, w, b = _problem(3000, 512, 2048, torch.device("cuda"), torch.bfloat16)
    want = _oracle(x, w, b)
    for cfg in SWEEP:
        got = linear_gelu(x, w, b, config=cfg)
        torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16], msg=str(cfg))
