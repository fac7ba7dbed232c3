"""Admission by KV memory: the limit a replica's caches share, and the reservations held against it.

A request reserves the most its cache can hold before its prefill starts (`memory.request_bound_nbytes`);
once its plan lands the reservation shrinks to the bytes really held plus its decode growth, so
the bytes a plan saves become room for the next request. Reservations only ever cover what a
cache can reach, so the caches' real bytes never exceed the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
DEFAULT_FRACTION = 0.5


def parse_kv_memory(text: str) -> int | float:
    """`--kv-memory`: bytes with an optional unit (`512MiB`, `2GB`, `1000000`) or a fraction of free memory in (0, 1)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"kv_memory must be bytes (e.g. 512MiB, 2GB) or a fraction of free memory in (0, 1), got {text!r}")
    number = float(match.group(1))
    if not unit and number < 1:
        if number <= 0:
            raise ValueError(f"kv_memory as a fraction must be in (0, 1), got {text!r}")
        return number
    nbytes = int(number * _UNITS[unit])
    if nbytes < 1:
        raise ValueError(f"kv_memory must be at least 1 byte, got {text!r}")
    return nbytes


def free_memory(device: Any) -> int:
    """Bytes free for new tensors on `device` (a torch.device): the GPU's free memory, or the host's available RAM."""
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def resolve_kv_memory(value: int | float | None, device: Any) -> int:
    """The limit in bytes: `value` bytes, or that fraction (default DEFAULT_FRACTION) of what is free now."""
    if value is None:
        value = DEFAULT_FRACTION
    if isinstance(value, float):
        if not 0 < value < 1:
            raise ValueError(f"kv_memory as a fraction must be in (0, 1), got {value}")
        return int(free_memory(device) * value)
    return value


def format_bytes(nbytes: int) -> str:
    """`nbytes` in the binary unit that reads best (e.g. 512.0 MiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


@dataclass
class KvLedger:
    """Reservations against one limit, by owner. Single-threaded: the engine's worker owns it."""

    limit: int
    held: dict[object, int] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        """Bytes reserved by every owner."""
        return sum(self.held.values())

    def fits(self, nbytes: int) -> bool:
        """True when `nbytes` more fit beside what is reserved."""
        return self.reserved + nbytes <= self.limit

    def reserve(self, owner: object, nbytes: int) -> None:
        """Hold `nbytes` for `owner` (replacing what it held); the caller checked `fits`, or is shrinking."""
        self.held[owner] = nbytes

    def release(self, owner: object) -> None:
        """Free what `owner` held (nothing when it held nothing)."""
        self.held.pop(owner, None)
