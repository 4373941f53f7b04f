"""A closed-loop load from the standard library alone: one thread per user, every user released
at the same moment, each sending its next request as soon as the last one is answered (no think
time) until a shared deadline. `run.py`'s built-in client and `scripts/gpu_smoke.py`'s bursts
both drive their users with `closed_loop`; the percentiles and the free port are theirs too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


def closed_loop(
    users: int,
    duration: float,
    user: Callable[[int, Callable[[], float]], None],
    join_timeout: float | None = None,
) -> float:
    """Run `user(uid, start)` for uid 0 .. users - 1, one thread each, and return the wall
    seconds from the release to the last user's end (each joined for at most `join_timeout`).
    A user prepares (its order, its connection), then calls `start()`, which returns once every
    user is ready, with the deadline on the `time.perf_counter` clock; it sends requests until
    then. A request still in flight at the deadline finishes and counts."""
    barrier = threading.Barrier(users + 1)
    deadline = [0.0]

    def start() -> float:
        barrier.wait()
        return deadline[0]

    threads = [threading.Thread(target=user, args=(u, start), daemon=True) for u in range(users)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration
    barrier.wait()
    for t in threads:
        t.join(join_timeout)
    return time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
