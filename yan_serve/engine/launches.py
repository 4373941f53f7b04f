"""Counting the kernel launches of a sample: on CUDA with the profiler, on the CPU by proxy.

At batch 1 a YAN sample is launch-bound, so the number of kernels per sample is a figure the
benchmarks report next to the time.

- CUDA (`kernel_times`, `kernel_counts`): torch.profiler's device activity, every kernel that
  ran with its device time (`kernel_counts` drops memory copies and sets).
- CPU proxy (`count_dispatched`): the torch operators a call dispatches that would launch a
  kernel on a GPU (views, allocations and other metadata-only operators are not counted), with
  each call of a fused `yan_kernels.ops` facade counted as the launches its Triton kernels take
  on a GPU, whatever implementation runs on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that never launch a kernel (metadata, views, allocation without fill)
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
    "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes",
    "unbind", "chunk", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "lift_fresh", "_to_copy_noop", "narrow", "view_as", "numpy_T", "unfold", "_reshape_alias",
    "is_same_size", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "dim",
    "is_contiguous", "stride", "size", "item",
}  # fmt: skip

# Triton launches per facade call on a GPU (the routed expert's token grouping, when the caller
# does not pass one, is counted separately: `expert_tiles` runs its torch ops normally)
FUSED_LAUNCHES = {
    "routed_expert_euler": 2,  # up-projection + GELU, down-projection + Euler
    "decoder_argmax": 2,  # vocabulary splits, fold
    "add_layer_norm": 1,
    "fused_linear": 1,  # also `linear_gelu`, which calls it
    "decode_attention": 1,
    "greedy_select": 1,
    "length_masks": 1,
    "gate_route": 1,
    "attention": 1,  # 2 when a small batch splits the keys (the merge); counted unsplit
    "request_noise": 1,
    "selective_scan": 1,
}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.muted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted:
            name = func.overloadpacket.__name__
            if name.rstrip("_") not in _NO_LAUNCH:
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _fused_facades(counter: _Counter) -> Iterator[None]:
    """Count each facade call as its GPU launches and mute what its CPU implementation runs."""
    from yan_kernels import ops

    saved = {name: getattr(ops, name) for name in FUSED_LAUNCHES}

    def wrap(name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            counter.ops[f"triton:{name}"] += FUSED_LAUNCHES[name]
            counter.muted += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter.muted -= 1

        return call

    try:
        for name, fn in saved.items():
            setattr(ops, name, wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def count_dispatched(fn: Callable[[], object]) -> Counter[str]:
    """Operators `fn()` dispatches that would launch a GPU kernel (the CPU proxy), by name."""
    counter = _Counter()
    with _fused_facades(counter), counter:
        fn()
    return counter.ops


def kernel_times(fn: Callable[[], object]) -> dict[str, tuple[int, float]]:
    """Everything `fn()` runs on the GPU (kernels, copies, sets), by name: (count, total device
    microseconds), from torch.profiler's device activity."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, tuple[int, float]] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        c, us = out.get(evt.name, (0, 0.0))
        out[evt.name] = (c + 1, us + evt.time_range.elapsed_us())
    return out


def is_copy(name: str) -> bool:
    """A memory copy or set, not a kernel launch of ours."""
    return name.startswith(("Memcpy", "Memset")) or "memcpy" in name.lower()


def kernel_counts(times: dict[str, tuple[int, float]]) -> Counter[str]:
    """The kernels of a `kernel_times` result, by name (copies and sets excluded)."""
    return Counter({name: c for name, (c, _) in times.items() if not is_copy(name)})
