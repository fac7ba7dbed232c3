"""The controller's option grid: what one (layer, KV head) may be given.

An option is a keep fraction of the context (None = keep every token; 0 = sinks + recent window
only) and a key/value bit-width pair. Its bytes always come from `Plan.head_nbytes`, so a plan
assembled from options predicts (and the cache holds) exactly what the allocator counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adaptive_kv.plan import ALLOWED_BITS, HeadBudget, Plan

DEFAULT_KEEPS: tuple[float | None, ...] = (None, 0.5, 0.25, 0.125, 0.0)
DEFAULT_BITS: tuple[tuple[int, int], ...] = ((16, 16), (8, 8), (4, 4), (4, 2), (2, 2))


@dataclass(frozen=True)
class HeadOption:
    """One choice for a head: keep fraction (None = all, 0 = sinks + window) and bits."""

    keep_fraction: float | None
    key_bits: int
    value_bits: int

    def __post_init__(self) -> None:
        f = self.keep_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or not 0 <= f < 1):
            raise ValueError(f"keep_fraction must be None (keep all) or in [0, 1), got {f!r}")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in ALLOWED_BITS:
                raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {getattr(self, name)!r}")

    def budget(self, seq_len: int, floor: int) -> HeadBudget:
        """The HeadBudget of this option for a context of `seq_len` tokens (floor = sinks + window)."""
        if self.keep_fraction is None:
            return HeadBudget(None, self.key_bits, self.value_bits)
        keep = max(floor, int(round(self.keep_fraction * seq_len)))
        return HeadBudget(None if keep >= seq_len else keep, self.key_bits, self.value_bits)

    def label(self) -> str:
        """Short name, e.g. 'all/K16V16' or '0.25/K4V2'."""
        keep = "all" if self.keep_fraction is None else f"{self.keep_fraction:g}"
        return f"{keep}/K{self.key_bits}V{self.value_bits}"


def option_grid(keeps=DEFAULT_KEEPS, bits=DEFAULT_BITS) -> tuple[HeadOption, ...]:
    """Every (keep, bits) pair, keep-all 16-bit first."""
    return tuple(HeadOption(k, kb, vb) for k in keeps for kb, vb in bits)


def grid_to_json(grid: tuple[HeadOption, ...]) -> list[dict[str, Any]]:
    """JSON-ready list of options."""
    return [{"keep_fraction": o.keep_fraction, "key_bits": o.key_bits, "value_bits": o.value_bits} for o in grid]


def grid_from_json(data: Any) -> tuple[HeadOption, ...]:
    """Inverse of `grid_to_json`, validated."""
    if not isinstance(data, list) or not data:
        raise ValueError("option grid must be a non-empty list of {keep_fraction, key_bits, value_bits}")
    return tuple(HeadOption(**item) for item in data)


def option_bytes(grid: tuple[HeadOption, ...], layout: dict[str, Any], seq_len: int, head_dim: int,
                 dtype_bytes: int) -> list[int]:
    """Bytes of one head under each option (exact, from Plan.head_nbytes), for a plan that evicts."""
    floor = layout["sink_tokens"] + layout["recent_window"]
    out = []
    for option in grid:
        # scores are tracked whenever any head of the plan evicts; count them as the full plan will
        evicting = HeadBudget(max(floor, 1), 16, 16)
        plan = Plan(((option.budget(seq_len, floor), evicting),), **layout)
        out.append(plan.head_nbytes(0, 0, seq_len, head_dim, dtype_bytes))
    return out
