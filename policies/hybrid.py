"""Hybrid: SnapKV eviction and uniform quantisation, split by estimated error."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.plan import Plan
from adaptive_kv.policies.base import EvictionPolicy, check_fraction, tokens_for_budget
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import TOP_MASS_FRACTIONS, AttentionStats

HYBRID_BITS = (16, 8, 4, 2)


def retained_mass(stats: AttentionStats, fraction: float) -> float:
    """Mean attention mass held by the top `fraction` of tokens (top-mass curve, interpolated)."""
    curve = [(0.0, 0.0)]
    curve += [(f, stats.feature(f"top{int(f * 100)}_mass").mean().item()) for f in TOP_MASS_FRACTIONS]
    curve.append((1.0, 1.0))
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if fraction <= x1:
            return y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)
    return 1.0


def estimated_error(stats: AttentionStats, keep: int | None, bits: int, qerr_weight: float) -> float:
    """Evicted attention mass at `keep` plus weighted mean K/V quantisation error at `bits`."""
    fraction = 1.0 if keep is None else min(1.0, keep / stats.seq_len)
    qerr = 0.0
    if bits != 16:
        qerr = (stats.feature(f"key_qerr_{bits}").mean() + stats.feature(f"value_qerr_{bits}").mean()).item() / 2
    return 1.0 - retained_mass(stats, fraction) + qerr_weight * qerr


@register("hybrid")
@dataclass(frozen=True)
class Hybrid(EvictionPolicy):
    """SnapKV eviction (arXiv:2404.14469) plus uniform KIVI-style quantisation (arXiv:2402.02750).

    Rule: for each bit-width b in 16/8/4/2 (keys = values) take the largest uniform keep meeting
    the budget, and estimate its error as the attention mass evicted (1 - the top-mass curve
    `top{1,5,10,25,50}_mass`, interpolated linearly, at keep / seq_len) plus `qerr_weight` x the
    mean relative round-trip error of keys and values at b (`key_qerr_b`, `value_qerr_b`; 0 at 16
    bits), both averaged over layers and heads. The lowest estimate wins; ties go to more bits.
    """

    qerr_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("qerr_weight", self.qerr_weight, high=1e6, open_low=False)

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """Uniform keep and bits with the lowest estimated error within the budget."""
        layout, best, error = self.layout(), None, None
        for bits in HYBRID_BITS:
            try:
                keep = tokens_for_budget(stats, budget, layout, key_bits=bits, value_bits=bits)
            except InfeasibleBudget as exc:  # another bit-width may still fit
                error = exc
                continue
            candidate = (estimated_error(stats, keep, bits, self.qerr_weight), keep, bits)
            best = candidate if best is None or candidate[0] < best[0] else best
        if best is None:
            raise error
        _, keep, bits = best
        return Plan.uniform(stats.num_layers, stats.num_kv_heads, keep=keep, key_bits=bits, **layout.keywords())
