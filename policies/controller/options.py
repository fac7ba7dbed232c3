"""The controller's option grid: what one (layer, KV head) may be given.

An option is a keep fraction of the context (None = keep every token; 0 = sinks + recent window
only) and a key/value bit-width pair. A "uniform" option keeps that fraction of the head's own
tokens; a "global" option keeps what a global allocation at that fraction (KVzip's: one ranking of
every head's reconstruction scores) gives the head, read from its `recon_global_top*` share, so a
retrieval head keeps many tokens and a streaming head few under the same option. Bytes always
come from the plan's byte formula (`kept_nbytes`), so a plan assembled from options predicts (and
the cache holds) exactly what the allocator counted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaptive_kv.plan import ALLOWED_BITS, HeadBudget, Layout, Plan, kept_nbytes, window_tokens
from adaptive_kv.stats import GLOBAL_SHARE_FRACTIONS, RECON_GLOBAL_SHARE

DEFAULT_KEEPS: tuple[float | None, ...] = (None, 0.5, 0.25, 0.125, 0.0)
DEFAULT_BITS: tuple[tuple[int, int], ...] = ((16, 16), (8, 8), (4, 4), (4, 2), (2, 2))
ALLOCATIONS: tuple[str, ...] = ("uniform", "global")


@dataclass(frozen=True)
class HeadOption:
    """One choice for a head: keep fraction (None = all, 0 = sinks + window), bits, and whether the
    fraction is of the head's own tokens ("uniform") or of a global allocation ("global")."""

    keep_fraction: float | None
    key_bits: int
    value_bits: int
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "global" and self.keep_fraction not in GLOBAL_SHARE_FRACTIONS:
            raise ValueError(f"a global option's keep_fraction must be one of {GLOBAL_SHARE_FRACTIONS}, "
                             f"got {self.keep_fraction!r}")
        f = self.keep_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or not 0 <= f < 1):
            raise ValueError(f"keep_fraction must be None (keep all) or in [0, 1), got {f!r}")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in ALLOWED_BITS:
                raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {getattr(self, name)!r}")

    @property
    def share_feature(self) -> str:
        """The statistics feature holding a head's share of the global allocation (global options)."""
        return RECON_GLOBAL_SHARE[GLOBAL_SHARE_FRACTIONS.index(self.keep_fraction)]

    def budget(self, seq_len: int, floor: int) -> HeadBudget:
        """The HeadBudget of this uniform option for a context of `seq_len` tokens (floor = sinks + window)."""
        if self.allocation == "global":
            raise ValueError("a global option's keep depends on the request: use option_keeps")
        if self.keep_fraction is None:
            return HeadBudget(None, self.key_bits, self.value_bits)
        keep = max(floor, int(round(self.keep_fraction * seq_len)))
        return HeadBudget(None if keep >= seq_len else keep, self.key_bits, self.value_bits)

    def label(self) -> str:
        """Short name, e.g. 'all/K16V16', '0.25/K4V2' or 'g0.2/K4V4' (global)."""
        keep = "all" if self.keep_fraction is None else f"{self.keep_fraction:g}"
        keep = f"g{keep}" if self.allocation == "global" else keep
        return f"{keep}/K{self.key_bits}V{self.value_bits}"


def option_grid(keeps=DEFAULT_KEEPS, bits=DEFAULT_BITS, global_keeps=(), global_bits=None) -> tuple[HeadOption, ...]:
    """Every (keep, bits) pair, keep-all 16-bit first, then every global (keep, bits) pair."""
    uniform = tuple(HeadOption(k, kb, vb) for k in keeps for kb, vb in bits)
    return uniform + tuple(HeadOption(k, kb, vb, "global") for k in global_keeps for kb, vb in (global_bits or bits))


def grid_to_json(grid: tuple[HeadOption, ...]) -> list[dict[str, Any]]:
    """JSON-ready list of options ("allocation" written only for global ones: older files stay valid)."""
    out = []
    for o in grid:
        item = {"keep_fraction": o.keep_fraction, "key_bits": o.key_bits, "value_bits": o.value_bits}
        out.append(item if o.allocation == "uniform" else {**item, "allocation": o.allocation})
    return out


def grid_from_json(data: Any) -> tuple[HeadOption, ...]:
    """Inverse of `grid_to_json`, validated."""
    if not isinstance(data, list) or not data:
        raise ValueError("option grid must be a non-empty list of {keep_fraction, key_bits, value_bits}")
    if not all(isinstance(item, dict) for item in data):
        raise ValueError("option grid must be a non-empty list of {keep_fraction, key_bits, value_bits}")
    return tuple(HeadOption(**item) for item in data)


def global_keeps_from_share(share: torch.Tensor, seq_len: int, floor: int) -> torch.Tensor:
    """Keeps of a global option from the heads' shares (any shape): the head's tokens among the global
    top (share x seq_len), at least sinks + window, at most every token."""
    return (share.double() * seq_len).round().long().clamp(min=floor, max=seq_len)


def option_keeps(grid: tuple[HeadOption, ...], features: torch.Tensor, feature_names, seq_len: int,
                 floor: int, windows: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """Tokens every head holds under every option: (..., O) from features (..., F). With `windows` (one per
    layer of features (L, H, F)), a sliding layer's options are fractions of the tokens it holds
    (`plan.window_tokens`), as the learned policy plans it."""
    if windows is not None:
        return torch.stack([option_keeps(grid, features[l], feature_names, window_tokens(seq_len, window), floor)
                            for l, window in enumerate(windows)])
    columns = []
    for option in grid:
        if option.allocation == "global":
            share = features[..., list(feature_names).index(option.share_feature)]
            columns.append(global_keeps_from_share(share, seq_len, floor))
        else:
            keep = option.budget(seq_len, floor).keep
            columns.append(torch.full(features.shape[:-1], seq_len if keep is None else keep, dtype=torch.long))
    return torch.stack(columns, dim=-1)


def keeps_nbytes(grid: tuple[HeadOption, ...], keeps: np.ndarray, layout: Layout, head_dim: int,
                 dtype_bytes: int, sliding: bool = False) -> np.ndarray:
    """Bytes (N, O) of heads holding keeps (N, O) under each option's bits, scores tracked (a plan that evicts;
    `sliding`: heads of a sliding-window layer, which store every token's position)."""
    key_bits, value_bits = _grid_bits(grid)
    return kept_nbytes(keeps, key_bits, value_bits, layout, head_dim, dtype_bytes, tracks_scores=True, sliding=sliding)


@functools.lru_cache(maxsize=64)
def _grid_bits(grid: tuple[HeadOption, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Key and value bits (O,) of the grid's options: one vectorised byte count for every column."""
    return (np.array([o.key_bits for o in grid], dtype=np.int64), np.array([o.value_bits for o in grid], dtype=np.int64))


def plan_from_choices(grid: tuple[HeadOption, ...], choice, keeps: torch.Tensor, seq_len: int,
                      layout: Layout, windows: tuple[int | None, ...] | None = None) -> Plan:
    """The plan giving head (l, h) option choice[l, h] with keeps (L, H, O), for layers with these sliding
    `windows` (a head keeping every token its layer holds keeps all)."""
    rows = []
    for l in range(keeps.shape[0]):
        held = window_tokens(seq_len, None if windows is None else windows[l])
        row = []
        for h in range(keeps.shape[1]):
            option = grid[int(choice[l][h])]
            keep = int(keeps[l, h, int(choice[l][h])])
            row.append(HeadBudget(None if keep >= held else keep, option.key_bits, option.value_bits))
        rows.append(tuple(row))
    return Plan(tuple(rows), **layout.keywords(), windows=windows)


def option_bytes(grid: tuple[HeadOption, ...], layout: Layout, seq_len: int, head_dim: int,
                 dtype_bytes: int, sliding: bool = False) -> list[int]:
    """Bytes of one head under each option (exact, from Plan.head_nbytes), for a plan that evicts; `seq_len`
    is the tokens the head's layer holds, `sliding` whether it is a sliding-window layer (which stores every
    token's position)."""
    floor = layout.floor
    out = []
    for option in grid:
        budget = option.budget(seq_len, floor)
        kept = seq_len if budget.keep is None else min(budget.keep, seq_len)
        # scores are tracked whenever any head of the layer evicts; count them as the full plan will
        out.append(int(kept_nbytes(kept, budget.key_bits, budget.value_bits, layout, head_dim, dtype_bytes,
                                   tracks_scores=True, sliding=sliding)))
    return out
