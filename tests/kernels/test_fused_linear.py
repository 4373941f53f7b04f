"""The fused linear kernel (LayerNorm prologue; bias, exact GELU, residual epilogue) against its
pure-torch reference.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_fused_linear.py
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
from yan_kernels.fused_linear import (
    GPU_GEMV,
    GPU_LARGE,
    GPU_SMALL,
    GPU_TINY,
    SWEEP,
    Config,
    default_config,
    fused_linear,
    fused_linear_ref,
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


@pytest.mark.parametrize("cfg", [GPU_GEMV, GPU_SMALL, SWEEP[3], Config(16, 32, 16, 2, 4, 1)])
def test_every_tile_configuration_gives_the_same_result(device, cfg) -> None:
    """The GPU tiles and the grouped tile order (a group larger than the row tiles, and one
    smaller) are the same function: run in the interpreter they match the oracle too."""
    x, w, b = _problem(70, 40, 150, device)
    torch.testing.assert_close(linear_gelu(x, w, b, config=cfg), _oracle(x, w, b),
                               **TOL[torch.float32])  # fmt: skip


@pytest.mark.parametrize("cfg", [GPU_GEMV, GPU_TINY, GPU_SMALL])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_chosen_tiles_with_norm_and_residual(device, cfg, transposed) -> None:
    """The tiles the launcher picks by row count, with the prologue and the epilogue, in both
    weight layouts: K = 130 spans two of GPU_GEMV's 128-wide K tiles and three 64-wide ones."""
    x, w, b, nrm, res = _chain(19, 130, 70, device, torch.float32, seed=5)
    wt = w.t().contiguous() if transposed else w
    got = fused_linear(x, wt, b, norm=nrm, gelu=True, residual=res, transposed=transposed,
                       config=cfg)  # fmt: skip
    torch.testing.assert_close(got, _chain_oracle(x, w, b, nrm, True, res), **TOL[torch.float32])


def test_default_config_by_rows() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_config(cuda, 1) == GPU_GEMV and default_config(cuda, 16) == GPU_GEMV
    assert default_config(cuda, 128) == GPU_TINY and default_config(cuda, 1024) == GPU_SMALL
    assert default_config(cuda, 65536) == GPU_LARGE
    assert default_config(cpu, 10**6) not in (GPU_GEMV, GPU_TINY, GPU_SMALL, GPU_LARGE)


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


def _chain(M: int, K: int, N: int, device, dtype, seed: int = 1):
    """Inputs for the whole chain: rows with their own offset and spread (the norm must use
    each row's own statistics, and two passes, not E[x^2] - E[x]^2, at an offset of 30), the
    norm's affine, and a residual."""
    x, w, b = _problem(M, K, N, device, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    spread = torch.rand(M, 1, generator=g) * 4 + 0.1
    offset = torch.linspace(-30, 30, M).unsqueeze(1)
    x = (x.float().cpu() * spread + offset).to(device, dtype)
    scale = (torch.rand(K, generator=g) + 0.5).to(device, dtype)
    shift = (torch.rand(K, generator=g) - 0.5).to(device, dtype)
    res = torch.randn(M, N, generator=g).to(device, dtype)
    return x, w, b, (scale, shift, 1e-5), res


def _chain_oracle(x, w, b, norm, gelu, residual):
    """fp32 from the (rounded) inputs, with the normalized rows rounded to x's dtype before
    the GEMM, as the unfused norm rounds its output (and as the kernel does)."""
    h = x.float()
    if norm is not None:
        scale, shift, eps = norm
        h = F.layer_norm(h, (h.shape[-1],), eps=eps) * scale.float() + shift.float()
        h = h.to(x.dtype).float()
    a = F.linear(h, w.float(), None if b is None else b.float())
    if gelu:
        a = F.gelu(a)
    return a if residual is None else residual.float() + a


# (bias, norm, gelu, residual): the engines' combinations, and every flag alone and together
_FLAGS = [
    (True, True, False, False), (False, True, False, False), (True, True, True, False),
    (True, False, False, True), (False, False, False, True), (True, True, True, True),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 64, 128), (37, 130, 70), (65, 33, 96), (3, 1, 5)])
@pytest.mark.parametrize("bias,norm,gelu,residual", _FLAGS)
def test_norm_and_residual_match_the_oracle(device, dtype, M, K, N, bias, norm, gelu,
                                            residual) -> None:  # fmt: skip
    """The prologue and epilogue on shapes that cut rows, columns and K mid-tile (K = 130
    spans three K tiles of the statistics passes), one-wide rows (K = 1: every row is its
    mean, the norm gives the shift)."""
    x, w, b, nrm, res = _chain(M, K, N, device, dtype)
    b = b if bias else None
    nrm = nrm if norm else None
    res = res if residual else None
    got = fused_linear(x, w, b, norm=nrm, gelu=gelu, residual=res)
    assert got.shape == (M, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), _chain_oracle(x, w, b, nrm, gelu, res), **TOL[dtype])


def test_the_reference_is_the_unfused_chain(device) -> None:
    """`fused_linear_ref` is the model's own ops in order, and the kernel matches it in fp32
    with leading dimensions and a strided residual."""
    x, w, b, nrm, res = _chain(2 * 9, 40, 24, device, torch.float32)
    scale, shift, eps = nrm
    want = res + F.gelu(F.linear(F.layer_norm(x, (40,), scale, shift, eps), w, b))
    ref = fused_linear_ref(x, w, b, norm=nrm, gelu=True, residual=res)
    torch.testing.assert_close(ref, want, **TOL[torch.float32])
    wide = torch.zeros(18, 48, device=device)
    wide[:, ::2] = res  # a residual with a row stride of 48 and a column stride of 2: copied
    got = fused_linear(x.view(2, 9, 40), w, b, norm=nrm, gelu=True,
                       residual=wide[:, ::2].view(2, 9, 24))  # fmt: skip
    assert got.shape == (2, 9, 24)
    torch.testing.assert_close(got.view(18, 24), want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 64, 192), (5, 130, 70)])
@pytest.mark.parametrize("norm,gelu,residual", [(True, False, False), (False, False, True),
                                                (True, True, False)])  # fmt: skip
def test_transposed_weights_and_the_tanh_gelu(device, dtype, M, K, N, norm, gelu,
                                              residual) -> None:  # fmt: skip
    """GPT-2's Conv1D layout ([K, N], `transposed=True`) and its tanh GELU: the decode step's
    four GEMMs at awkward sizes (a single row, K over two tiles)."""
    x, w, b, nrm, res = _chain(M, K, N, device, dtype)
    wt = w.t().contiguous()  # [K, N]
    nrm = nrm if norm else None
    res = res if residual else None
    got = fused_linear(x, wt, b, norm=nrm, gelu=gelu, approximate="tanh", residual=res,
                       transposed=True)  # fmt: skip
    h = x.float()
    if nrm is not None:
        h = F.layer_norm(h, (K,), nrm[0].float(), nrm[1].float(), nrm[2]).to(dtype).float()
    want = h @ wt.float() + b.float()
    if gelu:
        want = F.gelu(want, approximate="tanh")
    if res is not None:
        want = want + res.float()
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    nrm32 = None if nrm is None else (nrm[0].float(), nrm[1].float(), nrm[2])
    res32 = None if res is None else res.float()
    ref = fused_linear_ref(x.float(), wt.float(), b.float(), norm=nrm32, gelu=gelu,
                           approximate="tanh", residual=res32, transposed=True)  # fmt: skip
    torch.testing.assert_close(ref, want, **TOL[torch.float16])


def test_the_tanh_gelu_is_not_the_erf_one(device) -> None:
    """The two GELU forms differ by up to ~5e-4 at pre-activations of a few units: each flag
    gives its own, not the other."""
    x, w, b = _problem(40, 64, 96, device)
    x = x * 3
    pre = F.linear(x, w, b)
    tanh = fused_linear(x, w, b, gelu=True, approximate="tanh")
    torch.testing.assert_close(tanh, F.gelu(pre, approximate="tanh"), **TOL[torch.float32])
    assert (F.gelu(pre) - tanh).abs().max() > 10 * TOL[torch.float32]["atol"]
    big = fused_linear(x * 100, w, b, gelu=True, approximate="tanh")  # exp(2u) overflows: no NaN
    torch.testing.assert_close(big, F.gelu(F.linear(x * 100, w, b), approximate="tanh"),
                               atol=1e-3, rtol=2e-5)  # fmt: skip


def test_bad_arguments_are_refused(device) -> None:
    x, w, b, (scale, shift, eps), res = _chain(4, 16, 8, device, torch.float32)
    with pytest.raises(AssertionError, match="norm scale"):
        fused_linear(x, w, b, norm=(scale[:-1], shift, eps))
    with pytest.raises(AssertionError, match="residual"):
        fused_linear(x, w, b, residual=res[:, :-1])
    with pytest.raises(AssertionError, match="one dtype"):
        fused_linear(x, w, b, residual=res.double())
    with pytest.raises(AssertionError, match="weight must be"):
        fused_linear(x, w, b, transposed=True)  # [N, K] given where [K, N] is expected
    with pytest.raises(AssertionError, match="approximate"):
        fused_linear(x, w, b, gelu=True, approximate="sigmoid")


def test_fused_linear_facade(device) -> None:
    x, w, b, nrm, res = _chain(9, 24, 33, device, torch.float32)
    with ops.force("triton"):
        fused = ops.fused_linear(x, w, b, norm=nrm, residual=res)
    with ops.force("ref"):
        ref = ops.fused_linear(x, w, b, norm=nrm, residual=res)
    torch.testing.assert_close(fused, ref, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 128, 3000, 64 * 1024])
def test_norm_and_residual_at_model_shapes_on_gpu(M, dtype) -> None:
    """yan-paper's QKV projection after its norm (512 -> 1536) and FFN down-projection into
    the residual (2048 -> 512), with the configuration the launcher chooses."""
    dev = torch.device("cuda")
    x, w, b, nrm, _ = _chain(M, 512, 1536, dev, dtype)
    got = fused_linear(x, w, b, norm=nrm)
    torch.testing.assert_close(got.float(), _chain_oracle(x, w, b, nrm, False, None), **TOL[dtype])
    x, w, b, _, res = _chain(M, 2048, 512, dev, dtype)
    got = fused_linear(x, w, b, residual=res)
    torch.testing.assert_close(got.float(), _chain_oracle(x, w, b, None, False, res), **TOL[dtype])


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
