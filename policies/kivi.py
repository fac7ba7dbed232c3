"""KIVI: uniform low-bit quantisation of every token, no eviction."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.plan import Plan
from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.policies.base import Policy, check_fraction
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats

KIVI_BITS = (8, 4, 2)


@register("kivi")
@dataclass(frozen=True)
class KIVI(Policy):
    """KIVI (arXiv:2402.02750, "A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

    Keys quantised per channel and values per token in groups of `group_size`; sinks and the recent
    window stay in full precision; nothing is evicted. Keys and values get the highest of 8/4/2 bits
    whose plan meets the budget; a budget below the 2-bit plan raises ValueError.
    """

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """Keep-all plan at the highest bit-width meeting the budget."""
        check_fraction("budget", budget)
        seq_len, head_dim, dtype_bytes = stats.seq_len, stats.head_dim, stats.dtype_bytes
        for bits in KIVI_BITS:
            plan = Plan.uniform(stats.num_layers, stats.num_kv_heads, keep=None, key_bits=bits, **self.layout().keywords())
            full = plan.full_nbytes(seq_len, head_dim, dtype_bytes)
            if plan.nbytes(seq_len, head_dim, dtype_bytes) <= budget * full:
                return plan
        minimum = plan.nbytes(seq_len, head_dim, dtype_bytes) / full
        raise InfeasibleBudget(budget, minimum, seq_len, "2-bit keys and values, nothing evicted")
