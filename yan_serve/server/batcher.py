"""Continuous batching: an asyncio queue in front of one model worker.

Jobs (one per generated candidate or scored target) wait in arrival order. Jobs can share a batch
when they have the same `Job.key` (mode, Euler time points, routing and length bucket). The
dispatch rule:

- Whenever the model thread is free and a live (not cancelled) job is waiting, the loop takes the
  oldest waiting job plus the other waiting jobs with its key, in arrival order, up to
  `max_batch_size`, and runs them at once. There is no timer: an idle worker never waits for
  batch-mates, so a lone request on an idle server starts as soon as the loop sees it.
- While a batch runs, newly arriving jobs accumulate. When it finishes, the next batch is formed
  at once by the same rule. Under load the running batch is the gather window, so batches fill
  up by themselves and grow with the arrival rate.

`max_wait_ms` (default 0) opts into a gather window on an idle worker as well: when it is above
0 and fewer than `max_batch_size` compatible jobs are waiting, the free worker waits until the
oldest job has waited that long (or the batch fills) before it runs. That trades low-load latency
for fuller batches; at 0 a free worker never waits.

The loop is the only dispatcher and awaits each batch, so at most one batch runs at a time. A job
whose future was cancelled (timeout, client gone) is dropped before it runs; a result for a job
cancelled while it ran is discarded. A batch that fails is split in halves and retried, so that a
failure stays with the job that causes it and its batch-mates get their results (a job's result
does not depend on its batch): out of device memory, a single job that still does not fit fails
alone with `OutOfMemory`; any other exception fails the single job that raises it, with that
exception.

Stopping never waits for a running batch (`stop`): past the shutdown deadline its results are
discarded, and the server exits without joining the model thread (`model_busy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from yan_serve.engine.graphs import length_bucket
from yan_serve.engine.requests import EngineRequest, Result, Runner
from yan_serve.server.metrics import Metrics

log = logging.getLogger("yan_serve.batcher")


class OutOfMemory(RuntimeError):
    """A single job did not fit in device memory."""


class ShuttingDown(RuntimeError):
    """The shutdown deadline passed before the job's result (the server answers 503)."""


@dataclass(eq=False)
class Job:
    """An `EngineRequest` in the queue, with what only the queue needs: its future and clocks.

    These live on this batcher-side wrapper rather than on the request: the worker runs on the
    model thread and sees only `EngineRequest`s, so it can never touch an asyncio future (which
    only the event loop may complete) or the queue's clocks, and the engine layer stays free of
    asyncio. The server reads the clocks back for a response's `timing`."""

    request: EngineRequest
    future: asyncio.Future | None = None  # set by `Batcher.submit`
    t_enqueue: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0
    batch_size: int = 0

    @property
    def key(self) -> tuple:
        """Jobs with the same key may share a batch: the same mode, time points and routing
        (what `Runner.run` requires) and the same length bucket (so padding stays small)."""
        r = self.request
        mode = "score" if r.scores else "generate"
        return (mode, r.steps, r.routing, length_bucket(max(len(r.src), r.tgt_len)))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


class Batcher:
    def __init__(
        self,
        worker: Runner,
        max_batch_size: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        self.worker = worker
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0  # opt-in gather window on an idle worker
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._waiting: list[Job] = []
        self._running = 0
        self._current: list[Job] = []  # the batch on the model thread
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yan-model")
        self._model_call: Future | None = None  # the batch on the model thread, once submitted
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------------------ control
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="yan-batcher")

    async def stop(self) -> None:
        """Stop the loop and cancel what is queued. A batch still on the model is not waited
        for (that would block the event loop, and so the shutdown, until it ends): its results
        are discarded, and `model_busy` says it is still running."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._waiting:
            if job.future is not None and not job.future.done():
                job.future.cancel()
        self._waiting.clear()
        self.metrics.queue_depth.set(0)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def model_busy(self) -> bool:
        """Whether the model thread is still running a batch (after `stop`: one given up on)."""
        return self._model_call is not None and not self._model_call.done()

    @property
    def queued(self) -> int:
        return sum(1 for j in self._waiting if not j.future or not j.future.done())

    @property
    def idle(self) -> bool:
        return self.queued == 0 and self._running == 0

    def abort(self, reason: str = "the server is shutting down") -> int:
        """Fail every queued job and every job of the running batch with `ShuttingDown` (their
        requests answer at once; a running batch's results are discarded when it returns).
        Returns how many jobs were failed."""
        failed = 0
        for job in [*self._current, *self._waiting]:
            if job.future is not None and not job.future.done():
                job.future.set_exception(ShuttingDown(reason))
                failed += 1
        self._waiting.clear()
        self.metrics.queue_depth.set(0)
        return failed

    def admit(self, n: int) -> bool:
        """Whether `n` more jobs fit in the queue."""
        return self.queued + n <= self.max_queue

    def submit(self, job: Job) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.t_enqueue = time.perf_counter()
        self._waiting.append(job)
        self.metrics.queue_depth.set(self.queued)
        # A job cancelled while queued (timeout, client gone) leaves the gauge at once, not when
        # the loop next looks, which is only after the running batch returns.
        job.future.add_done_callback(self._update_depth)
        self._arrived.set()
        return job.future

    def _update_depth(self, _: asyncio.Future) -> None:
        self.metrics.queue_depth.set(self.queued)

    # --------------------------------------------------------------------------------- loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._waiting = [j for j in self._waiting if not j.future.done()]
            self.metrics.queue_depth.set(len(self._waiting))
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # The worker is free (the previous batch, if any, has returned): dispatch now,
            # unless a gather window was asked for and the batch is not full yet.
            oldest = self._waiting[0]
            same = [j for j in self._waiting if j.key == oldest.key]
            wait_left = oldest.t_enqueue + self.max_wait - time.perf_counter()
            if self.max_wait > 0 and len(same) < self.max_batch_size and wait_left > 0:
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), wait_left)
                continue
            batch = same[: self.max_batch_size]
            taken = set(map(id, batch))
            self._waiting = [j for j in self._waiting if id(j) not in taken]
            self.metrics.queue_depth.set(len(self._waiting))
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        for j in batch:
            j.t_start = t0
            j.batch_size = len(batch)
            self.metrics.queue_time.observe(t0 - j.t_enqueue)
        self._running = len(batch)
        self._current = batch
        self.metrics.running.set(len(batch))
        self.metrics.batch_size.observe(len(batch))
        try:
            self._model_call = self._executor.submit(self.run_splitting, batch)
            results = await asyncio.wrap_future(self._model_call, loop=loop)
        except Exception as e:  # not the worker's (run_splitting isolates those): the executor's
            log.exception("model batch failed")
            results = [e] * len(batch)
        finally:
            self._running = 0
            self._current = []
            self.metrics.running.set(0)
        t1 = time.perf_counter()
        self.metrics.batch_time.observe(t1 - t0)
        for j, r in zip(batch, results, strict=False):
            j.t_end = t1
            if j.future.done():
                continue  # cancelled while running: drop the result
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)

    def run_splitting(self, batch: Sequence[Job]) -> list[Result | BaseException]:
        """Run a batch on the worker thread. If it fails, split it in halves and retry each, so
        that the failure ends up with the one job that causes it: out of memory, a single job
        that still does not fit gets `OutOfMemory`; otherwise the single job that raises gets
        its exception (logged here with its traceback unless it is a ValueError, the worker's
        way to refuse a request). The other jobs' results are what they would be alone."""
        try:
            return list(self.worker.run([j.request for j in batch]))
        except Exception as e:
            failure = e
        # Out of the except block: a retry's own failure is not chained to this one in the log.
        oom = is_oom(failure)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            if oom:
                self.metrics.rejected.labels("oom").inc()
                return [OutOfMemory("the request does not fit in device memory")]
            if isinstance(failure, ValueError):
                log.info("the worker refused a request: %s", failure)
            else:
                log.error("a model job failed", exc_info=failure)
            return [failure]
        if oom:
            self.metrics.oom_splits.inc()
            log.warning("out of memory on a batch of %d: splitting", len(batch))
        else:
            log.warning(
                "a batch of %d failed (%s): splitting to isolate the failing job",
                len(batch),
                type(failure).__name__,
            )
        half = len(batch) // 2
        return self.run_splitting(batch[:half]) + self.run_splitting(batch[half:])

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or running (True), or `timeout` seconds (False)."""
        deadline = time.perf_counter() + timeout
        while not self.idle:
            if time.perf_counter() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True
