"""The training actors as a pool: a worker is lent for one task and given back; a dead one is replaced.

Ray reports a worker that died (killed, out of memory, its node gone) as a `RayActorError` on the
task it was running; the pool then kills that handle for good and starts a fresh actor in its place,
so a dead actor never goes back to the free list. A run of failures in a row (trials that raise,
actors that die again and again) stops the training with the last error instead of retrying forever.
"""

from __future__ import annotations

from typing import Any


class TrainingFailed(RuntimeError):
    """Too many tasks in a row failed; the last failure is the cause."""


class WorkerPool:
    """`count` TrainingWorker actors of `model_name` on `ray`, with a consecutive-failure limit."""

    def __init__(self, ray, model_name: str, count: int, max_consecutive_failures: int) -> None:
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.ray, self.model_name, self.limit = ray, model_name, max_consecutive_failures
        self.free: list[Any] = [self._start() for _ in range(count)]
        self.lent: list[Any] = []
        self.failures_in_a_row = 0
        self.replaced = 0

    def _start(self):
        from adaptive_kv.training.search import make_worker

        return make_worker(self.ray, self.model_name)

    @property
    def workers(self) -> list[Any]:
        """Every live handle, free or lent."""
        return self.free + self.lent

    def any_worker(self):
        """A live worker for a one-off call (it stays in the pool)."""
        return self.workers[0]

    def take(self):
        """Lend a free worker (the caller gives it back with `succeeded` or `failed`)."""
        worker = self.free.pop()
        self.lent.append(worker)
        return worker

    def succeeded(self, worker) -> None:
        """The worker's task finished: it is free again and the failure run is over."""
        self.lent.remove(worker)
        self.free.append(worker)
        self.failures_in_a_row = 0

    def failed(self, worker, error: BaseException) -> None:
        """The worker's task raised `error`: replace the worker if it died, and stop after too many in a row."""
        from ray.exceptions import RayActorError

        self.lent.remove(worker)
        if isinstance(error, RayActorError):
            self.ray.kill(worker, no_restart=True)
            self.free.append(self._start())
            self.replaced += 1
        else:
            self.free.append(worker)
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.limit:
            raise TrainingFailed(f"{self.failures_in_a_row} tasks failed in a row (max_consecutive_failures="
                                 f"{self.limit}); the last: {type(error).__name__}: {error}") from error

    def shutdown(self) -> None:
        """Kill every actor (each holds a CPU)."""
        for worker in self.workers:
            self.ray.kill(worker, no_restart=True)
        self.free, self.lent = [], []
