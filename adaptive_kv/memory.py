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
_SLOT_BYTES = 8  # int64 slot of a stored token in the working copy
_HEAD_BYTES = 64  # per (layer, head): token counts and offsets of the store and the working copy


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

    def _store_token(self) -> int:
        """Most bytes one token takes in one head's store: full precision, its score and position."""
        return 2 * self.head_dim * self.dtype_bytes + _SCORE_BYTES + _POSITION_BYTES

    def _view_token(self) -> int:
        """Most bytes one token slot takes in one head's working copy: operands, score, slot index."""
        return 2 * self.head_dim * self.dtype_bytes + _SCORE_BYTES + _SLOT_BYTES

    def request_bound_nbytes(self, prompt_tokens: int, new_tokens: int) -> int:
        """Most bytes a request's cache can hold at any step boundary, under any plan: every token of the
        prompt and of `new_tokens` decoded ones in the store and in the working copy (the full plan's case),
        the copy padded by HEADROOM slots per head."""
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        _check_new(new_tokens)
        tokens = prompt_tokens + new_tokens
        per_head = tokens * self._store_token() + (tokens + HEADROOM) * self._view_token() + _HEAD_BYTES
        return self._heads * per_head

    def decoding_bound_nbytes(self, cache: CompressedCache, new_tokens: int) -> int:
        """Most bytes a cache whose plan has landed can hold while it decodes `new_tokens` more tokens:
        what its store holds, each new token in every head's store, and a working copy whose rows are
        as long as the layer's longest head plus the new tokens and HEADROOM (built or not yet)."""
        _check_new(new_tokens)
        total = cache.nbytes() + self._heads * (new_tokens * self._store_token() + _HEAD_BYTES)
        for layer in cache.layers:
            longest = int(layer.head_tokens().max()) if layer.is_initialized else 0
            slots = max(longest + HEADROOM, layer.view.capacity if layer.view is not None else 0) + new_tokens
            total += self.num_kv_heads * slots * self._view_token()
        return total


def _check_new(new_tokens: int) -> None:
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
