"""The dynamic batcher on a fake worker: grouping, waiting, cancellation, OOM splitting."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from yan_serve.server.batcher import Batcher, Job, OutOfMemory, length_bucket


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


def job(seed: int, steps: int = 3, length: int = 10, **kw) -> Job:
    return Job(src=[5] * length, tgt_len=length, seed=seed, steps=steps, **kw)


def run(coro):
    return asyncio.run(coro)


def test_length_bucket() -> None:
    assert [length_bucket(n) for n in (1, 16, 17, 100, 256, 257)] == [16, 16, 32, 128, 256, 512]


def test_jobs_wait_for_batch_mates_and_get_their_own_results() -> None:
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
