"""The engine's worker: continuous batching of compressed caches under one KV memory limit.

One thread owns the model. Each turn it drops waiting jobs whose client left, starts the next
prefill when the job at the head of the queue fits (first come, first served: a large prompt is
not overtaken), else runs one decode step of the running batch (one forward for every running
request, each over its own cache). During a prefill, a decode step runs between its decoder
layers whenever the prefill has had about as long as the last step took (`layer_turns`), so
running streams keep moving while a long prompt is prefilled. A finished prefill joins the batch
at the next step; a finished, stopped or cancelled request leaves at once and frees its
reservation.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Protocol

import torch
from adaptive_kv.decode import Decoded, DecodingRequest, RunningBatch, greedy
from adaptive_kv.memory import in_use_nbytes
from adaptive_kv.services.admission import KvLedger
from adaptive_kv.services.errors import EngineError
from adaptive_kv.services.host_memory import release_free_memory
from adaptive_kv.services.layer_turns import Cancelled, turns
from adaptive_kv.services.metrics import Metrics

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long the worker sleeps when the head of the queue cannot start yet


@dataclass(eq=False)
class Decoding:
    """A prefilled request ready to join the batch: its cache, first logits, rules and final step."""

    cache: Any
    logits: Any
    max_tokens: int
    finish: Callable[[Decoded], Any]  # the job's last event (an output, or an EngineError) from its tokens
    eos: Collection[int] = ()
    pick: Callable[[Any], int] = greedy
    on_token: Callable[[list[int]], bool] | None = None
    reserve: int = 0  # bytes to hold from now on: what the cache holds plus its growth


class Work(Protocol):
    """What a job does: a forward on the prefill thread, then either decoding or a final event."""

    def prefill(self) -> Any:
        """The forward (decode steps may run between its decoder layers)."""

    def prefilled(self, result: Any, seconds: float, job: "Job") -> Decoding | Any:
        """On the worker: a Decoding to join the batch, or the job's final event."""


@dataclass(eq=False)
class Job:
    """A queued unit of work; `emit` pushes events to the awaiting coroutine from the worker thread."""

    work: Work
    emit: Callable[[Any], None]
    deadline: float
    reserve: int  # bytes held from the start of its prefill
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def live(self) -> bool:
        """False once the client left or the deadline passed: the worker drops it at the next step."""
        return not self.cancelled.is_set() and time.monotonic() < self.deadline


class QueueFull(Exception):
    """The waiting queue holds `max_queue` jobs."""


class Scheduler:
    """The waiting queue, the one prefill in progress and the running batch, on one worker thread."""

    def __init__(self, metrics: Metrics, *, max_batch: int, max_queue: int,
                 timeout_error: Callable[[], EngineError]) -> None:
        self.metrics = metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self._timeout_error = timeout_error
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._closing = False
        self._prefilling: Job | None = None
        self._last_step_s = 0.0  # how long the last decode step took: a prefill's share between steps
        self._decoding: dict[DecodingRequest, tuple[Job, Decoding]] = {}
        self._thread: threading.Thread | None = None
        self.model: Any = None
        self.ledger = KvLedger(0)
        self.peak_in_use = 0  # most KV bytes held at once, read between steps
        self.peak_batch = 0  # most requests decoding together
        self.reclaim: Callable[[int], None] | None = None  # frees ledger room held by stored contexts (bytes wanted)

    # ------------------------------------------------------------------ any thread
    def start(self, setup: Callable[[], tuple[Any, KvLedger]]) -> None:
        """Start the worker: it runs `setup` (load the model: -> model, ledger), then serves. Blocks until
        `setup` is done and raises its error here.

        The worker is the only thread that runs torch: `layer_turns` says why."""
        ready, failure = threading.Event(), []

        def main() -> None:
            try:
                self.model, self.ledger = setup()
                self._batch = RunningBatch(self.model)
                self.metrics.kv_limit.set(self.ledger.limit)
            except BaseException as exc:  # handed to start()'s caller
                failure.append(exc)
                return
            finally:
                ready.set()
            self._serve_forever()

        self._thread = threading.Thread(target=main, name="adaptive-kv-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue `job` (QueueFull when `max_queue` wait already)."""
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Take no more jobs; finish the waiting and running ones, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine still busy after %.0fs; worker left as a daemon", timeout)

    # ------------------------------------------------------------------ worker thread
    def _busy(self) -> bool:
        return bool(self._waiting or self._batch.running)

    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._busy() and not self._closing:
                    self._cond.wait()
                if not self._busy():
                    return
                self._drop_gone()
                job = self._admit()
                if job is None and not self._batch.running and self._waiting:
                    self._cond.wait(IDLE_WAIT_S)  # nothing can run yet (cannot happen while bounds hold)
            if job is not None:
                self._prefill(job)
            elif self._batch.running:
                self._step()
            self._publish_safely()

    def _drop_gone(self) -> None:
        """Waiting jobs whose client left or whose deadline passed never reach a prefill."""
        for job in [j for j in self._waiting if not j.live]:
            self._waiting.remove(job)
            job.emit(self._timeout_error())

    def _admit(self) -> Job | None:
        """The head job, taken off the queue with its bytes reserved, when the batch has room and they fit."""
        if not self._waiting or len(self._batch.running) + 1 > self.max_batch:
            return None
        job = self._waiting[0]
        if not self.ledger.fits(job.reserve) and self.reclaim is not None:
            self.reclaim(job.reserve)  # stored contexts give way to a request that needs their room
        if not self.ledger.fits(job.reserve):
            return None
        self._waiting.popleft()
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.queue_wait.observe(time.monotonic() - job.enqueued)
        self.ledger.reserve(job, job.reserve)
        return job

    def _step(self) -> float:
        """One decode step of the running batch; its seconds."""
        size = len(self._batch.running)
        start = time.perf_counter()
        try:
            finished = self._batch.step()
        except Exception as exc:  # a step serves every running request: fail them all, keep the worker
            logger.exception("decode step failed")
            error = EngineError(f"internal error: {type(exc).__name__}: {exc}", kind="internal")
            finished, self._batch.running = self._batch.running, []
            self._finish(finished, error)
            return time.perf_counter() - start
        seconds = time.perf_counter() - start
        self._last_step_s = seconds
        if seconds > 0:  # every running request picked one token this step
            self.metrics.tokens_per_second.set(size / seconds)
        self._finish(finished)
        return seconds

    def _finish(self, finished: list[DecodingRequest], error: EngineError | None = None) -> None:
        for seq in finished:
            job, decoding = self._decoding.pop(seq)
            self.ledger.release(job)
            try:
                job.emit(error if error is not None else decoding.finish(seq.result))
            except Exception as exc:
                logger.exception("request failed")
                job.emit(EngineError(f"internal error: {type(exc).__name__}: {exc}", kind="internal"))
            seq.cache = decoding.cache = None  # its bytes go now, not when the client has read its answer
        if finished:
            release_free_memory()

    def _prefill(self, job: Job) -> None:
        """Run the job's prefill, with decode steps between its layers; then it joins the batch or answers."""
        self._prefilling = job
        start = turn_start = time.perf_counter()
        in_steps = 0.0

        def between() -> None:  # before each decoder layer of the prefill
            nonlocal turn_start, in_steps
            if not job.live:  # the client left mid-prefill: stop here and free its bytes
                raise Cancelled()
            if not self._batch.running or time.perf_counter() - turn_start < self._last_step_s:
                return
            begin = time.perf_counter()
            self._step()
            self._publish_safely()
            with self._cond:
                self._drop_gone()
            turn_start = time.perf_counter()
            in_steps += turn_start - begin

        try:
            with turns(self.model, between), torch.inference_mode():
                result = job.work.prefill()
            outcome = job.work.prefilled(result, time.perf_counter() - start - in_steps, job)
        except Cancelled:
            self._end_prefill(job, self._timeout_error())
            return
        except EngineError as exc:
            self._end_prefill(job, exc)
            return
        except Exception as exc:
            logger.exception("request failed")
            self._end_prefill(job, EngineError(f"internal error: {type(exc).__name__}: {exc}", kind="internal"))
            return
        if not isinstance(outcome, Decoding):
            self._end_prefill(job, outcome)
            return
        if outcome.reserve > job.reserve:  # the bound in adaptive_kv.memory failed: say so, stay correct
            logger.error("request holds %d bytes, above its reservation of %d", outcome.reserve, job.reserve)
        self.ledger.reserve(job, outcome.reserve)
        seq = self._batch.join(outcome.cache, outcome.logits, outcome.max_tokens, eos=outcome.eos, pick=outcome.pick,
                               on_token=outcome.on_token, live=lambda: job.live)
        self._decoding[seq] = (job, outcome)
        self._prefilling = None
        release_free_memory()  # the prefill's temporaries are gone

    def _end_prefill(self, job: Job, event: Any) -> None:
        self._prefilling = None
        self.ledger.release(job)
        job.emit(event)
        release_free_memory()

    def in_use_nbytes(self) -> int:
        """KV bytes the running requests' caches (and the one in prefill) hold now; read between steps."""
        caches = [decoding.cache for _, decoding in self._decoding.values()]
        prefilling = getattr(self._prefilling.work, "cache", None) if self._prefilling else None
        return sum(in_use_nbytes(cache) for cache in caches + ([prefilling] if prefilling is not None else []))

    def _publish_safely(self) -> None:
        try:
            self._publish()
        except Exception:  # metrics must never stop the worker
            logger.exception("could not publish the engine's metrics")

    def _publish(self) -> None:
        in_use = self.in_use_nbytes()
        self.peak_in_use = max(self.peak_in_use, in_use)
        self.peak_batch = max(self.peak_batch, len(self._batch.running))
        m = self.metrics
        m.kv_in_use.set(in_use)
        m.kv_peak.set(self.peak_in_use)
        m.kv_reserved.set(self.ledger.reserved)
        m.batch_size.set(len(self._batch.running))
        m.batch_peak.set(self.peak_batch)
        m.running.set(len(self._batch.running) + (self._prefilling is not None))
        with self._cond:
            m.queue_depth.set(len(self._waiting))
