"""KV-cache policies: each turns AttentionStats and a byte budget into a Plan.

Importing this package registers the built-in policies (explicit imports below; nothing else runs).
"""

from adaptive_kv.policies.base import EvictionPolicy, Policy, tokens_for_budget
from adaptive_kv.policies.registry import available_policies, get_policy, register
from adaptive_kv.policies import (  # noqa: F401  (each module registers its policy)
    ada_kv,
    full,
    h2o,
    hybrid,
    kivi,
    kvzip,
    kvzap,
    learned,
    knorm,
    pyramidkv,
    snapkv,
    streaming_llm,
    tova,
)

__all__ = ["EvictionPolicy", "Policy", "available_policies", "get_policy", "register", "tokens_for_budget"]
