"""Per-request random draws (initial flow noise, routing and token uniforms) generated on the
model's device by a counter-based generator keyed by the request's seed, so that a request's
draws depend only on its seed and length (not on its batch neighbours, the padded length or
the batch size), are produced inside a CUDA graph without host synchronization, and are
reproduced on any device by the pure-torch reference.

Contract (kernel and reference agree bit for bit on the uniforms; the normals agree to float32
rounding of the transcendental functions, about 1e-6 * init_noise absolute, see below):

- Generator: Philox-4x32 with 10 rounds (Random123's philox4x32_10). One round:
  hi0, lo0 = mulhilo(0xD2511F53, c0); hi1, lo1 = mulhilo(0xCD9E8D57, c2);
  (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); then the key is bumped,
  k0 += 0x9E3779B9, k1 += 0xBB67AE85 (all mod 2**32).
- Key: (k0, k1) = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF) of the request's int64 seed,
  two's complement bits (negative seeds are fine).
- uniform(w) of a 32-bit word, as Triton's `uint_to_uniform_float`: x = w bitcast to int32;
  x = -x - 1 where x < 0; u = float32(x) * 4.6566127342e-10, in [0, 1).
- z0 [L, d]: G = ceil(d / 4) groups per position; position l, group g uses the counter
  (l * G + g, 0, 0, 0), words w0..w3 -> u0..u3; Box-Muller per pair:
  r = init_noise * sqrt(-2 * ln(max(u0, 1e-7))), theta = 6.283185307179586 * u1,
  n0 = r * cos(theta), n1 = r * sin(theta), and likewise (u2, u3) -> n2, n3;
  z0[l, 4g + j] = n_j for 4g + j < d (normals of standard deviation init_noise). Arithmetic
  in float32 in this order, cast to the output dtype at the end.
- Routing and token uniforms: counter (l, 1, 0, 0) -> u_route[l] = uniform(w0),
  u_tok[l] = uniform(w1).
- Positions l >= the request's length are exactly 0 in z0 and both uniforms.

Counters are 32-bit: L * ceil(d / 4) must stay below 2**31.

Precision: the reference takes torch's float32 log / cos / sin; the kernel takes its backend's
log (libdevice on CUDA, numpy in the interpreter) and its own `_sincos` (one shared range
reduction for both, within 1e-7 of the exact values on [0, 2 pi)), so a normal may differ by
a few float32 ulps of r, well under 2e-6 * init_noise in absolute terms (the tests' bound,
with 1e-5 relative); 16-bit outputs then agree to one ulp of their type.

Layout: one program per (request, BLOCK_L positions, BLOCK_G groups); the key comes from the
request's seed (a scalar per program), each (position, group) runs one Philox call whose four
words become four consecutive channels, interleaved in registers so that each row of the tile
is one contiguous store. The programs of the first group block also write the two uniforms.
The kernel is bound by arithmetic, not memory: on an H100 at B=64, L=1024, d=512 it takes
about 81 us in bf16 (torch.randn of the same size: 89 us), of which the Philox words, the
uniforms and the stores are about 45 us and Box-Muller the rest; libdevice's separate sinf
and cosf cost 12 us more than `_sincos`. The Philox rounds are written out here rather than
taken from `tl.randint4x`, whose module differs between Triton releases; `philox4x32` exposes
them for the known-answer tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .aot import TORCH_TO_TRITON, AotSpec, pointer, with_pdl
from .gdc import grid_dependency

# Philox-4x32 constants (Random123): round multipliers and Weyl key increments.
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
# Largest float32 s with (2**31 - 1) * s < 1 after rounding (Triton's uint_to_uniform_float).
_U_SCALE = tl.constexpr(4.6566127342e-10)
_TWO_PI = tl.constexpr(6.283185307179586)
_U_MIN = tl.constexpr(1e-7)  # keeps ln(u) finite: |z| <= sqrt(-2 ln 1e-7) ~ 5.68

_MASK32 = 0xFFFFFFFF


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint32 blocks (the key may be scalars): returns the 4 output words."""
    m0 = tl.full((), _M0, tl.uint32)
    m1 = tl.full((), _M1, tl.uint32)
    w0 = tl.full((), _W0, tl.uint32)
    w1 = tl.full((), _W1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def _uniform(w):
    """uint32 word -> float32 in [0, 1), as Triton's `uint_to_uniform_float`."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * _U_SCALE


@triton.jit
def _sincos(theta):
    """(sin, cos) of theta in [0, 2 pi) with one shared reduction: theta - j pi/2 (three-part
    Cody-Waite constant, j <= 4 so j * the first part is exact) lands in [-pi/4, pi/4], where
    Cephes' single-precision polynomials hold to ~1e-7 absolute; the quadrant j & 3 swaps and
    negates them."""
    j = (theta * 0.6366197723675814 + 0.5).to(tl.int32)
    jf = j.to(tl.float32)
    phi = theta - jf * 1.5703125
    phi = phi - jf * 4.837512969970703e-4
    phi = phi - jf * 7.549789954891882e-8
    z = phi * phi
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * phi + phi
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z
    c = c - 0.5 * z + 1.0
    q = j & 3
    swap = (q & 1) != 0
    sa = tl.where(swap, c, s)
    ca = tl.where(swap, s, c)
    return tl.where((q & 2) != 0, -sa, sa), tl.where(((q + 1) & 2) != 0, -ca, ca)


@triton.jit
def _box_muller(ua, ub, scale):
    """Two normals of standard deviation `scale` from two uniforms (scale applied to r once)."""
    r = scale * tl.sqrt_rn(-2.0 * tl.log(tl.maximum(ua, _U_MIN)))
    sin, cos = _sincos(ub * _TWO_PI)
    return r * cos, r * sin


@triton.jit
def _seed_key(seed_ptr, row):
    s = tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
    return (s & 0xFFFFFFFF).to(tl.uint32), (s >> 32).to(tl.uint32)


@triton.jit
def _request_noise_kernel(
    seed_ptr,  # [B] int64
    length_ptr,  # [B] int32 / int64
    z_ptr,  # [B, L, D] out
    u_route_ptr,  # [B, L] fp32 out
    u_tok_ptr,  # [B, L] fp32 out
    L,
    D,
    G,
    init_noise,
    BLOCK_L: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (`yan_kernels.pdl`)
):
    grid_dependency(PDL)
    row = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_g = tl.program_id(2)
    k0, k1 = _seed_key(seed_ptr, row)
    n = tl.load(length_ptr + row)
    pos = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = pos < L
    live = pos < n
    grp = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    ctr = (pos[:, None] * G + grp[None, :]).to(tl.uint32)  # L * G < 2**31 (launcher)
    zero = ctr * 0
    w0, w1, w2, w3 = _philox4x32_10(ctr, zero, zero, zero, k0, k1)
    n0, n1 = _box_muller(_uniform(w0), _uniform(w1), init_noise)
    n2, n3 = _box_muller(_uniform(w2), _uniform(w3), init_noise)
    # join stacks on a new last axis: [BL, BG, 2 (i), 2 (j)] holds n_{2i+j}, so the reshape
    # to [BL, 4 BG] puts n_j at channel 4g + j
    z = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    z = tl.reshape(z, (BLOCK_L, 4 * BLOCK_G))
    z = tl.where(live[:, None], z, 0.0)
    cols = pid_g * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)
    base = (row.to(tl.int64) * L + pos) * D
    tl.store(
        z_ptr + base[:, None] + cols[None, :],
        z.to(z_ptr.dtype.element_ty),
        mask=in_l[:, None] & (cols < D)[None, :],
    )
    if pid_g == 0:
        p = pos.to(tl.uint32)
        zp = p * 0
        r0, r1, _, _ = _philox4x32_10(p, zp + 1, zp, zp, k0, k1)
        out = row.to(tl.int64) * L + pos
        tl.store(u_route_ptr + out, tl.where(live, _uniform(r0), 0.0), mask=in_l)
        tl.store(u_tok_ptr + out, tl.where(live, _uniform(r1), 0.0), mask=in_l)


@triton.jit
def _philox_kernel(
    ctr_ptr,  # [N, 4] int64, values in [0, 2**32)
    key_ptr,  # [N, 2] int64, values in [0, 2**32)
    out_ptr,  # [N, 4] int64 out
    N,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    i64 = i.to(tl.int64)
    c0 = tl.load(ctr_ptr + i64 * 4, mask=ok, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + i64 * 4 + 1, mask=ok, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + i64 * 4 + 2, mask=ok, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + i64 * 4 + 3, mask=ok, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + i64 * 2, mask=ok, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + i64 * 2 + 1, mask=ok, other=0).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + i64 * 4, w0.to(tl.int64), mask=ok)
    tl.store(out_ptr + i64 * 4 + 1, w1.to(tl.int64), mask=ok)
    tl.store(out_ptr + i64 * 4 + 2, w2.to(tl.int64), mask=ok)
    tl.store(out_ptr + i64 * 4 + 3, w3.to(tl.int64), mask=ok)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PHILOX_BLOCK = 128
# (BLOCK_L, BLOCK_G, num_warps) on CUDA: 2048-channel tiles; narrow models (G <= 8) take
# more positions per tile instead of masked-off groups.
_CUDA_WIDE = (16, 32, 4)
_CUDA_NARROW = (64, 8, 4)
_STAGES = 1  # no loops to pipeline


def _blocks(device: torch.device, G: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_G, num_warps). The interpreter wants few, large tiles."""
    if device.type == "cuda":
        return _CUDA_WIDE if G > 8 else _CUDA_NARROW
    return 64, min(triton.next_power_of_2(max(G, 1)), 64), 4


def _check(seed: Tensor, length: Tensor, L: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    assert seed.dim() == 1 and seed.dtype == torch.int64, f"seed {tuple(seed.shape)} {seed.dtype}"
    B = seed.shape[0]
    assert length.shape == (B,), f"length {tuple(length.shape)} for {B} seeds"
    assert length.dtype in (torch.int32, torch.int64), length.dtype
    assert seed.device == length.device, f"seed on {seed.device}, length on {length.device}"
    assert dtype in _DTYPES, dtype
    assert L >= 0 and d >= 1, (L, d)
    G = -(-d // 4)
    assert L * G < 2**31, f"L={L}, d={d}: Philox counters L * ceil(d / 4) must be < 2**31"
    return B, G


def request_noise(
    seed: Tensor,
    length: Tensor,
    L: int,
    d: int,
    init_noise: float,
    dtype: torch.dtype,
    *,
    block_l: int | None = None,
    block_g: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher. seed [B] int64, length [B] int32/int64 (positions >= length are 0),
    L and d Python ints, init_noise a Python float -> (z0 [B, L, d] dtype, u_route [B, L]
    fp32, u_tok [B, L] fp32), as the module docstring defines them.

    One launch, no host synchronization (seed and length are only read on the device), so it
    can be captured in a CUDA graph. Tile sizes default per device (`_blocks`); the overrides
    exist for tests and benchmarks, and only the defaults have AOT specs."""
    B, G = _check(seed, length, L, d, dtype)
    dev = seed.device
    bl, bg, warps = _blocks(dev, G)
    bl, bg, warps = block_l or bl, block_g or bg, num_warps or warps
    z0 = torch.empty((B, L, d), device=dev, dtype=dtype)
    u_route = torch.empty((B, L), device=dev, dtype=torch.float32)
    u_tok = torch.empty((B, L), device=dev, dtype=torch.float32)
    if B == 0 or L == 0:
        return z0, u_route, u_tok
    grid = (B, triton.cdiv(L, bl), triton.cdiv(G, bg))
    assert grid[1] < 65536 and grid[2] < 65536, f"grid {grid}: CUDA caps grid y and z at 65535"
    seed, length = seed.contiguous(), length.contiguous()
    _request_noise_kernel[grid](
        seed, length, z0, u_route, u_tok,
        L, d, G, float(init_noise),
        BLOCK_L=bl, BLOCK_G=bg, num_warps=warps, num_stages=_STAGES,
        **pdl.launch_options(seed.device),
    )  # fmt: skip
    return z0, u_route, u_tok


def _philox_ref(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor):
    """Philox-4x32-10 on int64 tensors holding uint32 values (broadcast against each other).

    A 32 x 32-bit product wraps in int64, but its low 32 bits and (p >> 32) & 0xFFFFFFFF (an
    arithmetic shift of the wrapped value) are still the true low and high words. The low words
    are carried unmasked: their upper bits only ever reach a word that is masked before it is
    multiplied. Every op writes into six buffers allocated once, because fresh half-megabyte
    results per op cost more in page faults than the arithmetic on the CPU serving path."""
    shape = torch.broadcast_shapes(*(t.shape for t in (c0, c1, c2, c3, k0, k1)))
    c0, c1, c2, c3 = (c.expand(shape).clone(memory_format=torch.contiguous_format)
                      for c in (c0, c1, c2, c3))  # fmt: skip
    p0, p1 = torch.empty_like(c0), torch.empty_like(c0)
    for _ in range(10):
        torch.mul(c0, 0xD2511F53, out=p0)
        torch.mul(c2, 0xCD9E8D57, out=p1)
        torch.bitwise_right_shift(p1, 32, out=c0)
        c0.bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(p0, 32, out=c2)
        c2.bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, p1 = p1, c1
        c3, p0 = p0, c3
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1.bitwise_and_(_MASK32), c2, c3.bitwise_and_(_MASK32)


def uniform_ref(w: Tensor) -> Tensor:
    """uint32 words (held in int64) -> float32 in [0, 1), as Triton's `uint_to_uniform_float`:
    x = int32 bits of w, and -x - 1 == ~x == x ^ (x >> 31) where x < 0."""
    x = w.to(torch.int32)  # keeps the low 32 bits: the bitcast
    x = x.bitwise_xor_(x >> 31).to(torch.float32)
    return x.mul_(torch.tensor(_U_SCALE.value, dtype=torch.float32, device=w.device))


def _seed_key_ref(seed: Tensor) -> tuple[Tensor, Tensor]:
    s = seed.to(torch.int64)
    return s & _MASK32, (s >> 32) & _MASK32


def request_noise_ref(
    seed: Tensor,
    length: Tensor,
    L: int,
    d: int,
    init_noise: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-torch reference with the launcher's signature, on seed's device, vectorised over
    the whole batch: uniforms equal to the kernel's bit for bit, normals to float32 rounding of
    log / sin / cos (module docstring). Ops run in place on buffers of its own (fresh results
    per op cost page faults on CPU)."""
    B, G = _check(seed, length, L, d, dtype)
    dev = seed.device
    k0, k1 = (k[:, None] for k in _seed_key_ref(seed))  # [B, 1]
    live = torch.arange(L, device=dev)[None, :] < length.to(dev)[:, None]  # [B, L]
    zero = torch.zeros((), device=dev, dtype=torch.int64)
    # z0: counters (l * G + g, 0, 0, 0) for all B rows at once, flattened to [B, L * G]
    ctr = torch.arange(L * G, device=dev, dtype=torch.int64)[None, :]
    w = _philox_ref(ctr, zero, zero, zero, k0, k1)
    zf = torch.empty((B, L * G, 4), device=dev, dtype=torch.float32)
    scale = float(init_noise)
    for j in (0, 2):  # Box-Muller on (u0, u1) -> channels 0, 1 and (u2, u3) -> 2, 3
        r = uniform_ref(w[j]).clamp_min_(_U_MIN.value).log_().mul_(-2.0).sqrt_().mul_(scale)
        theta = uniform_ref(w[j + 1]).mul_(_TWO_PI.value)
        torch.mul(r, torch.cos(theta), out=zf[..., j])
        torch.mul(r, theta.sin_(), out=zf[..., j + 1])
    z = zf.view(B, L, 4 * G)[..., :d].to(dtype, memory_format=torch.contiguous_format)
    z.masked_fill_(~live[..., None], 0.0)
    # routing / token uniforms: counters (l, 1, 0, 0)
    pos = torch.arange(L, device=dev, dtype=torch.int64)[None, :]
    r0, r1, _, _ = _philox_ref(pos, zero + 1, zero, zero, k0, k1)
    u_route = uniform_ref(r0).masked_fill_(~live, 0.0)
    u_tok = uniform_ref(r1).masked_fill_(~live, 0.0)
    return z, u_route, u_tok


def _check_words(counter: Tensor, key: Tensor) -> int:
    N = counter.shape[0]
    assert counter.shape == (N, 4) and key.shape == (N, 2), f"{counter.shape}, {key.shape}"
    assert counter.dtype == key.dtype == torch.int64, f"{counter.dtype}, {key.dtype}"
    assert counter.device == key.device, f"{counter.device} vs {key.device}"
    return N


def philox4x32(counter: Tensor, key: Tensor) -> Tensor:
    """The kernels' Philox-4x32-10 on its own (Triton): counter [N, 4], key [N, 2] int64
    holding uint32 values -> the 4 output words [N, 4] int64 (for known-answer tests)."""
    N = _check_words(counter, key)
    out = torch.empty((N, 4), device=counter.device, dtype=torch.int64)
    if N:
        _philox_kernel[(triton.cdiv(N, _PHILOX_BLOCK),)](
            counter.contiguous(),
            key.contiguous(),
            out,
            N,
            BLOCK=_PHILOX_BLOCK,
            num_warps=4,
            num_stages=_STAGES,
        )
    return out


def philox4x32_ref(counter: Tensor, key: Tensor) -> Tensor:
    """`philox4x32` in torch: counter [N, 4], key [N, 2] int64 (uint32 values) -> [N, 4]."""
    _check_words(counter, key)
    c, k = counter & _MASK32, key & _MASK32
    return torch.stack(_philox_ref(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k[:, 0], k[:, 1]), -1)


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers pick on CUDA: each output dtype x length dtype x
    tile choice, and the Philox test kernel."""
    specs = []
    for dtype in _DTYPES:
        tname = TORCH_TO_TRITON[str(dtype).removeprefix("torch.")]
        for len_t in ("i32", "i64"):
            for bl, bg, warps in (_CUDA_WIDE, _CUDA_NARROW):
                specs.append(
                    AotSpec(
                        kernel="_request_noise_kernel",
                        signature={
                            "seed_ptr": "*i64",
                            "length_ptr": pointer(len_t),
                            "z_ptr": pointer(tname),
                            "u_route_ptr": "*fp32",
                            "u_tok_ptr": "*fp32",
                            "L": "i32",
                            "D": "i32",
                            "G": "i32",
                            "init_noise": "fp32",
                        },
                        constexprs={"BLOCK_L": bl, "BLOCK_G": bg},
                        num_warps=warps,
                        num_stages=_STAGES,
                        label=f"{tname},len={len_t},BL={bl},BG={bg}",
                    )
                )
    specs = with_pdl(specs)  # the sampler's kernel; the Philox test kernel never takes it
    specs.append(
        AotSpec(
            kernel="_philox_kernel",
            signature={"ctr_ptr": "*i64", "key_ptr": "*i64", "out_ptr": "*i64", "N": "i32"},
            constexprs={"BLOCK": _PHILOX_BLOCK},
            num_warps=4,
            num_stages=_STAGES,
            label="philox",
        )
    )
    return specs
