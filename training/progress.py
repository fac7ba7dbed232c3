"""Epoch ticks from the Ray workers to the driver's progress bar, on a best-effort channel.

The ticks travel through a Ray queue actor. The bar is cosmetic, so a queue that died (killed, out of
memory alongside the workers) must not fail a trial or stop training: a worker whose queue is gone drops
its ticks, and the driver makes a new queue for the trials it starts next.
"""

from __future__ import annotations

from typing import Any, Callable


def _queue() -> Any:
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})  # no CPU of its own: the workers hold them all


def send_tick(queue: Any, epoch: int) -> None:
    """Put one finished epoch on `queue` (a worker's side); nothing when there is no queue or it died."""
    from ray.exceptions import RayActorError

    if queue is None:
        return
    try:
        queue.put_nowait(epoch)
    except RayActorError:
        pass


class EpochTicks:
    """The driver's side: the queue handed to new trials and the count of ticks since the last look."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self.queue = _queue()

    def drain(self) -> int:
        """Ticks that arrived since the last call; a dead queue is replaced (its ticks are lost)."""
        from ray.exceptions import RayActorError

        try:
            waiting = self.queue.qsize()
            return len(self.queue.get_nowait_batch(waiting)) if waiting else 0
        except RayActorError as error:
            self._log(f"the progress queue died ({type(error).__name__}); a new one serves the next trials")
            self.queue = _queue()
            return 0
