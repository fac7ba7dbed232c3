"""Stored compressed contexts, reused by later requests whose token ids start with them.

A stored context is a compressed cache that no request decodes: a document compressed once, or a
finished conversation turn. A request whose prompt starts with one (token-exact, longest first)
decodes over a copy-on-write copy of it (`CompressedCache.share`) and runs only the rest of its
prompt through the model. Contexts are stored per tenant (the API key that made them), policy
and budget, and never cross them. Their bytes are reservations on the engine's KV ledger beside
the running requests': the least recently used are evicted when a request needs the room. Only the
engine's worker thread touches the store.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from adaptive_kv.memory import in_use_nbytes
from adaptive_kv.services.admission import KvLedger
from adaptive_kv.services.metrics import Metrics


@dataclass(frozen=True)
class ContextKey:
    """Who may reuse a stored context: the same tenant, policy (the very object: a reload changes it) and budget."""

    tenant: str
    policy_name: str
    budget: float
    policy: Any = field(compare=False, hash=False)

    def admits(self, other: "ContextKey") -> bool:
        return self == other and self.policy is other.policy


@dataclass(eq=False)
class StoredContext:
    """One compressed context: the ids it holds, its cache (never decoded), its bytes and what its plan reported."""

    key: ContextKey
    ids: tuple[int, ...]
    cache: Any
    nbytes: int
    kv: dict[str, Any]  # the `kv_cache` report of the request that planned it


class ContextStore:
    """An LRU of stored contexts under the engine's KV ledger."""

    def __init__(self, ledger: KvLedger, metrics: Metrics) -> None:
        self.ledger, self.metrics = ledger, metrics
        self._entries: collections.OrderedDict[int, StoredContext] = collections.OrderedDict()  # oldest use first

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the stored contexts hold."""
        return sum(entry.nbytes for entry in self._entries.values())

    def longest(self, key: ContextKey, ids: tuple[int, ...]) -> StoredContext | None:
        """The longest stored context of `key` that is a proper prefix of `ids` (at least one token is left
        to run, whose logits start the generation); counted as a hit or a miss."""
        best = None
        for entry in self._entries.values():
            n = len(entry.ids)
            if (n < len(ids) and (best is None or n > len(best.ids)) and entry.key.admits(key)
                    and ids[:n] == entry.ids):
                best = entry
        (self.metrics.context_hits if best is not None else self.metrics.context_misses).inc()
        if best is not None:
            self._entries.move_to_end(id(best))
        return best

    def put(self, key: ContextKey, ids: tuple[int, ...], cache: Any, kv: dict[str, Any]) -> StoredContext | None:
        """Store `cache` (compressed, holding `ids`) when its bytes fit, evicting older contexts for them;
        None when they cannot fit beside what running requests reserve. The cache must not decode again:
        requests decode over `share()` copies of it."""
        cache.drop_working_copy()
        nbytes = in_use_nbytes(cache)
        for old in [e for e in self._entries.values() if e.key.admits(key) and e.ids == ids]:
            self._evict(old)  # the newer copy of the same context replaces it
        self.make_room(nbytes)
        if not self.ledger.fits(nbytes):
            return None
        entry = StoredContext(key, ids, cache, nbytes, kv)
        self._entries[id(entry)] = entry
        self.ledger.reserve(entry, nbytes)
        self._publish()
        return entry

    def make_room(self, nbytes: int) -> None:
        """Evict the least recently used contexts until `nbytes` more fit on the ledger (or none is left)."""
        while self._entries and not self.ledger.fits(nbytes):
            self._evict(next(iter(self._entries.values())))
            self.metrics.context_evictions.inc()

    def clear(self) -> None:
        """Drop every stored context."""
        for entry in list(self._entries.values()):
            self._evict(entry)

    def _evict(self, entry: StoredContext) -> None:
        del self._entries[id(entry)]
        self.ledger.release(entry)
        entry.cache = None  # its tensors go with the last request still decoding over a copy
        self._publish()

    def _publish(self) -> None:
        self.metrics.stored_contexts.set(len(self._entries))
        self.metrics.stored_context_bytes.set(self.nbytes)
