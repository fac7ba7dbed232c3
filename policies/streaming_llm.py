"""StreamingLLM: attention sinks plus a recent window, nothing in between."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.plan import HeadBudget, Plan
from adaptive_kv.policies.base import (Policy, check_fraction, floor_fraction, head_bytes, head_full_bytes,
                                       last_fitting)
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats


@register("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM (arXiv:2309.17453, "Efficient Streaming Language Models with Attention Sinks").

    Keeps the first `sink_tokens` and the most recent tokens in full precision. `recent_window` is
    the smallest window; the plan widens it to the most the budget allows and sets keep = sinks +
    window, so no middle token remains and the scorer never chooses anything. During decode the
    window slides by whole groups; over-budget heads then evict by the cache's H2O scores.
    """

    def plan(self, stats: AttentionStats, budget: float) -> Plan:
        """Sinks + the widest recent window meeting the budget, for every head.

        The window is one layout knob, so a model with sliding-window layers gets one window for all
        its layers, sized against the real full-cache bytes; a sliding layer whose window already
        holds no more than sinks + window keeps all it holds.
        """
        if stats.windows is None:
            return super().plan(stats, budget)
        check_fraction("budget", budget)
        seq_len, sinks, head_dim, dtype_bytes = stats.seq_len, self.sink_tokens, stats.head_dim, stats.dtype_bytes
        full = stats.num_kv_heads * sum(head_full_bytes(stats.layer_tokens(layer), head_dim, dtype_bytes)
                                        for layer in range(stats.num_layers))
        limit = budget * full

        def plan_for(window: int) -> Plan:
            rows = []
            for layer in range(stats.num_layers):
                keep = sinks + window
                held = stats.layer_tokens(layer)
                sliding_and_bounded = stats.windows[layer] is not None and keep >= held
                rows.append((HeadBudget(None if sliding_and_bounded else keep),) * stats.num_kv_heads)
            return Plan(tuple(rows), **self.layout(recent_window=window).keywords(), windows=stats.windows)

        window = last_fitting(lambda w: plan_for(w).nbytes(seq_len, head_dim, dtype_bytes) <= limit,
                              self.recent_window, max(self.recent_window, seq_len - sinks))
        if window < self.recent_window:
            minimum = plan_for(self.recent_window).nbytes(seq_len, head_dim, dtype_bytes) / full
            raise InfeasibleBudget(budget, minimum, seq_len, "sink_tokens + recent_window stay in full precision")
        return plan_for(window)

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """Sinks + the widest recent window meeting the budget, for every head."""
        check_fraction("budget", budget)
        seq_len, sinks, head_dim, dtype_bytes = stats.seq_len, self.sink_tokens, stats.head_dim, stats.dtype_bytes
        limit = budget * head_full_bytes(seq_len, head_dim, dtype_bytes)

        def fits(window: int) -> bool:
            layout = self.layout(recent_window=window)
            return head_bytes(sinks + window, layout, seq_len, head_dim, dtype_bytes) <= limit

        window = last_fitting(fits, self.recent_window, max(self.recent_window, seq_len - sinks))
        if window < self.recent_window:
            minimum = floor_fraction(self.layout(), seq_len, head_dim, dtype_bytes)
            raise InfeasibleBudget(budget, minimum, seq_len, "sink_tokens + recent_window stay in full precision")
        layout = self.layout(recent_window=window)
        return Plan.uniform(stats.num_layers, stats.num_kv_heads, keep=sinks + window, **layout.keywords())
