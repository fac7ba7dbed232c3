"""TOVA eviction policy (see the class docstring for the paper)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.policies.base import EvictionPolicy
from adaptive_kv.policies.registry import register


@register("tova")
@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """TOVA (arXiv:2401.06104, "Transformers are Multi-State RNNs"): keep the tokens the newest
    query attends to most.

    Every head keeps the same number of tokens, the most the budget allows in full precision.
    """

    scorer: str = "last_query"
