"""KVzip: context-reconstruction scores with per-head keeps from one global ranking, plus bits."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.plan import ALLOWED_BITS, Plan
from adaptive_kv.policies.base import EvictionPolicy, check_fraction
from adaptive_kv.policies.global_allocation import allocate_globally
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats


@register("kvzip")
@dataclass(frozen=True)
class KVzip(EvictionPolicy):
    """KVzip (Kim et al., NeurIPS 2025, arXiv:2505.23416, "Query-Agnostic KV Cache Compression
    with Context Reconstruction").

    Token scores come from a second pass in which the model repeats its context (`reconstruction`,
    the default scorer; any other scorer can be given). Every (layer, head, token) score competes
    in one global ranking, so heads keep different numbers of tokens (`global_allocation`), and
    kept tokens are stored at `key_bits` / `value_bits`: 4/4 by default, which on the project's
    1k tasks scored as well as 16-bit at half the bytes (see benchmarks/results).
    """

    scorer: str = "reconstruction"
    selection: str = "per_head"  # the global ranking allocates each head its own top tokens
    key_bits: int = 4
    value_bits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in ALLOWED_BITS:
                raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {getattr(self, name)!r}")

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """Global top-k allocation of the scorer's tokens at the policy's bits, within the budget."""
        check_fraction("budget", budget)
        if self.scorer not in stats.token_scores:
            raise ValueError(f"kvzip needs {self.scorer!r} token scores; build the cache with policy.stats_config()")
        return allocate_globally(stats.token_scores[self.scorer], budget, self.layout(), head_dim=stats.head_dim,
                                 dtype_bytes=stats.dtype_bytes, key_bits=self.key_bits, value_bits=self.value_bits)
