"""PyramidKV: per-layer budgets that shrink linearly with depth."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.plan import Plan
from adaptive_kv.policies.base import EvictionPolicy, check_fraction, check_layer, floor_fraction, head_bytes
from adaptive_kv.policies.base import head_full_bytes, max_keep, plan_from_keeps
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats


def linear_weights(num_layers: int, beta: float) -> list[float]:
    """Per-layer shares of mean 1 falling linearly from 2 - 1/beta (layer 0) to 1/beta (last)."""
    if num_layers == 1:
        return [1.0]
    top, bottom = 2 - 1 / beta, 1 / beta
    return [top - layer * (top - bottom) / (num_layers - 1) for layer in range(num_layers)]


@register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(EvictionPolicy):
    """PyramidKV (arXiv:2406.02069, "Dynamic KV Cache Compression based on Pyramidal Information Funneling").

    Lower layers attend broadly, upper layers to a few tokens, so layer budgets decrease linearly
    with depth: the last layer gets 1/`beta` of the mean and layer 0 2 - 1/`beta` (the paper's
    arithmetic sequence), same total as the uniform plan. Shares are of the bytes above each head's
    sinks + window floor; bytes a layer cannot use (it keeps everything) pass to the next layer.
    Tokens within a layer are chosen by SnapKV scores.
    """

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("beta", self.beta, low=1.0, high=1e6, open_low=False)

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """Per-layer keeps from linearly decreasing byte shares; heads of a layer keep alike."""
        return self._plan(stats.num_layers, stats.num_kv_heads, stats.seq_len, budget, stats.head_dim, stats.dtype_bytes)

    def plan_layer(self, stats: AttentionStats, layer_idx: int, num_layers: int, budget: float) -> Plan:
        """Row `layer_idx` of the pyramid over `num_layers` layers: the schedule needs no other layer."""
        check_layer(stats, layer_idx, num_layers)
        if stats.windows is not None:  # the schedule's shares average to the budget only over equal layers
            raise ValueError("pyramidkv plans layer by layer only for models without sliding-window layers "
                             "(their layers hold different tokens); plan with plan_provider=")
        full = self._plan(num_layers, stats.num_kv_heads, stats.seq_len, budget, stats.head_dim, stats.dtype_bytes)
        return Plan((full.heads[layer_idx],), **full.layout().keywords())

    def _plan(self, num_layers: int, num_kv_heads: int, seq_len: int, budget: float, head_dim: int,
              dtype_bytes: int) -> Plan:
        check_fraction("budget", budget)
        layout = self.layout()
        floor_bytes = head_bytes(self.sink_tokens + self.recent_window, layout, seq_len, head_dim, dtype_bytes)
        mean = budget * head_full_bytes(seq_len, head_dim, dtype_bytes)
        if mean < floor_bytes:
            minimum = floor_fraction(layout, seq_len, head_dim, dtype_bytes)
            raise InfeasibleBudget(budget, minimum, seq_len, "sink_tokens + recent_window stay in full precision")
        keeps, spare = [], 0.0
        for weight in linear_weights(num_layers, self.beta):
            limit = floor_bytes + weight * (mean - floor_bytes) + spare
            keep = max_keep(limit, layout, seq_len, head_dim, dtype_bytes)
            spare = limit - head_bytes(keep, layout, seq_len, head_dim, dtype_bytes)  # a capped layer's rest
            keeps.append([keep] * num_kv_heads)
        return plan_from_keeps(keeps, seq_len, layout)
