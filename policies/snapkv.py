"""SnapKV eviction policy (see the class docstring for the paper)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.policies.base import EvictionPolicy
from adaptive_kv.policies.registry import register


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV (arXiv:2404.14469): keep the tokens the observation window attends to most, max-pooled
    so neighbours of a strong token stay too.

    Every head keeps the same number of tokens, the most the budget allows in full precision.
    """

    scorer: str = "snapkv"
