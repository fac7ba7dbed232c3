"""Per-head keeps from one ranking of every (layer, head, token) score (KVzip, Ada-KV).

Instead of the same keep for every head, all evictable tokens of all heads compete in one list:
the plan keeps the top K of it, each head holding its own tokens among them, with K the largest
count whose Plan meets the byte budget. Heads whose tokens score high keep many; heads whose
scores are flat keep few. Any scorer works; scores are compared as they are, so use a scorer on a
common scale across heads (attention probabilities: `reconstruction`, `last_query`, `window`).
"""

from __future__ import annotations


import torch

from adaptive_kv.plan import HeadBudget, Layout, Plan
from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.policies.base import floor_fraction, last_fitting


def global_keeps(scores: torch.Tensor, count: int, sinks: int, window: int) -> torch.Tensor:
    """Keeps (L, H) when the top `count` middle tokens of scores (L, H, T) are kept globally."""
    num_layers, num_heads, seq_len = scores.shape
    recent_start = max(sinks, seq_len - window)
    fixed = min(seq_len, sinks) + (seq_len - recent_start)
    middle = scores[..., sinks:recent_start].float().reshape(num_layers * num_heads, -1)  # (L*H, M)
    owner = torch.arange(num_layers * num_heads, device=middle.device).repeat_interleave(middle.shape[1])
    order = owner[middle.flatten().argsort(descending=True, stable=True)]
    counts = torch.bincount(order[:count], minlength=num_layers * num_heads)
    return (counts + fixed).view(num_layers, num_heads)


def allocate_globally(scores: torch.Tensor, budget: float, layout: Layout, *, head_dim: int,
                      dtype_bytes: int, key_bits: int = 16, value_bits: int = 16) -> Plan:
    """The plan keeping the most globally top-ranked tokens within `budget` x the full bytes."""
    num_layers, num_heads, seq_len = scores.shape
    sinks, window = layout.sink_tokens, layout.recent_window
    middle = max(0, seq_len - sinks - window) * num_layers * num_heads

    def plan_for(count: int) -> Plan:
        keeps = global_keeps(scores, count, sinks, window).tolist()
        rows = tuple(tuple(HeadBudget(None if k >= seq_len else k, key_bits, value_bits) for k in row) for row in keeps)
        return Plan(rows, **layout.keywords())

    limit = budget * Plan.full(num_layers, num_heads, **layout.keywords()).full_nbytes(seq_len, head_dim, dtype_bytes)
    fits = lambda count: plan_for(count).nbytes(seq_len, head_dim, dtype_bytes) <= limit  # noqa: E731
    if fits(middle):
        return plan_for(middle)
    # bytes grow with the count except where a group completes and packs; step back past such dips
    count = last_fitting(fits, 0, middle)
    while count >= 0 and not fits(count):
        count -= 1
    if count < 0:
        bits = f"{key_bits}/{value_bits}-bit keys/values"
        raise InfeasibleBudget(budget, floor_fraction(layout, seq_len, head_dim, dtype_bytes), seq_len,
                         f"sink_tokens + recent_window stay in full precision; {bits}")
    return plan_for(count)
