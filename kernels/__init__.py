"""Fused Triton kernels for YAN (issue #4), imported as `yan_kernels`.

Each kernel file holds the `@triton.jit` kernel(s), a launcher that checks shapes, strides and
dtypes, and a pure-torch `*_ref` with the same signature:

- `yan_kernels.routed_expert`: `z + dt * FFN_e(h)` computing only each token's routed expert.
- `yan_kernels.decoder_argmax`: lm_head + online softmax -> argmax token, its probability, a
  Gumbel-max sample and label log-probabilities, without materializing the [N, V] logits.

Callers go through the facades in `yan_kernels.ops` (same names as the launchers), which pick
Triton or the reference once per process. Importing this package does not import `triton`.
"""

from yan_kernels.ops import force, set_backend, use_triton

__all__ = ["force", "set_backend", "use_triton"]
