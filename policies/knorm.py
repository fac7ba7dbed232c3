"""KNorm eviction policy (see the class docstring for the paper)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.policies.base import EvictionPolicy
from adaptive_kv.policies.registry import register


@register("knorm")
@dataclass(frozen=True)
class KNorm(EvictionPolicy):
    """KNorm (arXiv:2406.11430, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): keep the tokens with the lowest key L2 norm, which draw the most attention.

    Every head keeps the same number of tokens, the most the budget allows in full precision.
    """

    scorer: str = "key_norm"
