"""The uncompressed reference: every token of every head in full precision (== DynamicCache)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.plan import Plan
from adaptive_kv.policies.base import Policy, check_fraction
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats


@register("full")
@dataclass(frozen=True)
class Full(Policy):
    """No compression; the baseline every paper compares against (e.g. SnapKV arXiv:2404.14469, Table 1).

    It compresses nothing, so it accepts only budget 1.0 (its bytes are the full cache's plus a few
    bytes of group index) and raises ValueError for any smaller budget rather than miss it.
    """

    def plan(self, stats: AttentionStats, budget: float) -> Plan:
        """The identity plan, sliding-window layers included; ValueError for budget < 1."""
        return self.plan_uniform(stats, budget).with_windows(stats.windows)

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """The identity plan; ValueError for budget < 1."""
        check_fraction("budget", budget)
        if budget < 1:
            raise ValueError(f"policy 'full' compresses nothing: budget must be 1.0, got {budget}")
        return Plan.full(stats.num_layers, stats.num_kv_heads, **self.layout().keywords())
