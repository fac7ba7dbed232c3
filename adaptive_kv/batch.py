"""Several requests decoding together: one model forward per step for all of them.

Each request keeps its own `CompressedCache` (its own Plan, its own kept tokens per head). A
`BatchCache` puts the running requests' caches behind one transformers `Cache`: the linear layers
run once for the whole batch, and each layer's `update` hands every request's new states to its
own cache; attention then runs per request over that request's store (`BatchStep`), so nothing
is padded across requests. Positions are per request (`position_ids`), since requests have seen
different numbers of tokens.

`decode.RunningBatch` is the decode loop over such a batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from adaptive_kv.cache import CompressedCache
from adaptive_kv.step import CacheStep


class BatchStep(CacheStep):
    """One layer's step of every request in a batch; attention runs request by request."""

    def __init__(self, steps: Sequence[CacheStep], key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.steps = tuple(steps)
        self.layer_idx = steps[0].layer_idx
        self.key_states, self.value_states = key_states, value_states

    @property
    def is_compressed(self) -> bool:
        compressed = [s.is_compressed for s in self.steps]
        if not all(compressed):
            raise ValueError("every request in a batch must be compressed (prefill each request alone, then batch it)")
        return True

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Query (B, H_q, q, D) -> (B, q, H_q, D), each request over its own store."""
        return torch.cat([s.attend(query[b : b + 1], scaling) for b, s in enumerate(self.steps)])

    def observe(self, query: torch.Tensor, scaling: float) -> None:
        raise ValueError("a batch only decodes: prefill each request alone, then batch it")


class _BatchLayer(CacheLayerMixin):
    """The lengths transformers asks a cache layer for, over the batch (masks are not used by a compressed step)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, caches: Sequence[CompressedCache], layer_idx: int) -> None:
        super().__init__()
        self.caches, self.layer_idx = caches, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("use BatchCache.update")

    def get_seq_length(self) -> int:
        return max(cache.get_seq_length(self.layer_idx) for cache in self.caches)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """The caches of a batch of requests (row b of the model's input is request b) as one `Cache`."""

    def __init__(self, caches: Sequence[CompressedCache]) -> None:
        if not caches or not all(isinstance(c, CompressedCache) for c in caches):
            raise ValueError("a BatchCache needs one or more CompressedCaches")
        layers = {c.num_layers for c in caches}
        if len(layers) != 1:
            raise ValueError(f"every cache in a batch must belong to one model, got layer counts {sorted(layers)}")
        self.caches = tuple(caches)
        super().__init__(layers=[_BatchLayer(self.caches, i) for i in range(caches[0].num_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Each request's new states (row b) into its own cache; a BatchStep for the attention function."""
        if key_states.shape[0] != len(self.caches):
            raise ValueError(f"the batch holds {len(self.caches)} requests, the states {key_states.shape[0]} rows")
        steps = [cache.update(key_states[b : b + 1], value_states[b : b + 1], layer_idx)[0]
                 for b, cache in enumerate(self.caches)]
        step = BatchStep(steps, key_states, value_states)
        return step, step

    def read_attention_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        """Row b of a step's hidden states (B, q, hidden) goes to request b's cache (its predictor, if any)."""
        for b, cache in enumerate(self.caches):
            cache.read_attention_input(layer_idx, hidden_states[b : b + 1])

    def positions(self, device: torch.device) -> torch.Tensor:
        """Position of each request's next token: (B, 1)."""
        return torch.tensor([[cache.get_seq_length()] for cache in self.caches], device=device)
