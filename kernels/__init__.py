"""Fused Triton kernels for YAN, imported as `yan_kernels`.

Each kernel file holds the `@triton.jit` kernel(s), a launcher that checks shapes, strides and
dtypes, and a pure-torch `*_ref` with the same signature:

- `yan_kernels.routed_expert`: `z + dt * FFN_e(h)` computing only each token's routed expert.
- `yan_kernels.decoder_argmax`: lm_head + online softmax -> argmax token, its probability, a
  Gumbel-max sample and label log-probabilities, without materializing the [N, V] logits.
- `yan_kernels.selective_scan`: the Mamba-1 selective scan with the D skip and SiLU gate fused,
  and an adapter to mamba-ssm's kernel when that package is installed; its pure-torch scans (the
  sequential oracle, the chunked scan with its backward, the reference) are in
  `yan_kernels.chunked_scan`.
- `yan_kernels.layer_norm`: residual add + LayerNorm (+ affine) in one pass.
- `yan_kernels.noise`: per-request Philox draws (z_0 and uniforms) generated on the device.
- `yan_kernels.tma`: TMA tensor descriptors (Hopper) for the GEMM kernels' tile loads.
- `yan_kernels.aot`: ahead-of-time compilation of every kernel for sm_90 / sm_80 (no GPU).

Callers go through the facades in `yan_kernels.ops` (same names as the launchers), which pick
Triton or the reference once per process. Importing this package does not import `triton`.

The package imports nothing outside itself but torch, and only by relative imports: from the
repository root the folder is also reachable as plain `kernels` (the name of an unrelated
Hugging Face package that transformers probes for), and importing it under that name must work
and stay cheap (tests/kernels/test_import_name.py).
"""

from .ops import force, set_backend, use_triton

__all__ = ["force", "set_backend", "use_triton"]
