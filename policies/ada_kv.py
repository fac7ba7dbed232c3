"""Ada-KV: each layer's token budget split among its KV heads by their attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_kv.plan import Plan
from adaptive_kv.policies.base import EvictionPolicy, check_fraction, head_bytes, head_full_bytes
from adaptive_kv.policies.base import plan_from_keeps, tokens_for_budget
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats

ATTENTION_SCORERS = ("snapkv", "window", "last_query")  # non-negative masses that can be pooled


def allocate(scores: torch.Tensor, total: int, sinks: int, window: int, safeguard: float) -> list[int]:
    """Middle tokens per head (H,) summing to `total`: one top-k over all heads' normalised scores.

    scores (H, T); each head's evictable middle is rescaled to mass 1 so heads compare fairly, and
    every head first gets `safeguard` of the uniform share.
    """
    seq_len = scores.shape[-1]
    middle = scores[:, sinks : max(sinks, seq_len - window)].float()  # (H, M) evictable tokens
    num_heads, size = middle.shape
    total = min(total, num_heads * size)
    guaranteed = min(size, int(safeguard * total / num_heads))
    if total == 0 or guaranteed == size:
        return [total // num_heads] * num_heads
    share = middle / middle.sum(-1, keepdim=True).clamp_min(1e-12)
    rest = share.sort(-1, descending=True).values[:, guaranteed:]  # (H, M - guaranteed)
    picked = rest.flatten().topk(total - guaranteed * num_heads).indices // rest.shape[1]
    return (torch.bincount(picked, minlength=num_heads) + guaranteed).tolist()


@register("ada_kv")
@dataclass(frozen=True)
class AdaKV(EvictionPolicy):
    """Ada-KV (arXiv:2407.11550, "Optimizing KV Cache Eviction by Adaptive Budget Allocation").

    Each layer keeps as many tokens as the uniform SnapKV plan, but they are chosen by one top-k
    over all its heads' normalised scores, so heads whose attention is spread out get more tokens
    than concentrated ones. Every head is guaranteed `safeguard` of the uniform share (the paper's
    fail-safe alpha). Heads are then trimmed, largest first, until the layer meets its bytes.
    """

    safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("safeguard", self.safeguard, open_low=False)
        if self.scorer not in ATTENTION_SCORERS:
            raise ValueError(f"scorer must be one of {ATTENTION_SCORERS} for ada_kv, got {self.scorer!r}")

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """Per-head keeps: the uniform layer total, reallocated by attention concentration."""
        layout, seq_len, heads = self.layout(), stats.seq_len, stats.num_kv_heads
        head_dim, dtype_bytes = stats.head_dim, stats.dtype_bytes
        keep = tokens_for_budget(stats, budget, layout)
        if keep is None:
            return Plan.uniform(stats.num_layers, heads, keep=None, **layout.keywords())
        floor = self.sink_tokens + self.recent_window
        limit = heads * budget * head_full_bytes(seq_len, head_dim, dtype_bytes)
        keeps = []
        for scores in stats.token_scores[self.scorer]:  # (H, T) per layer
            extra = allocate(scores, heads * (keep - floor), self.sink_tokens, self.recent_window, self.safeguard)
            row = [floor + e for e in extra]
            while sum(head_bytes(k, layout, seq_len, head_dim, dtype_bytes) for k in row) > limit:
                row[row.index(max(row))] -= 1  # uneven groups may cost a few index bytes more
            keeps.append(row)
        return plan_from_keeps(keeps, seq_len, layout)
