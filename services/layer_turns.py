"""Decode steps between the decoder layers of a prefill, on one thread.

The engine's worker prefills one prompt at a time. Inside `turns(between)`, a forward pre-hook on
every decoder layer calls `between()` before the layer runs, and `between` may run a decode step
of the running batch (a whole forward of its own, which the hook lets pass) or raise `Cancelled`
to stop the prefill. So running streams keep moving while a long prompt is prefilled, a
reconstruction pass inside the prefill is split the same way, and nothing is needed from the
cache (a plan still lands at the end of the prefill) or from the model beyond transformers' list
of its decoder-layer classes (`_no_split_modules`).

Everything runs on the worker thread: when two threads take turns running torch ops, each small
op of a decode step waits on the other's OpenMP workers (measured on 2 cores: a 1x576 by 576x1536
linear takes 70 us from one thread, 190 us from either of two alternating threads).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)
_state = threading.local()  # .between: the callback of the prefill running on this thread; .busy: inside it
_HOOKED = "_adaptive_kv_layer_turns"


class Cancelled(Exception):
    """Raised by `between` to stop the prefill before its next layer."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: modules of the classes transformers never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer classes (_no_split_modules); "
                         "its prefill cannot be interleaved with decode steps")
    return layers


def _before_layer(module: torch.nn.Module, args: object) -> None:
    between = getattr(_state, "between", None)
    if between is None or getattr(_state, "busy", False):  # no prefill here, or a forward `between` runs
        return
    _state.busy = True
    try:
        between()
    finally:
        _state.busy = False


def install(model: torch.nn.Module) -> None:
    """Hook every decoder layer of `model` once (idempotent). A model whose decoder layers cannot be
    found still serves: its prefills run without turns, pausing running streams while they last."""
    if getattr(model, _HOOKED, False):
        return
    try:
        layers = decoder_layers(model)
    except ValueError as exc:
        logger.warning("%s; each prefill pauses running streams while it lasts", exc)
        layers = []
    for layer in layers:
        layer.register_forward_pre_hook(_before_layer)
    setattr(model, _HOOKED, True)


@contextmanager
def turns(model: torch.nn.Module, between: Callable[[], None]) -> Iterator[None]:
    """Within this block, `between()` runs before every decoder layer of `model`'s forwards on this
    thread, except the forwards `between` itself runs."""
    install(model)
    if getattr(_state, "between", None) is not None:
        raise RuntimeError("turns() does not nest: one prefill at a time per thread")
    _state.between = between
    try:
        yield
    finally:
        _state.between = None
