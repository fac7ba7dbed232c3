"""The interface between the attention function and a cache that attends over its own store.

Kept apart from `attention` (which imports transformers' model machinery) so that a cache can
implement it without importing that machinery at import time.
"""

from __future__ import annotations

import abc

import torch


class CacheStep(abc.ABC):
    """What a cache's `update` may hand to the attention function in place of the key states.

    The attention function knows only this interface (so it never imports a cache): during the
    prefill it runs exact SDPA over the step's states, then lets the cache `observe` the queries;
    once the layer is compressed, the cache `attend`s over its own store.
    """

    layer_idx: int
    key_states: torch.Tensor  # (1, H_kv, q, D)
    value_states: torch.Tensor

    @property
    @abc.abstractmethod
    def is_compressed(self) -> bool:
        """Whether the layer decodes over a compressed store (else this is its prefill)."""

    @abc.abstractmethod
    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of query (1, H_q, q, D) over the layer's store: (1, q, H_q, D)."""

    @abc.abstractmethod
    def observe(self, query: torch.Tensor, scaling: float) -> None:
        """Read the layer's statistics from its prefill queries (1, H_q, T, D)."""
