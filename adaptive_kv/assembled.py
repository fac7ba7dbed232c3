"""Decode attention over operands kept assembled between steps (the CPU hot path).

The reference decode (`kernels.decode_attention`) dequantises the whole store and pads it into
dense (H, L, D) operands at every step, a cost paid per layer and per token that made a compressed
cache slower than DynamicCache. An `AssembledView` keeps those operands between steps: built
once from the store after the plan lands (or a multi-token step), then updated in place: a new
token is written after its head's last one, a group flush rewrites only the flushed tokens with
their dequantised values (`flush`), an eviction compacts the rows without dequantising anything
(`drop`). The trade: the view holds the kept tokens dequantised (`nbytes`), on top of the packed
store. The store stays the state of record; the view is a cache of it.

A side (keys or values) whose every head is quantised may be held in bfloat16 (`build`'s
`key_dtype` / `value_dtype`): its error is far below the quantisation error already in it, and a
decode step reads half the bytes. Such views attend over their whole, contiguous capacity with a
mask, because CPU bf16 matmuls over a strided slice fall off the fast path.

Each head's row holds its tokens in store order (sinks, buckets in order, residual), so the
identity plan's rows are the sequence itself and decode matches DynamicCache's SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaptive_kv.kernels import reference
from adaptive_kv.store import Bucket, Residual

HEADROOM = 64  # token slots per head beyond the longest head, so most appends need no new buffer


@dataclass
class AssembledView:
    """Dense decode operands of one layer: each head's tokens at the start of its row."""

    keys: torch.Tensor  # (H, C, D) model dtype, C >= every head's length
    values: torch.Tensor
    lengths: torch.Tensor  # (H,) int64 tokens per head
    fixed_slots: torch.Tensor  # (N_sinks + N_buckets,) flat slot (h * C + j) of every stored token, store order
    residual_start: torch.Tensor  # (H,) int64 slot of each head's first residual token
    scores: torch.Tensor | None = None  # (H, C) fp32 H2O scores while the view lives (None: not tracked)

    def __post_init__(self) -> None:
        self.head_lengths: list[int] = self.lengths.tolist()  # mirror: no tensor op to read the longest head

    @classmethod
    def build(cls, sinks: tuple[torch.Tensor, torch.Tensor], buckets: list[Bucket], residual: Residual,
              kernels, dtype: torch.dtype, key_dtype: torch.dtype | None = None,
              value_dtype: torch.dtype | None = None, track_scores: bool = True) -> "AssembledView":
        """Dequantise the store once (in `dtype`) and lay every head's tokens out in one row, held in
        `key_dtype` / `value_dtype` (default `dtype`). `track_scores=False`: the store's scores are not
        attention mass (predicted scores), so the view neither copies nor accumulates them."""
        segments = reference.decode_segments(sinks, buckets, residual)
        parts = [reference.segment_tokens(seg, dtype, kernels=kernels) for seg in segments]
        keys, values, heads = (torch.cat(t) for t in zip(*parts))
        num_heads, head_dim = sinks[0].shape[0], keys.shape[1]
        lengths = torch.bincount(heads, minlength=num_heads)
        # rank of every token within its head, in store order
        order = torch.argsort(heads, stable=True)
        starts = torch.cumsum(lengths, 0) - lengths
        slot = torch.empty_like(heads)
        slot[order] = torch.arange(heads.numel(), device=heads.device) - starts[heads[order]]
        capacity = int(lengths.max()) + HEADROOM
        dense_k = keys.new_zeros(num_heads, capacity, head_dim, dtype=key_dtype or dtype)
        dense_v = values.new_zeros(num_heads, capacity, head_dim, dtype=value_dtype or dtype)
        dense_k[heads, slot] = keys.to(dense_k.dtype)
        dense_v[heads, slot] = values.to(dense_v.dtype)
        flat = heads * capacity + slot
        fixed = flat.numel() - residual.keys.shape[0]
        view = cls(dense_k, dense_v, lengths, flat[:fixed], lengths - residual.lengths.to(lengths.device))
        if track_scores and residual.scores is not None:  # the view accumulates H2O mass itself until `store_scores`
            sinks_n = sinks[0].shape[0] * sinks[0].shape[1]
            view.scores = torch.zeros(num_heads, capacity, dtype=torch.float32, device=keys.device)
            view.scores.view(-1)[flat[sinks_n:]] = torch.cat([b.scores for b in buckets] + [residual.scores])
        return view

    @property
    def capacity(self) -> int:
        """Token slots per head."""
        return self.keys.shape[1]

    def nbytes(self) -> int:
        """Bytes of the working copy (on top of the packed store)."""
        parts = (self.keys, self.values, self.lengths, self.fixed_slots, self.residual_start, self.scores)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one new token per head (keys/values (H, 1, D)) after each head's last token."""
        if max(self.head_lengths) >= self.capacity:
            self._grow()
        heads = torch.arange(self.keys.shape[0], device=self.keys.device)
        self.keys[heads, self.lengths] = keys[:, 0].to(self.keys.dtype)
        self.values[heads, self.lengths] = values[:, 0].to(self.values.dtype)
        self.lengths += 1
        self.head_lengths = [n + 1 for n in self.head_lengths]

    def _grow(self) -> None:
        # a fixed step: the bf16 path reads the whole capacity, so a spare half would cost every step;
        # the copy, once per HEADROOM tokens, is a small fraction of the reads in between
        extra = HEADROOM
        old = self.capacity
        pad = lambda t: F.pad(t, (0, 0, 0, extra))  # noqa: E731
        self.keys, self.values = pad(self.keys), pad(self.values)
        if self.scores is not None:
            self.scores = F.pad(self.scores, (0, extra))
        heads = self.fixed_slots // old
        self.fixed_slots = heads * self.capacity + self.fixed_slots % old

    def attend(self, query: torch.Tensor, scaling: float, mass_heads: tuple[int, ...] | None) -> torch.Tensor:
        """One decode query (H_q, 1, D) -> output (H_q, 1, D); adds the H2O mass of `mass_heads` to `scores`.

        Heads outside `mass_heads` accumulate nothing: a head that never evicts needs no scores
        when each head ranks its own tokens.
        """
        if self.keys.dtype != query.dtype or self.values.dtype != query.dtype:
            return self._attend_whole(query, scaling, mass_heads)
        num_q, _, head_dim = query.shape
        num_kv = self.keys.shape[0]
        rep = num_q // num_kv
        longest, ragged = max(self.head_lengths), min(self.head_lengths) != max(self.head_lengths)
        keys, values = self.keys[:, :longest], self.values[:, :longest]
        if not mass_heads and not ragged:  # every row full, no scores: SDPA as DynamicCache runs it
            return F.scaled_dot_product_attention(query[None], keys[None], values[None], scale=scaling,
                                                  enable_gqa=rep > 1)[0]
        # one pass over the keys gives the output and the mass (a second pass for the mass alone
        # would read, and for a subset of heads copy, the keys again)
        visible = torch.arange(longest, device=keys.device) < self.lengths[:, None]  # (H, L)
        probs = self._probs(query.view(num_kv, rep, head_dim), keys, visible, scaling)
        self._add_mass(probs, mass_heads, rep)
        return torch.bmm(probs.to(values.dtype), values).view(num_q, 1, head_dim)

    def _add_mass(self, probs: torch.Tensor, mass_heads: tuple[int, ...] | None, rep: int) -> None:
        """Add the attention mass of `mass_heads` from probs (H, rep, L) to `scores`."""
        if not mass_heads:
            return
        span = probs.shape[-1]
        if len(mass_heads) == probs.shape[0]:
            self.scores[:, :span] += probs.sum(1).div_(rep)
            return
        pick = torch.tensor(mass_heads, device=probs.device)
        self.scores[pick, :span] += probs[pick].sum(1).div_(rep)

    def _attend_whole(self, query: torch.Tensor, scaling: float, mass_heads: tuple[int, ...] | None) -> torch.Tensor:
        """`attend` for operands held in another dtype than the query: over the whole capacity, masked."""
        num_q, _, head_dim = query.shape
        num_kv = self.keys.shape[0]
        rep = num_q // num_kv
        visible = torch.arange(self.capacity, device=self.keys.device) < self.lengths[:, None]
        probs = self._probs(query.view(num_kv, rep, head_dim).to(self.keys.dtype), self.keys, visible, scaling)
        self._add_mass(probs, mass_heads, rep)
        out = torch.bmm(probs.to(self.values.dtype), self.values)
        return out.to(query.dtype).view(num_q, 1, head_dim)

    def flush(self, heads: list[int], group: int, keys: torch.Tensor, values: torch.Tensor, insert_at: int) -> None:
        """The `group` oldest residual tokens of each of `heads` were packed: write their dequantised
        keys/values (len(heads) * group, D), head by head, in place, and list their slots among the
        stored tokens at `insert_at` (where the store put them: the end of their bucket)."""
        device = self.keys.device
        rows = torch.tensor(heads, device=device)
        head_of = rows.repeat_interleave(group)
        slot = (self.residual_start[rows][:, None] + torch.arange(group, device=device)).flatten()
        self.keys[head_of, slot] = keys.to(self.keys.dtype)
        self.values[head_of, slot] = values.to(self.values.dtype)
        flat = head_of * self.capacity + slot
        self.fixed_slots = torch.cat([self.fixed_slots[:insert_at], flat, self.fixed_slots[insert_at:]])
        self.residual_start[rows] += group

    def drop(self, keep: torch.Tensor) -> None:
        """Evict the stored tokens where `keep` (one entry per `fixed_slots`, store order) is False:
        each row is compacted, nothing is dequantised."""
        device = self.keys.device
        num_heads, old = self.keys.shape[0], self.capacity
        alive = torch.arange(old, device=device) < self.lengths[:, None]
        alive.view(-1)[self.fixed_slots[~keep]] = False
        lengths = alive.sum(1)
        src_head, src_slot = alive.nonzero(as_tuple=True)
        dst_slot = (alive.cumsum(1) - 1)[src_head, src_slot]
        capacity = int(lengths.max()) + HEADROOM
        move = lambda t: t.new_zeros(num_heads, capacity, *t.shape[2:]).index_put_(  # noqa: E731
            (src_head, dst_slot), t[src_head, src_slot])
        self.keys, self.values = move(self.keys), move(self.values)
        if self.scores is not None:
            self.scores = move(self.scores)
        new_slot = torch.full((num_heads * old,), -1, dtype=torch.long, device=device)
        new_slot[src_head * old + src_slot] = src_head * capacity + dst_slot
        self.residual_start = self.residual_start - (self.lengths - lengths)  # evicted tokens precede the residual
        self.fixed_slots = new_slot[self.fixed_slots[keep]]
        self.lengths = lengths
        self.head_lengths = lengths.tolist()

    @staticmethod
    def _probs(query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
        """Softmax (S, rep, L) fp32 of query (S, rep, D) over keys (S, L, D), masked to `visible` (S, L)."""
        logits = torch.bmm(query, keys.transpose(1, 2)).float() * scaling
        logits.masked_fill_(~visible[:, None], -torch.inf)
        return logits.softmax(-1)

    def store_scores(self, num_sink_tokens: int) -> torch.Tensor:
        """The H2O scores of every stored token after the sinks, in store order (buckets, residual)."""
        slots = torch.cat([self.fixed_slots[num_sink_tokens:], self._residual_slots()])
        return self.scores.view(-1)[slots]

    def _residual_slots(self) -> torch.Tensor:
        """Flat slots of the residual's tokens, head by head (the store's residual order)."""
        count = self.lengths - self.residual_start
        heads = torch.arange(count.numel(), device=count.device).repeat_interleave(count)
        first = torch.cumsum(count, 0) - count
        rank = torch.arange(heads.numel(), device=count.device) - first[heads]
        return heads * self.capacity + self.residual_start[heads] + rank
