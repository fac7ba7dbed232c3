"""A forward that runs a few decoder layers at a time, so a long prefill shares the engine with decode.

The engine's worker alternates: one decode step of the running batch, then the prefill of the
next request for about as long, and so on. The prefill runs on its own thread, but never at the
same time as the worker: a forward pre-hook on every decoder layer parks the prefill thread until
the worker hands it a turn (`advance`), so exactly one of the two computes at any moment and the
model needs no locking. Splitting by layer needs nothing from the cache (a compressing cache
plans at the end of its prefill as usual; a reconstruction pass is split the same way) and
nothing from the model beyond transformers' list of its decoder-layer classes (`_no_split_modules`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)
_current = threading.local()  # .run: the SteppedRun whose thread this is; unset on any other thread
_HOOKED = "_adaptive_kv_layer_turns"


class Cancelled(Exception):
    """Raised inside a stepped forward that was cancelled, at its next layer."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: modules of the classes transformers never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer classes (_no_split_modules); "
                         "its prefill cannot be run layer by layer")
    return layers


def _park(module: torch.nn.Module, args: Any) -> None:
    run = getattr(_current, "run", None)
    if run is not None:  # the worker's own forwards pass straight through
        run._park()


def install(model: torch.nn.Module) -> None:
    """Hook every decoder layer of `model` once (idempotent). A model whose decoder layers cannot be
    found still serves: its prefills run in one turn."""
    if getattr(model, _HOOKED, False):
        return
    try:
        layers = decoder_layers(model)
    except ValueError as exc:
        logger.warning("%s; each prefill runs in one turn, pausing running streams while it lasts", exc)
        layers = []
    for layer in layers:
        layer.register_forward_pre_hook(_park)
    setattr(model, _HOOKED, True)


class SteppedRun:
    """`fn()` (a forward of `model`) on its own thread, run a turn at a time by `advance`.

    A turn runs layers until the requested seconds have passed; the run parks before the next
    layer. `result` or `error` holds the outcome once `done`.
    """

    def __init__(self, model: torch.nn.Module, fn: Callable[[], Any]) -> None:
        install(model)
        self._fn = fn
        self._go = threading.Semaphore(0)
        self._parked = threading.Semaphore(0)
        self._cancel = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0  # compute time used so far
        self._thread = threading.Thread(target=self._main, name="adaptive-kv-prefill", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        _current.run = self
        self._go.acquire()
        try:
            if self._cancel:
                raise Cancelled()
            with torch.inference_mode():
                self.result = self._fn()
        except BaseException as exc:  # handed to the worker, which owns the request
            self.error = exc
        finally:
            self.done = True
            _current.run = None
            self._parked.release()

    def _park(self) -> None:
        self._parked.release()
        self._go.acquire()
        if self._cancel:
            raise Cancelled()

    def advance(self, seconds: float) -> bool:
        """Run layers for about `seconds` (at least one layer; 0 runs one); True once the forward is done."""
        start = time.perf_counter()
        while not self.done:
            self._go.release()
            self._parked.acquire()
            if time.perf_counter() - start >= seconds:
                break
        self.seconds += time.perf_counter() - start
        return self.done

    def finish(self) -> Any:
        """Run to the end; the forward's result, or its error raised here."""
        self.advance(float("inf"))
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        """Stop the forward at its next layer and wait for its thread to end."""
        if not self.done:
            self._cancel = True
            self._go.release()
            self._parked.acquire()
        self._thread.join()
