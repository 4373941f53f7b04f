"""Per-request Philox noise kernel against its pure-torch reference and Random123's answers.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_noise.py
(no CUDA: the kernels run in Triton's CPU interpreter; GPU tests are marked `gpu`).

Tolerances: uniforms are compared bit for bit. Normals differ between the two sides only by
float32 rounding in log / sin / cos (the kernel's log is numpy's in the interpreter and
libdevice's on CUDA, its sin / cos its own `_sincos`; the reference's are torch's), so fp32 is
held to 1e-5 relative and 2e-6 * init_noise absolute. The interpreter rounds fp32 -> bf16
toward zero where CUDA and torch round to nearest, so 16-bit outputs may differ by one ulp.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from yan_kernels.decoder_argmax import philox_uniform
from yan_kernels.noise import (
    aot_specs,
    philox4x32,
    philox4x32_ref,
    request_noise,
    request_noise_ref,
    uniform_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASK = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32_10: (counter, key, output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# seeds: zero, negative, above 2**32, the int64 extremes
SEEDS = [0, -7, 2**32 + 5, -(2**40) - 3, 2**63 - 1, -(2**63), 123456789]


def _philox_python(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox-4x32-10 in Python integers, from the Random123 definition."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


def _kat_tensors(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ctr = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=device)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64, device=device)
    want = torch.tensor([w for _, _, w in KAT], dtype=torch.int64, device=device)
    return ctr, key, want


def _random_words(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    edge = [0, 1, 2**31 - 1, 2**31, MASK]
    ctr = [[rng.choice(edge) if rng.random() < 0.2 else rng.getrandbits(32) for _ in range(4)]]
    ctr += [[rng.getrandbits(32) for _ in range(4)] for _ in range(n - 1)]
    key = [[rng.getrandbits(32) for _ in range(2)] for _ in range(n)]
    return torch.tensor(ctr, dtype=torch.int64), torch.tensor(key, dtype=torch.int64)


def test_int64_products_give_the_true_32bit_words() -> None:
    """The reference multiplies 32-bit words in int64, where the 64-bit product wraps; the low
    word and (p >> 32) & 0xFFFFFFFF must still be the true product's words."""
    rng = random.Random(0)
    a = [0, 1, MASK, 2**31, 2**31 - 1, 0xD2511F53, 0xCD9E8D57]
    a += [rng.getrandbits(32) for _ in range(2000)]
    b = [MASK, 0xD2511F53, 0xCD9E8D57, *(rng.getrandbits(32) for _ in range(len(a) - 3))]
    p = torch.tensor(a, dtype=torch.int64) * torch.tensor(b, dtype=torch.int64)
    assert (p < 0).any(), "no product wrapped: the check would be vacuous"
    hi, lo = ((p >> 32) & MASK).tolist(), (p & MASK).tolist()
    assert hi == [x * y >> 32 for x, y in zip(a, b, strict=True)]
    assert lo == [x * y & MASK for x, y in zip(a, b, strict=True)]
    for m in (0xD2511F53, 0xCD9E8D57):  # the scalar-constant form the reference uses
        q = torch.tensor(a, dtype=torch.int64) * m
        assert ((q >> 32) & MASK).tolist() == [x * m >> 32 for x in a]
        assert (q & MASK).tolist() == [x * m & MASK for x in a]


def test_reference_philox_known_answers() -> None:
    ctr, key, want = _kat_tensors("cpu")
    assert torch.equal(philox4x32_ref(ctr, key), want)
    assert [_philox_python(c, k) for c, k, _ in KAT] == [w for _, _, w in KAT]


def test_kernel_philox_known_answers(device) -> None:
    ctr, key, want = _kat_tensors(device)
    assert torch.equal(philox4x32(ctr, key), want)


def test_kernel_and_reference_philox_agree_with_python_ints(device) -> None:
    ctr, key = _random_words(300)
    want = torch.tensor(
        [
            _philox_python(tuple(c), tuple(k))
            for c, k in zip(ctr.tolist(), key.tolist(), strict=True)
        ]
    )
    assert torch.equal(philox4x32_ref(ctr, key), want)
    assert torch.equal(philox4x32(ctr.to(device), key.to(device)).cpu(), want)


def test_uniforms_equal_tl_rand() -> None:
    """Word 0 of counter (v, 0, 0, 0) under the seed's key, through `uniform_ref`, is exactly
    `tl.rand(seed, v)` as the decoder's torch mirror computes it."""
    seed = torch.tensor(SEEDS, dtype=torch.int64)
    n = 700
    ctr = torch.zeros(len(SEEDS) * n, 4, dtype=torch.int64)
    ctr[:, 0] = torch.arange(n).repeat(len(SEEDS))
    key = torch.stack([seed & MASK, (seed >> 32) & MASK], -1).repeat_interleave(n, 0)
    u = uniform_ref(philox4x32_ref(ctr, key)[:, 0]).view(len(SEEDS), n)
    assert torch.equal(u, philox_uniform(seed, n))


def test_uniform_of_edge_words() -> None:
    """x = int32 bits, -x - 1 where negative, times 4.6566127342e-10: 0 and 2**32 - 1 map to
    0, and the largest words stay below 1."""
    w = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**31 + 1, MASK - 1, MASK])
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)
    x = [0, 1, 2**31 - 1, 2**31 - 1, 2**31 - 2, 1, 0]
    want = torch.tensor(x, dtype=torch.float32) * scale
    u = uniform_ref(w)
    assert u.dtype == torch.float32 and torch.equal(u, want)
    assert (u < 1).all() and (u >= 0).all()


def _problem(device, length_dtype=torch.int64):
    seed = torch.tensor([-(2**40) - 3, 2**32 + 5, 12345], dtype=torch.int64, device=device)
    length = torch.tensor([37, 1, 20], dtype=length_dtype, device=device)
    return seed, length


def _assert_noise_close(got: torch.Tensor, want: torch.Tensor, init_noise: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * init_noise)
    else:  # one ulp of the 16-bit type (the interpreter truncates, CUDA rounds to nearest)
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=2e-6 * init_noise)


def _assert_padding_zero(z: torch.Tensor, u_r: torch.Tensor, u_t: torch.Tensor, length) -> None:
    L = z.shape[1]
    pad = torch.arange(L, device=z.device)[None, :] >= length.to(z.device)[:, None]
    for t in (z, u_r, u_t):
        v = t[pad]
        assert (v == 0).all() and not torch.signbit(v.float()).any(), "padding is not +0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length_dtype", [torch.int32, torch.int64])
def test_kernel_matches_reference(device, dtype, length_dtype) -> None:
    seed, length = _problem(device, length_dtype)
    L, d, init_noise = 37, 20, 0.7
    z, u_r, u_t = request_noise(seed, length, L, d, init_noise, dtype)
    zr, ur_r, ut_r = request_noise_ref(seed, length, L, d, init_noise, dtype)
    assert z.shape == (3, L, d) and u_r.shape == u_t.shape == (3, L)
    assert u_r.dtype == u_t.dtype == torch.float32
    assert torch.equal(u_r, ur_r) and torch.equal(u_t, ut_r)
    _assert_noise_close(z, zr, init_noise)
    _assert_padding_zero(z, u_r, u_t, length)
    _assert_padding_zero(zr, ur_r, ut_r, length)
    live = u_r[u_r != 0]
    assert ((u_r >= 0) & (u_r < 1)).all() and ((u_t >= 0) & (u_t < 1)).all()
    assert live.numel() == int(length.sum()), "a live uniform came out exactly 0"
    assert (z[0] != 0).float().mean() > 0.99


@pytest.mark.parametrize(("d", "block_l", "block_g"), [(19, 16, 2), (3, 8, 1), (20, 64, 8)])
def test_odd_widths_and_tiles_match_reference(device, d, block_l, block_g) -> None:
    """d not a multiple of 4 (the last group is cut), tiles that split positions and groups."""
    seed, length = _problem(device)
    got = request_noise(seed, length, 37, d, 1.3, torch.float32, block_l=block_l, block_g=block_g)
    want = request_noise_ref(seed, length, 37, d, 1.3, torch.float32)
    _assert_noise_close(got[0], want[0], 1.3)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_channels_follow_the_contract() -> None:
    """z0[l, 4g + j] is Box-Muller of the words of counter (l * G + g, 0, 0, 0): rebuilt here
    from the Philox words in float64 for one row."""
    seed, L, d, s = -(2**40) - 3, 5, 10, 0.7
    G = math.ceil(d / 4)
    z, u_r, u_t = request_noise_ref(torch.tensor([seed]), torch.tensor([L]), L, d, s, torch.float32)
    key = torch.tensor([[seed & MASK, (seed >> 32) & MASK]])
    ctr = torch.zeros(L * G, 4, dtype=torch.int64)
    ctr[:, 0] = torch.arange(L * G)
    u = uniform_ref(philox4x32_ref(ctr, key.expand(L * G, 2))).double().view(L, G, 4)
    r = s * torch.sqrt(-2 * torch.log(u[..., 0::2].clamp_min(1e-7)))
    theta = 2 * math.pi * u[..., 1::2]
    n = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1)  # [L, G, pair, cos/sin]
    torch.testing.assert_close(z[0].double(), n.reshape(L, 4 * G)[:, :d], rtol=1e-5, atol=1e-6)
    ctr = torch.zeros(L, 4, dtype=torch.int64)
    ctr[:, 0], ctr[:, 1] = torch.arange(L), 1
    w = philox4x32_ref(ctr, key.expand(L, 2))
    assert torch.equal(u_r[0], uniform_ref(w[:, 0])) and torch.equal(u_t[0], uniform_ref(w[:, 1]))


def test_kernel_noise_is_normal_with_init_noise_std(device) -> None:
    """32768 kernel normals: N(0, s^2) statistics, and the reference's values (every quadrant
    of the kernel's own sin / cos, many times over)."""
    B, L, d, s = 2, 64, 256, 0.5
    seed = torch.tensor([3, -4], device=device)
    length = torch.full((B,), L, device=device)
    z, u_r, u_t = request_noise(seed, length, L, d, s, torch.float32)
    _assert_noise_close(z, request_noise_ref(seed, length, L, d, s, torch.float32)[0], s)
    z = z.flatten().double().cpu()
    assert abs(z.mean().item()) < 0.015  # 5 standard errors
    assert abs(z.std().item() - s) < 0.01
    assert abs((z.abs() < s).double().mean().item() - 0.6827) < 0.015
    for u in (u_r, u_t):  # 128 values each
        assert abs(u.double().mean().item() - 0.5) < 0.1


def test_reference_noise_quantiles() -> None:
    """A bigger sample from the reference: its quantiles follow N(0, s^2) and the uniforms'
    follow U(0, 1)."""
    B, L, d, s = 8, 256, 128, 2.0
    seed = torch.arange(B, dtype=torch.int64) * 1_000_003 - 17
    z, u_r, u_t = request_noise_ref(seed, torch.full((B,), L), L, d, s, torch.float32)
    z = z.flatten().double() / s  # 262144 values
    for q in (-2.0, -1.0, -0.3, 0.0, 0.5, 1.5, 2.5):
        cdf = 0.5 * (1 + math.erf(q / math.sqrt(2)))
        assert abs((z < q).double().mean().item() - cdf) < 0.004, q
    assert abs(z.std().item() - 1) < 0.01
    assert z.abs().max() <= math.sqrt(-2 * math.log(1e-7)) + 1e-3
    pairs = z.view(B, L, d // 2, 2)  # the two normals of one Box-Muller pair are uncorrelated
    assert abs((pairs[..., 0] * pairs[..., 1]).mean().item()) < 0.01
    for u in (u_r, u_t):
        u = u.flatten().double()
        for q in (0.1, 0.5, 0.9):
            assert abs((u < q).double().mean().item() - q) < 0.04


def test_rows_are_independent_of_batch_and_padding(device) -> None:
    """A request's draws depend on its seed and length only: not on its neighbours, the padded
    length or the batch size (kernel and reference)."""
    seed, length = _problem(device)
    d = 20
    for fn in (request_noise, request_noise_ref):
        batch = fn(seed, length, 37, d, 0.7, torch.float32)
        big_seed = torch.cat([seed, torch.tensor([99, -99], device=device)])
        big_len = torch.cat([length, torch.tensor([50, 3], device=device)])
        longer = fn(big_seed, big_len, 50, d, 0.7, torch.float32)
        for i in range(3):
            alone = fn(seed[i : i + 1], length[i : i + 1], 37, d, 0.7, torch.float32)
            for a, b, c in zip(alone, batch, longer, strict=True):
                assert torch.equal(a[0], b[i]) and torch.equal(a[0], c[i, :37])
                assert (c[i, 37:] == 0).all()
        # a longer request's first positions are a shorter one's, with the same seed
        short = fn(seed[:1], torch.tensor([10], device=device), 37, d, 0.7, torch.float32)
        for a, b in zip(short, batch, strict=True):
            assert torch.equal(a[0, :10], b[0, :10]) and (a[0, 10:] == 0).all()


def test_seeds_give_different_streams(device) -> None:
    base = 1234567
    seed = torch.tensor([base, base + 1, base + 2**32, base - 2**32, -base], device=device)
    z, u_r, u_t = request_noise(
        seed, torch.full((5,), 16, device=device), 16, 8, 1.0, torch.float32
    )
    for t in (z, u_r, u_t):
        flat = t.flatten(1)
        for i in range(5):
            for j in range(i + 1, 5):
                assert (flat[i] != flat[j]).float().mean() > 0.9, (i, j)
    assert (u_r != u_t).all(), "routing and token uniforms share a stream"


def test_degenerate_shapes(device) -> None:
    one = torch.tensor([5], device=device)
    z, u_r, u_t = request_noise(one, torch.tensor([0], device=device), 4, 1, 1.0, torch.float32)
    assert z.shape == (1, 4, 1) and (z == 0).all() and (u_r == 0).all() and (u_t == 0).all()
    for fn in (request_noise, request_noise_ref):
        z, u_r, _ = fn(one, one, 0, 8, 1.0, torch.bfloat16)
        assert z.shape == (1, 0, 8) and u_r.shape == (1, 0)
        empty = torch.empty(0, dtype=torch.int64, device=device)
        z, u_r, _ = fn(empty, empty, 6, 8, 1.0, torch.float16)
        assert z.shape == (0, 6, 8) and z.dtype == torch.float16
    # length beyond L is clamped to L by the mask
    got = request_noise(one, torch.tensor([100], device=device), 6, 8, 1.0, torch.float32)
    want = request_noise_ref(one, torch.tensor([100], device=device), 6, 8, 1.0, torch.float32)
    assert torch.equal(got[1], want[1]) and (got[1] != 0).all()


def test_launcher_asserts() -> None:
    seed, length = torch.tensor([1, 2]), torch.tensor([3, 3])
    for fn in (request_noise, request_noise_ref):
        with pytest.raises(AssertionError):
            fn(seed.int(), length, 4, 8, 1.0, torch.float32)  # seeds must be int64
        with pytest.raises(AssertionError):
            fn(seed, length[:1], 4, 8, 1.0, torch.float32)
        with pytest.raises(AssertionError):
            fn(seed, length.float(), 4, 8, 1.0, torch.float32)
        with pytest.raises(AssertionError):
            fn(seed, length, 4, 8, 1.0, torch.int32)
        with pytest.raises(AssertionError):
            fn(seed, length, 2**24, 2**10, 1.0, torch.float32)  # 32-bit counters run out


def test_aot_specs_cover_every_cuda_choice() -> None:
    from yan_kernels import noise as mod

    specs = aot_specs()
    # (aot.jit_kernels finds JITFunctions only, which the interpreter replaces)
    assert {s.kernel for s in specs} == {n for n in vars(mod) if n.endswith("_kernel")}
    have = {
        (s.signature["z_ptr"], s.signature["length_ptr"], s.constexprs["BLOCK_L"],
         s.constexprs["BLOCK_G"], s.constexprs["PDL"], s.num_warps)
        for s in specs
        if s.kernel == "_request_noise_kernel"
    }  # fmt: skip
    cuda = torch.device("cuda")
    for G in range(1, 600):
        bl, bg, warps = mod._blocks(cuda, G)
        for dt in ("*fp32", "*bf16", "*fp16"):
            for lt in ("*i32", "*i64"):
                for pdl in (False, True):  # programmatic dependent launch (sm_90)
                    assert (dt, lt, bl, bg, pdl, warps) in have, (G, dt, lt, pdl)


@pytest.mark.gpu
def test_paper_shape_on_gpu_matches_reference() -> None:
    B, L, d, s = 64, 1024, 512, 1.0
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=g).to(dev)
    length = torch.randint(0, L + 1, (B,), generator=g).to(dev)
    length[0] = L
    z, u_r, u_t = request_noise(seed, length, L, d, s, torch.bfloat16)
    zr, ur_r, ut_r = request_noise_ref(seed, length, L, d, s, torch.bfloat16)
    assert torch.equal(u_r, ur_r) and torch.equal(u_t, ut_r)
    _assert_noise_close(z, zr, s)
    _assert_padding_zero(z, u_r, u_t, length)
    z32 = request_noise(seed, length, L, d, s, torch.float32)[0]
    z32_cpu = request_noise_ref(seed.cpu(), length.cpu(), L, d, s, torch.float32)[0]
    _assert_noise_close(z32.cpu(), z32_cpu, s)


@pytest.mark.gpu
def test_cuda_graph_replay_draws_each_new_seed() -> None:
    L, d = 96, 64
    dev = torch.device("cuda")
    seed = torch.tensor([1, 2, 3, 4], device=dev)
    length = torch.tensor([96, 50, 1, 0], device=dev)
    request_noise(seed, length, L, d, 1.0, torch.bfloat16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = request_noise(seed, length, L, d, 1.0, torch.bfloat16)
    for new_seed, new_len in (([-5, 2**40, 7, 8], [3, 96, 20, 60]), ([9, 9, 9, 9], [1, 2, 3, 4])):
        seed.copy_(torch.tensor(new_seed))
        length.copy_(torch.tensor(new_len))
        graph.replay()
        want = request_noise_ref(seed, length, L, d, 1.0, torch.bfloat16)
        assert torch.equal(out[1], want[1]) and torch.equal(out[2], want[2])
        _assert_noise_close(out[0], want[0], 1.0)
