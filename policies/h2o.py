"""H2O eviction policy (see the class docstring for the paper)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.policies.base import EvictionPolicy
from adaptive_kv.policies.registry import register


@register("h2o")
@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """H2O: Heavy-Hitter Oracle (arXiv:2306.14048): keep the tokens with the largest accumulated
    attention, here accumulated over the observation window (decode keeps accumulating).

    Every head keeps the same number of tokens, the most the budget allows in full precision.
    """

    scorer: str = "window"
