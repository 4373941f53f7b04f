"""The batcher on a fake worker: continuous dispatch, grouping, cancellation, OOM splitting."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from yan_serve.engine.graphs import length_bucket
from yan_serve.engine.requests import EngineRequest
from yan_serve.server.batcher import Batcher, Job, OutOfMemory


class FakeWorker:
    """Echoes each job's seed; records batch sizes; optionally fails like a full GPU."""

    def __init__(self, oom_above: int | None = None, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.oom_above = oom_above
        self.delay = delay
        self.started = threading.Event()

    def run(self, jobs):
        self.started.set()
        if self.oom_above is not None and len(jobs) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if self.delay:
            threading.Event().wait(self.delay)
        self.batches.append([j.seed for j in jobs])
        return [j.seed * 10 for j in jobs]


class GatedWorker(FakeWorker):
    """Holds its first batch until `release` is set, so that jobs queue up behind it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.release = threading.Event()

    def run(self, jobs):
        self.started.set()
        assert self.release.wait(10), "the test never released the worker"
        return super().run(jobs)


async def until_started(w: FakeWorker) -> None:
    assert await asyncio.to_thread(w.started.wait, 10), "the worker never started"


def job(seed: int, steps: int = 3, length: int = 10, **kw) -> Job:
    return Job(EngineRequest(src=[5] * length, tgt_len=length, seed=seed, steps=steps, **kw))


def run(coro):
    return asyncio.run(coro)


def test_length_bucket() -> None:
    assert [length_bucket(n) for n in (1, 16, 17, 100, 256, 257)] == [16, 16, 32, 128, 256, 512]


def test_jobs_queued_together_share_a_batch_and_get_their_own_results() -> None:
    async def main():
        w = FakeWorker()
        b = Batcher(w, max_batch_size=8, max_wait_ms=50)
        b.start()
        futs = [b.submit(job(i)) for i in range(5)]
        out = await asyncio.gather(*futs)
        await b.stop()
        return w, out

    w, out = run(main())
    assert out == [0, 10, 20, 30, 40]
    assert w.batches == [[0, 1, 2, 3, 4]]


def test_a_lone_job_on_an_idle_batcher_runs_without_waiting() -> None:
    async def main():
        w = FakeWorker()
        b = Batcher(w, max_batch_size=8)  # the default: no gather window
        b.start()
        await asyncio.sleep(0.01)  # the loop is parked, waiting for work
        first = job(0)
        await b.submit(first)
        await asyncio.sleep(0.01)  # idle again after a batch
        second = job(1)
        await b.submit(second)
        await b.stop()
        return w, first, second

    w, first, second = run(main())
    assert w.batches == [[0], [1]]
    for j in (first, second):
        assert j.batch_size == 1
        assert j.t_start - j.t_enqueue < 0.05  # runs at once (not after any window)


def test_an_opt_in_window_holds_an_idle_worker_until_it_ends_or_the_batch_fills() -> None:
    """max_wait_ms > 0: a lone job waits about the window for batch-mates; a batch that fills
    up leaves at once."""

    async def main():
        w = FakeWorker()
        b = Batcher(w, max_batch_size=3, max_wait_ms=300)
        b.start()
        lone = job(0)
        await b.submit(lone)
        full = [job(i) for i in (1, 2, 3)]
        await asyncio.gather(*[b.submit(j) for j in full])
        await b.stop()
        return w, lone, full

    w, lone, full = run(main())
    assert w.batches == [[0], [1, 2, 3]]
    assert 0.25 < lone.t_start - lone.t_enqueue < 1.0
    assert all(j.t_start - j.t_enqueue < 0.1 for j in full)


def test_jobs_arriving_while_busy_run_together_as_soon_as_the_batch_ends() -> None:
    async def main():
        w = GatedWorker()
        b = Batcher(w, max_batch_size=32, max_wait_ms=0)
        b.start()
        first = job(0)
        f0 = b.submit(first)
        await until_started(w)
        later = [job(i) for i in range(1, 21)]
        futs = [b.submit(j) for j in later]
        depth_while_busy = b.metrics.queue_depth._value.get()
        w.release.set()
        out = await asyncio.gather(f0, *futs)
        drained = await b.drain(1.0)
        depth_after = b.metrics.queue_depth._value.get()
        await b.stop()
        return w, b, out, first, later, depth_while_busy, drained, depth_after

    w, b, out, first, later, depth_while_busy, drained, depth_after = run(main())
    assert out == [i * 10 for i in range(21)]
    assert w.batches == [[0], list(range(1, 21))]
    assert depth_while_busy == 20 and depth_after == 0
    assert drained and b.idle
    assert all(j.batch_size == 20 for j in later)
    # The next batch leaves when the running one returns, not after the 500 ms window.
    assert later[0].t_start - first.t_end < 0.05


def test_a_backlog_is_served_in_batches_of_max_size_in_arrival_order() -> None:
    async def main():
        w = GatedWorker()
        b = Batcher(w, max_batch_size=8, max_wait_ms=0)
        b.start()
        futs = [b.submit(job(0))]
        await until_started(w)
        futs += [b.submit(job(i)) for i in range(1, 33)]
        w.release.set()
        out = await asyncio.gather(*futs)
        await b.stop()
        return w, out

    w, out = run(main())
    assert out == [i * 10 for i in range(33)]
    assert w.batches == [[0]] + [list(range(i, i + 8)) for i in range(1, 33, 8)]


def test_jobs_arriving_while_busy_are_batched_per_key_oldest_key_first() -> None:
    async def main():
        w = GatedWorker()
        b = Batcher(w, max_batch_size=8, max_wait_ms=0)
        b.start()
        futs = [b.submit(job(0, steps=5))]
        await until_started(w)
        kinds = {
            1: {},
            2: {"steps": 4},
            3: {"length": 100},
            4: {},
            5: {"steps": 4},
            6: {"target": [1, 2]},
            7: {},
        }
        futs += [b.submit(job(i, **kw)) for i, kw in kinds.items()]
        w.release.set()
        out = await asyncio.gather(*futs)
        await b.stop()
        return w, out

    w, out = run(main())
    assert out == [i * 10 for i in range(8)]
    assert w.batches == [[0], [1, 4, 7], [2, 5], [3], [6]]


def test_jobs_cancelled_while_queued_behind_a_running_batch_are_dropped() -> None:
    async def main():
        w = GatedWorker()
        b = Batcher(w, max_batch_size=8, max_wait_ms=0)
        b.start()
        first = b.submit(job(0))
        await until_started(w)
        futs = {i: b.submit(job(i)) for i in range(1, 6)}
        futs[2].cancel()
        futs[4].cancel()
        queued = b.queued
        w.release.set()
        out = await asyncio.gather(first, futs[1], futs[3], futs[5])
        await b.stop()
        return w, b, out, queued

    w, b, out, queued = run(main())
    assert queued == 3
    assert out == [0, 10, 30, 50]
    assert w.batches == [[0], [1, 3, 5]]
    assert b.metrics.queue_depth._value.get() == 0


def test_batches_hold_only_compatible_jobs_and_respect_max_size() -> None:
    async def main():
        w = FakeWorker()
        b = Batcher(w, max_batch_size=2, max_wait_ms=20)
        b.start()
        jobs = [job(0), job(1, steps=4), job(2), job(3, length=100), job(4)]
        out = await asyncio.gather(*(b.submit(j) for j in jobs))
        await b.stop()
        return w, out

    w, out = run(main())
    assert out == [0, 10, 20, 30, 40]
    assert sorted(map(sorted, w.batches)) == [[0, 2], [1], [3], [4]]


def test_out_of_memory_splits_the_batch_and_a_lone_misfit_fails_alone() -> None:
    async def main(oom_above):
        w = FakeWorker(oom_above=oom_above)
        b = Batcher(w, max_batch_size=8, max_wait_ms=30)
        b.start()
        futs = [b.submit(job(i)) for i in range(7)]
        res = await asyncio.gather(*futs, return_exceptions=True)
        await b.stop()
        return w, res, b

    w, res, b = run(main(2))
    assert res == [0, 10, 20, 30, 40, 50, 60]
    assert all(len(x) <= 2 for x in w.batches) and sum(map(len, w.batches)) == 7
    assert b.metrics.oom_splits._value.get() > 0

    w, res, _ = run(main(0))
    assert all(isinstance(r, OutOfMemory) for r in res)


def test_cancelled_jobs_are_dropped_before_they_run() -> None:
    async def main():
        w = FakeWorker(delay=0.2)
        b = Batcher(w, max_batch_size=1, max_wait_ms=0)
        b.start()
        first = b.submit(job(0))
        await asyncio.get_running_loop().run_in_executor(None, w.started.wait)
        doomed = [b.submit(job(i)) for i in range(1, 4)]
        kept = b.submit(job(9))
        for f in doomed:
            f.cancel()
        out = await asyncio.gather(first, kept)
        await b.stop()
        return w, out

    w, out = run(main())
    assert out == [0, 90]
    assert w.batches == [[0], [9]]


def test_admission_counts_queued_jobs() -> None:
    async def main():
        b = Batcher(FakeWorker(), max_queue=3, max_wait_ms=1000)
        assert b.admit(3) and not b.admit(4)
        f = b.submit(job(0))
        assert b.admit(2) and not b.admit(3)
        f.cancel()
        assert b.admit(3)

    run(main())


def test_a_worker_bug_fails_its_jobs_not_the_loop() -> None:
    class Broken(FakeWorker):
        def run(self, jobs):
            if jobs[0].seed == 0:
                raise KeyError("bug")
            return super().run(jobs)

    async def main():
        b = Batcher(Broken(), max_batch_size=1, max_wait_ms=0)
        b.start()
        bad = b.submit(job(0))
        with pytest.raises(KeyError):
            await bad
        good = await b.submit(job(1))
        await b.stop()
        return good

    assert run(main()) == 10


def test_a_failing_job_fails_alone_and_its_batch_mates_get_their_results() -> None:
    """A batch that raises is split until the job that raises runs alone: it gets its own
    exception, the others their results (as for out of memory)."""

    class Picky(FakeWorker):
        def run(self, jobs):
            for j in jobs:
                if j.seed in (3, 6):
                    raise (ValueError if j.seed == 3 else RuntimeError)(f"job {j.seed}")
            return super().run(jobs)

    async def main():
        w = Picky()
        b = Batcher(w, max_batch_size=8, max_wait_ms=50)
        b.start()
        jobs = [job(i) for i in range(8)]
        res = await asyncio.gather(*(b.submit(j) for j in jobs), return_exceptions=True)
        await b.stop()
        return w, jobs, res

    w, jobs, res = run(main())
    assert all(j.batch_size == 8 for j in jobs)  # they did share a batch
    assert [r for i, r in enumerate(res) if i not in (3, 6)] == [0, 10, 20, 40, 50, 70]
    assert isinstance(res[3], ValueError) and str(res[3]) == "job 3"
    assert isinstance(res[6], RuntimeError) and str(res[6]) == "job 6"
    assert sorted(s for batch in w.batches for s in batch) == [0, 1, 2, 4, 5, 7]


def test_queue_depth_drops_as_soon_as_queued_jobs_are_cancelled() -> None:
    """Not only when the running batch returns: the gauge is the autoscaling signal."""

    async def main():
        w = GatedWorker()
        b = Batcher(w, max_batch_size=8, max_wait_ms=0)
        b.start()
        first = b.submit(job(0))
        await until_started(w)
        queued = [b.submit(job(i)) for i in range(1, 6)]
        before = b.metrics.queue_depth._value.get()
        queued[0].cancel()
        await asyncio.sleep(0)
        one_gone = b.metrics.queue_depth._value.get()
        for f in queued:
            f.cancel()
        await asyncio.sleep(0)
        all_gone = b.metrics.queue_depth._value.get()
        w.release.set()
        await first
        await b.stop()
        return before, one_gone, all_gone

    assert run(main()) == (5, 4, 0)


def test_stop_does_not_wait_for_the_running_batch() -> None:
    """Waiting would block the event loop, and so the shutdown, until the batch ends."""

    async def main():
        w = GatedWorker()
        b = Batcher(w, max_batch_size=8, max_wait_ms=0)
        b.start()
        b.submit(job(0))
        await until_started(w)
        threading.Timer(2.0, w.release.set).start()  # the batch ends 2 s from now
        t0 = time.perf_counter()
        await b.stop()
        took = time.perf_counter() - t0
        busy = b.model_busy
        await asyncio.to_thread(w.release.wait)
        await asyncio.sleep(0.1)
        return took, busy, b.model_busy

    took, busy_at_stop, busy_later = run(main())
    assert took < 0.5, took
    assert busy_at_stop and not busy_later
