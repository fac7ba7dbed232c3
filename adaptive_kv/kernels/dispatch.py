"""One dispatch point for the packed-KV kernels.

The torch reference always runs and is the specification. Faster backends register here with a
function listing why they cannot run on a device; when one is asked for but cannot run, the
reasons are logged once and the reference is used (vLLM's attention-backend registry idea).
Override the choice with ``ADAPTIVE_KV_BACKEND=torch|triton``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Callable

import torch

logger = logging.getLogger(__name__)
ENV_VAR = "ADAPTIVE_KV_BACKEND"


@dataclass(frozen=True)
class KernelBackend:
    """A named set of kernels: the module that implements them and why it may not run."""

    name: str
    load: Callable[[], ModuleType]
    unavailable_reasons: Callable[[torch.device], list[str]]


def _torch_reasons(device: torch.device) -> list[str]:
    return []


def _load_torch() -> ModuleType:
    from adaptive_kv.kernels import reference

    return reference


def _triton_reasons(device: torch.device) -> list[str]:
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        reasons.append("device is not CUDA and TRITON_INTERPRET is not set")
    if device.type == "cuda" and not interpreted and not torch.cuda.is_available():
        reasons.append("CUDA is not available")
    return reasons


def _load_triton() -> ModuleType:
    # imported only here: importing adaptive_kv never imports triton
    from adaptive_kv.kernels import triton_backend

    return triton_backend


_BACKENDS: dict[str, KernelBackend] = {
    "torch": KernelBackend("torch", _load_torch, _torch_reasons),
    "triton": KernelBackend("triton", _load_triton, _triton_reasons),
}


def register_backend(backend: KernelBackend) -> None:
    """Make a backend selectable by name."""
    _BACKENDS[backend.name] = backend


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends."""
    return tuple(_BACKENDS)


@lru_cache(maxsize=None)
def _warn_once(name: str, device: str, reasons: tuple[str, ...]) -> None:
    logger.warning("kernel backend %r cannot run on %s (%s); using the torch reference", name, device, "; ".join(reasons))


def get_backend(device: torch.device | str = "cpu", name: str | None = None) -> ModuleType:
    """The kernel module to use on `device`: `name`, else $ADAPTIVE_KV_BACKEND, else the best available."""
    device = torch.device(device)
    default = "triton" if device.type == "cuda" and "triton" in _BACKENDS else "torch"
    requested = name or os.environ.get(ENV_VAR) or default
    if requested not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {available_backends()}, got {requested!r}")
    reasons = _BACKENDS[requested].unavailable_reasons(device)
    if reasons:
        _warn_once(requested, str(device), tuple(reasons))
        requested = "torch"
    return _BACKENDS[requested].load()
