"""The engine's worker: continuous batching of compressed caches under one KV memory limit.

One thread owns the model. Each turn it drops waiting jobs whose client left, starts the next
prefill when the job at the head of the queue fits (first come, first served: a large prompt is
not overtaken), runs one decode step of the running batch (one forward for every running
request, each over its own cache), then gives the prefill about as long, a few decoder layers
at a time (`layer_turns`), so running streams keep moving while a long prompt is prefilled.
A finished prefill joins the batch at the next step; a finished, stopped or cancelled request
leaves at once and frees its reservation.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Protocol

from adaptive_kv.decode import Decoded, DecodingRequest, RunningBatch, greedy
from adaptive_kv.memory import in_use_nbytes
from adaptive_kv.services.admission import KvLedger
from adaptive_kv.services.errors import EngineError
from adaptive_kv.services.host_memory import release_free_memory
from adaptive_kv.services.layer_turns import SteppedRun
from adaptive_kv.services.metrics import Metrics

logger = logging.getLogger(__name__)

IDLE_TURN_S = 0.1  # prefill slice when nothing decodes: short enough to notice a client that left


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
        """The forward (run a few layers at a time, on its own thread)."""

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


@dataclass(eq=False)
class _Prefilling:
    job: Job
    run: SteppedRun


class QueueFull(Exception):
    """The waiting queue holds `max_queue` jobs."""


class Scheduler:
    """The waiting queue, the one prefill in progress and the running batch, on one worker thread."""

    def __init__(self, model: Any, metrics: Metrics, ledger: KvLedger, *, max_batch: int, max_queue: int,
                 timeout_error: Callable[[], EngineError]) -> None:
        self.model, self.metrics, self.ledger = model, metrics, ledger
        self.max_batch, self.max_queue = max_batch, max_queue
        self._timeout_error = timeout_error
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._closing = False
        self._prefill: _Prefilling | None = None
        self._batch = RunningBatch(model)
        self._decoding: dict[DecodingRequest, tuple[Job, Decoding]] = {}
        self._thread: threading.Thread | None = None
        self.peak_in_use = 0  # most KV bytes held at once, read between steps
        self.peak_batch = 0  # most requests decoding together
        metrics.kv_limit.set(ledger.limit)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve_forever, name="adaptive-kv-engine", daemon=True)
        self._thread.start()

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
        return bool(self._waiting or self._batch.running or self._prefill)

    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._busy() and not self._closing:
                    self._cond.wait()
                if not self._busy():
                    return
                self._drop_gone()
                self._admit()
            step_seconds = self._step() if self._batch.running else None
            if self._prefill is not None:
                self._advance_prefill(step_seconds)
            try:
                self._publish()
            except Exception:  # metrics must never stop the worker
                logger.exception("could not publish the engine's metrics")

    def _drop_gone(self) -> None:
        """Waiting jobs whose client left or whose deadline passed never reach a prefill."""
        for job in [j for j in self._waiting if not j.live]:
            self._waiting.remove(job)
            job.emit(self._timeout_error())

    def _admit(self) -> None:
        """Start the head job's prefill when no prefill runs, the batch has room and its bytes fit."""
        if self._prefill is not None or not self._waiting:
            return
        if len(self._batch.running) + 1 > self.max_batch:
            return
        job = self._waiting[0]
        if not self.ledger.fits(job.reserve):
            return
        self._waiting.popleft()
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.queue_wait.observe(time.monotonic() - job.enqueued)
        self.ledger.reserve(job, job.reserve)
        self._prefill = _Prefilling(job, SteppedRun(self.model, job.work.prefill))

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
        picked = size  # every running request picked one token this step
        if seconds > 0:
            self.metrics.tokens_per_second.set(picked / seconds)
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

    def _advance_prefill(self, step_seconds: float | None) -> None:
        prefill = self._prefill
        if not prefill.job.live:  # the client left mid-prefill: stop at the next layer and free its bytes
            prefill.run.cancel()
            self._end_prefill(self._timeout_error())
            return
        if not prefill.run.advance(IDLE_TURN_S if step_seconds is None else step_seconds):
            return
        job, run = prefill.job, prefill.run
        if run.error is not None:
            error = run.error
            if not isinstance(error, EngineError):
                logger.error("request failed", exc_info=error)
                error = EngineError(f"internal error: {type(error).__name__}: {error}", kind="internal")
            self._end_prefill(error)
            return
        try:
            outcome = job.work.prefilled(run.result, run.seconds, job)
        except EngineError as exc:
            self._end_prefill(exc)
            return
        except Exception as exc:
            logger.exception("request failed")
            self._end_prefill(EngineError(f"internal error: {type(exc).__name__}: {exc}", kind="internal"))
            return
        if not isinstance(outcome, Decoding):
            self._end_prefill(outcome)
            return
        if outcome.reserve > job.reserve:  # the bound in adaptive_kv.memory failed: say so, stay correct
            logger.error("request holds %d bytes, above its reservation of %d", outcome.reserve, job.reserve)
        self.ledger.reserve(job, outcome.reserve)
        seq = self._batch.join(outcome.cache, outcome.logits, outcome.max_tokens, eos=outcome.eos, pick=outcome.pick,
                               on_token=outcome.on_token, live=lambda: job.live)
        self._decoding[seq] = (job, outcome)
        self._prefill = None
        release_free_memory()  # the prefill's temporaries are gone

    def _end_prefill(self, event: Any) -> None:
        job = self._prefill.job
        self._prefill = None
        self.ledger.release(job)
        job.emit(event)
        release_free_memory()

    def in_use_nbytes(self) -> int:
        """KV bytes the running requests' caches (and the one in prefill) hold now; read between steps."""
        caches = [decoding.cache for _, decoding in self._decoding.values()]
        prefilling = getattr(self._prefill.job.work, "cache", None) if self._prefill else None
        return sum(in_use_nbytes(cache) for cache in caches + ([prefilling] if prefilling is not None else []))

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
        m.running.set(len(self._batch.running) + (self._prefill is not None))
        with self._cond:
            m.queue_depth.set(len(self._waiting))
