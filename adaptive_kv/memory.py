"""How many bytes a request's cache may come to hold: the bounds admission control reserves.

A serving engine admits a request only when its cache fits beside the running ones, so it must
know the most that cache can hold before the bytes exist: while its prompt is prefilled (the
prompt at full precision until the plan lands, then whatever the plan keeps plus its working
copy) and while it decodes (every new token stored at full precision in the residual, with its
score and position, plus its slot in the working copy, which grows HEADROOM slots at a time).
These are upper bounds on `in_use_nbytes` at any step boundary; a plan that evicts or
quantises stays below them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_kv.assembled import HEADROOM
from adaptive_kv.cache import CompressedCache

_SCORE_BYTES = 4  # fp32 H2O score per token and head (in the store, and in the working copy)
_POSITION_BYTES = 4  # int32 position per token and head, kept when heads share a ranking


def in_use_nbytes(cache: CompressedCache) -> int:
    """Bytes the cache holds now: its store and its working copy."""
    return cache.nbytes() + cache.working_nbytes()


@dataclass(frozen=True)
class KvShape:
    """What sizes a model's KV cache: layers, KV heads, head size, bytes per element."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "KvShape":
        """The shape of `model`'s caches (read as a CompressedCache reads the config)."""
        empty = CompressedCache(model, capture=True)
        dtype = next(model.parameters()).dtype
        return cls(empty.num_layers, empty.num_kv_heads, empty.head_dim, dtype.itemsize)

    @property
    def _heads(self) -> int:
        return self.num_layers * self.num_kv_heads

    def slot_nbytes(self) -> int:
        """One token's keys and values in every (layer, KV head) at the model's precision."""
        return self._heads * 2 * self.head_dim * self.dtype_bytes

    def token_nbytes(self) -> int:
        """Most bytes one token adds: at full precision with its score and position in the store, and in the view."""
        return 2 * self.slot_nbytes() + self._heads * (2 * _SCORE_BYTES + _POSITION_BYTES)

    def decode_growth_nbytes(self, new_tokens: int) -> int:
        """Most bytes that decoding `new_tokens` more tokens can add to a cache."""
        if new_tokens < 0:
            raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
        view_step = HEADROOM * self._heads * (2 * self.head_dim * self.dtype_bytes + _SCORE_BYTES)
        return new_tokens * self.token_nbytes() + view_step

    def request_bound_nbytes(self, prompt_tokens: int, new_tokens: int) -> int:
        """Most bytes a request's cache can hold at any step boundary: its prompt under any plan (the full
        plan keeps every token in the store and in the view) and its growth over `new_tokens` tokens."""
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        return prompt_tokens * self.token_nbytes() + self.decode_growth_nbytes(new_tokens)
