"""The Policy contract and the byte arithmetic every policy shares.

A policy turns one request's AttentionStats and a budget into a Plan. The budget is a fraction in
(0, 1] of the full-precision cache's bytes for `stats.seq_len` tokens (`Plan.full_nbytes`: a
sliding-window layer counts only the tokens it holds), and
every policy meets it exactly by the Plan's own prediction (`Plan.nbytes`), which the cache's real
bytes match. Helpers here size plans in bytes, so eviction and quantisation share one axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.plan import POSITION_BYTES, SELECTIONS, TOKEN_SCORERS, HeadBudget, Layout, Plan, check_int
from adaptive_kv.stats import AttentionStats, StatsConfig


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0, open_low: bool = True) -> None:
    """Raise ValueError naming `name` unless `value` is a real number in (low, high] (or [low, high])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def check_layer(stats: AttentionStats, layer_idx: int, num_layers: int) -> None:
    """Raise ValueError unless `stats` is one layer's and `layer_idx` is in [0, num_layers)."""
    if stats.num_layers != 1:
        raise ValueError(f"plan_layer takes one layer's statistics (AttentionStats.layer), got {stats.num_layers} layers")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, {num_layers - 1}], got {layer_idx}")


@dataclass(frozen=True)
class Policy:
    """Base of every policy: the shared cache layout; subclasses implement `plan`.

    `selection` says how a layer's heads rank tokens (`Plan.selection`): "per_head" or "shared".
    """

    sink_tokens: int = 4
    recent_window: int = 32
    group_size: int = 32
    selection: str = "per_head"

    def __post_init__(self) -> None:
        check_int("sink_tokens", self.sink_tokens, 0, 1024)
        check_int("recent_window", self.recent_window, 0, 65536)
        check_int("group_size", self.group_size, 1, 4096)
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two in [1, 4096], got {self.group_size}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")

    def layout(self, **overrides: Any) -> Layout:
        """The layout of this policy's plans (sinks, window, group, scorer, selection), with `overrides`."""
        scorer = getattr(self, "scorer", TOKEN_SCORERS[0])
        fields = dict(sink_tokens=self.sink_tokens, recent_window=self.recent_window, group_size=self.group_size,
                      scorer=scorer, selection=self.selection)
        return Layout(**{**fields, **overrides})

    def weights_digest(self) -> str | None:
        """A digest of the learned weights this policy plans with (None: it has none), so a record of
        its results can tell one trained policy from another under the same name."""
        return None

    def stats_config(self) -> StatsConfig:
        """What the cache must read during prefill for this policy (give it to `CompressedCache`)."""
        reconstruction = getattr(self, "scorer", None) == "reconstruction"
        return StatsConfig(sink_tokens=self.sink_tokens, group_size=self.group_size, reconstruction=reconstruction)

    def plan(self, stats: AttentionStats, budget: float) -> Plan:
        """The Plan for this request within `budget` x the full-precision cache bytes (shape from `stats`).

        Sliding-window layers hold only their window, so the full cache's bytes count only that: the
        layers are planned in groups that hold the same tokens (`AttentionStats.window_groups`; one group
        when no layer slides), each as its own request within `budget` x its bytes (less what a sliding
        layer spends on its tokens' positions), so the whole plan meets `budget` x the real full-cache
        bytes and no sliding layer keeps more than its window.
        """
        check_fraction("budget", budget)
        groups = stats.window_groups()
        if len(groups) == 1 and stats.windows is None:
            return self.plan_uniform(stats, budget)
        rows: list[tuple[HeadBudget, ...]] = [()] * stats.num_layers
        layout = None
        for tokens, layers in groups.items():
            positions = self._position_share(stats, layers, tokens)
            if budget <= positions:
                raise InfeasibleBudget(budget, positions, tokens, "a sliding-window layer stores every token's position")
            try:
                part = self.plan_uniform(stats.held_request(layers, tokens), budget - positions)
            except InfeasibleBudget as err:  # in the caller's terms: its budget, this group's least
                raise InfeasibleBudget(budget, err.minimum + positions, tokens,
                                       f"{err.why}; layers {list(layers)} hold {tokens} tokens") from err
            layout = layout or part.layout()
            if part.layout() != layout:
                raise ValueError(f"{type(self).__name__} planned layouts {layout} and {part.layout()} for one request")
            for layer, row in zip(layers, part.heads):
                rows[layer] = row
        plan = Plan(tuple(rows), **layout.keywords(), windows=stats.windows)
        full = plan.full_nbytes(stats.seq_len, stats.head_dim, stats.dtype_bytes)
        if plan.nbytes(stats.seq_len, stats.head_dim, stats.dtype_bytes) > budget * full:
            raise ValueError(f"{type(self).__name__} missed budget {budget} on sliding-window layers")
        return plan

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """The Plan for a request whose every layer holds all `stats.seq_len` tokens, within `budget` x its bytes."""
        raise NotImplementedError

    def _position_share(self, stats: AttentionStats, layers: tuple[int, ...], tokens: int) -> float:
        """The budget fraction a group's sliding layers spend on their tokens' positions, which the
        uniform byte arithmetic counts only for an evicting head under shared selection: at most
        POSITION_BYTES per token after the sinks."""
        sliding = sum(stats.windows[layer] is not None for layer in layers)
        positions = sliding * stats.num_kv_heads * POSITION_BYTES * max(0, tokens - self.sink_tokens)
        share = positions / (len(layers) * stats.num_kv_heads * head_full_bytes(tokens, stats.head_dim, stats.dtype_bytes))
        return share

    def plan_layer(self, stats: AttentionStats, layer_idx: int, num_layers: int, budget: float) -> Plan:
        """One layer's Plan (num_layers 1) from that layer's statistics alone, within `budget` x its bytes.

        Bounded prefill asks for it as soon as the layer's forward ends (the budget is split evenly
        across layers). The default plans the one-layer statistics as a whole request: the same
        rows as `plan` for policies that decide each layer on its own; policies that spread bytes
        across layers (PyramidKV, global rankings, the controller's knapsack) override it or
        decide within the layer.
        """
        check_layer(stats, layer_idx, num_layers)
        return self.plan(stats, budget)

    def plan_per_layer(self, stats: AttentionStats, budget: float) -> Plan:
        """The Plan bounded prefill builds layer by layer for these statistics (to compare with `plan`)."""
        return Plan.stack(
            self.plan_layer(stats.layer(i), i, stats.num_layers, budget)
            for i in range(stats.num_layers)
        )


@dataclass(frozen=True)
class EvictionPolicy(Policy):
    """Uniform eviction in full precision: every head keeps its top-`scorer` tokens up to the budget.

    Heads rank tokens by one ranking shared by their layer by default (`selection="shared"`):
    measured on the project's tasks at 1k (benchmarks/results/eval_selection: passkey 20 samples,
    niah_single 10, fidelity 20, both protocols, 0.5-0.0625), shared selection lifts query-agnostic
    passkey at 0.5 / 0.25 from 70 / 20 to 100 / 90 (TOVA) and 35 / 55 to 85 / 80 (KNorm), and
    query-agnostic niah_single at 0.5 from 10 to 40-70 for every eviction policy, at a cost of at
    most 1.1 fidelity points; query-aware NIAH is mixed within a sample or two (TOVA's paper and
    kvpress average over heads too).
    """

    scorer: str = "snapkv"
    selection: str = "shared"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer not in TOKEN_SCORERS:
            raise ValueError(f"scorer must be one of {TOKEN_SCORERS}, got {self.scorer!r}")

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """The largest uniform keep meeting the budget (16-bit keys and values)."""
        keep = tokens_for_budget(stats, budget, self.layout())
        return Plan.uniform(stats.num_layers, stats.num_kv_heads, keep=keep, **self.layout().keywords())


# --------------------------------------------------------------------------- byte arithmetic
def head_full_bytes(seq_len: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes one (layer, KV head) of a DynamicCache holds for `seq_len` tokens."""
    return 2 * seq_len * head_dim * dtype_bytes


def head_bytes(keep: int | None, layout: Layout, seq_len: int, head_dim: int, dtype_bytes: int,
               key_bits: int = 16, value_bits: int = 16) -> int:
    """Predicted bytes of one head (a finite `keep` also pays its H2O scores)."""
    plan = Plan(((HeadBudget(keep, key_bits, value_bits),),), **layout.keywords())
    return plan.head_nbytes(0, 0, seq_len, head_dim, dtype_bytes)


def last_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """Largest x in [low, high] with fits(x), for fits true then false; low - 1 if none."""
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            low = mid + 1
        else:
            high = mid - 1
    return high


def max_keep(limit: float, layout: Layout, seq_len: int, head_dim: int, dtype_bytes: int,
             key_bits: int = 16, value_bits: int = 16) -> int | None:
    """Largest finite keep in [floor, seq_len] whose head bytes fit `limit`; None if none fits.

    Bytes are not monotone in keep when quantised (a full group packs and shrinks), but they rise
    within each group-sized block and block minima rise, so search blocks first, then the block.
    """
    floor, group = layout.floor, layout.group_size
    top = max(floor, seq_len)

    def fits(keep: int) -> bool:
        return head_bytes(keep, layout, seq_len, head_dim, dtype_bytes, key_bits, value_bits) <= limit

    if not fits(floor):
        return None
    block = last_fitting(lambda b: fits(floor + b * group), 0, (top - floor) // group)
    start = floor + block * group
    return last_fitting(fits, start, min(start + group - 1, top))


def floor_fraction(layout: Layout, seq_len: int, head_dim: int, dtype_bytes: int) -> float:
    """Budget fraction of a head that keeps only its sinks and recent window."""
    return head_bytes(layout.floor, layout, seq_len, head_dim, dtype_bytes) / head_full_bytes(seq_len, head_dim, dtype_bytes)


def tokens_for_budget(stats: AttentionStats, budget: float, layout: Layout, *,
                      key_bits: int = 16, value_bits: int = 16) -> int | None:
    """Largest uniform keep (None = keep all) meeting `budget` at the given bit-widths."""
    check_fraction("budget", budget)
    seq_len, head_dim, dtype_bytes = stats.seq_len, stats.head_dim, stats.dtype_bytes
    limit = budget * head_full_bytes(seq_len, head_dim, dtype_bytes)  # each head's equal share
    if head_bytes(None, layout, seq_len, head_dim, dtype_bytes, key_bits, value_bits) <= limit:
        return None
    keep = max_keep(limit, layout, seq_len, head_dim, dtype_bytes, key_bits, value_bits)
    if keep is None:
        minimum = floor_fraction(layout, seq_len, head_dim, dtype_bytes)
        raise InfeasibleBudget(budget, minimum, seq_len, "sink_tokens + recent_window stay in full precision")
    return keep


def plan_from_keeps(keeps: list[list[int]], seq_len: int, layout: Layout,
                    key_bits: int = 16, value_bits: int = 16) -> Plan:
    """A Plan from a finite keep table (L, H_kv); all None when every head keeps everything."""
    if all(k >= seq_len for row in keeps for k in row):  # keep-all needs no H2O scores: fewer bytes
        keeps = [[None] * len(row) for row in keeps]
    return Plan(tuple(tuple(HeadBudget(k, key_bits, value_bits) for k in row) for row in keeps), **layout.keywords())
