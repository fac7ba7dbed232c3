"""Storage of one layer's compressed KV: sinks, packed buckets and the full-precision residual.

Nothing is padded across heads: each part is a flat, token-major tensor and heads are told apart
by small index tensors (per-group head ids, per-head residual lengths).

* sinks: the first tokens of every head, full precision, (H, S, D).
* buckets: one per (key_bits, value_bits) pair used in this layer. Tokens sit in groups of at most
  G tokens of one head; keys carry one (scale, zero) per channel per group (KIVI), values one per
  token per channel group. A 16-bit side stores the model's dtype as it is.
* residual: the newest tokens of every head in full precision, sorted by head, (N_r, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_kv.plan import value_group_size


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Bucket:
    """Tokens of the heads of one layer that share (key_bits, value_bits), grouped by head."""

    key_bits: int
    value_bits: int
    keys: torch.Tensor  # (N, D*kb/8) uint8, or (N, D) model dtype when kb == 16
    values: torch.Tensor  # (N, D*vb/8) uint8, or (N, D)
    key_scale: torch.Tensor | None  # (G_n, D) fp16
    key_zero: torch.Tensor | None
    value_scale: torch.Tensor | None  # (N, D/cg) fp16
    value_zero: torch.Tensor | None
    group_len: torch.Tensor  # (G_n,) int16, tokens per group (<= G after eviction)
    group_head: torch.Tensor  # (G_n,) int16
    scores: torch.Tensor | None  # (N,) fp32 accumulated attention (H2O), None if never evicted
    positions: torch.Tensor | None = None  # (N,) int32 original positions, kept when heads share a ranking

    @property
    def num_tokens(self) -> int:
        """Tokens held."""
        return self.keys.shape[0]

    def token_heads(self) -> torch.Tensor:
        """Head of every token: (N,) int64."""
        return self.group_head.long().repeat_interleave(self.group_len.long(), output_size=self.num_tokens)

    def nbytes(self) -> int:
        """Bytes held by every tensor of the bucket."""
        return _nbytes(
            self.keys, self.values, self.key_scale, self.key_zero, self.value_scale, self.value_zero,
            self.group_len, self.group_head, self.scores, self.positions,
        )

    def dequantize(self, kernels, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (N, D) in `dtype`."""
        keys = self.keys
        if self.key_bits != 16:
            keys = kernels.dequantize_keys(keys, self.key_scale, self.key_zero, self.group_len.long(), self.key_bits, dtype)
        values = self.values
        if self.value_bits != 16:
            values = kernels.dequantize_values(values, self.value_scale, self.value_zero, self.value_bits, dtype)
        return keys, values

    def select(self, keep: torch.Tensor) -> "Bucket":
        """A compact copy holding only the tokens where `keep` (N,) is True; empty groups are dropped."""
        group_of_token = torch.arange(self.group_len.numel(), device=keep.device).repeat_interleave(self.group_len.long())
        new_len = torch.bincount(group_of_token[keep], minlength=self.group_len.numel())
        alive = new_len > 0
        pick = lambda t: None if t is None else t[keep].clone()  # noqa: E731
        return Bucket(
            key_bits=self.key_bits,
            value_bits=self.value_bits,
            keys=self.keys[keep].clone(),
            values=self.values[keep].clone(),
            key_scale=None if self.key_scale is None else self.key_scale[alive].clone(),
            key_zero=None if self.key_zero is None else self.key_zero[alive].clone(),
            value_scale=pick(self.value_scale),
            value_zero=pick(self.value_zero),
            group_len=new_len[alive].to(torch.int16),
            group_head=self.group_head[alive].clone(),
            scores=pick(self.scores),
            positions=pick(self.positions),
        )


def quantize_groups(
    kernels,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: torch.Tensor,
    key_bits: int,
    value_bits: int,
    scores: torch.Tensor | None,
    positions: torch.Tensor | None = None,
) -> Bucket:
    """A bucket from whole groups: keys/values (G_n, G, D), heads (G_n,), scores/positions (G_n, G) or None."""
    num_groups, group, head_dim = keys.shape
    flat_keys = keys.reshape(-1, head_dim)
    flat_values = values.reshape(-1, head_dim)
    key_scale = key_zero = value_scale = value_zero = None
    if key_bits == 16:
        stored_keys = flat_keys.clone()
    else:
        stored_keys, key_scale, key_zero = kernels.quantize_keys(keys, key_bits)
    if value_bits == 16:
        stored_values = flat_values.clone()
    else:
        cg = value_group_size(group, head_dim)
        stored_values, value_scale, value_zero = kernels.quantize_values(flat_values, value_bits, cg)
    return Bucket(
        key_bits=key_bits,
        value_bits=value_bits,
        keys=stored_keys,
        values=stored_values,
        key_scale=key_scale,
        key_zero=key_zero,
        value_scale=value_scale,
        value_zero=value_zero,
        group_len=torch.full((num_groups,), group, dtype=torch.int16, device=heads.device),
        group_head=heads.to(torch.int16),
        scores=None if scores is None else scores.reshape(-1).float().clone(),
        positions=None if positions is None else positions.reshape(-1).to(torch.int32).clone(),
    )


def concat_buckets(a: Bucket | None, b: Bucket) -> Bucket:
    """`a` followed by `b` (same bits); one new compact bucket."""
    if a is None:
        return b
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return Bucket(
        key_bits=a.key_bits,
        value_bits=a.value_bits,
        keys=torch.cat([a.keys, b.keys]),
        values=torch.cat([a.values, b.values]),
        key_scale=cat(a.key_scale, b.key_scale),
        key_zero=cat(a.key_zero, b.key_zero),
        value_scale=cat(a.value_scale, b.value_scale),
        value_zero=cat(a.value_zero, b.value_zero),
        group_len=torch.cat([a.group_len, b.group_len]),
        group_head=torch.cat([a.group_head, b.group_head]),
        scores=cat(a.scores, b.scores),
        positions=cat(a.positions, b.positions),
    )


@dataclass
class Residual:
    """Newest tokens per head in full precision, sorted by head: keys/values (N_r, D), lengths (H,)."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor  # (H,) int64
    scores: torch.Tensor | None  # (N_r,) fp32
    positions: torch.Tensor | None = None  # (N_r,) int32, kept when heads share a ranking

    def nbytes(self) -> int:
        """Bytes held."""
        return _nbytes(self.keys, self.values, self.lengths, self.scores, self.positions)

    def token_heads(self) -> torch.Tensor:
        """Head of every token: (N_r,) int64."""
        return torch.arange(self.lengths.numel(), device=self.lengths.device).repeat_interleave(self.lengths, output_size=self.keys.shape[0])

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int = 0, sizes: list[int] | None = None,
               scores: torch.Tensor | None = None) -> "Residual":
        """Append q new tokens at positions start.. to every head: keys/values (H, q, D). New scores are
        `scores` (H, q) where given (predicted ones), else 0 (attention mass accumulates from there).

        `sizes`, the caller's copy of `lengths`, spares reading them back from the device (a sync per step).
        """
        num_heads, q, head_dim = keys.shape
        sizes = self.lengths.tolist() if sizes is None else sizes

        def interleave(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            # each head's run, then its q new tokens (one cat; this runs for every layer of every step)
            runs = old.split(sizes)
            return torch.cat([part for head in range(num_heads) for part in (runs[head], new[head])])

        stored = None
        if self.scores is not None:
            new = self.scores.new_zeros(num_heads, q) if scores is None else scores.to(self.scores)
            stored = interleave(self.scores, new)
        positions = None
        if self.positions is not None:
            new = (start + torch.arange(q, dtype=torch.int32, device=self.positions.device)).expand(num_heads, q)
            positions = interleave(self.positions, new)
        return Residual(interleave(self.keys, keys), interleave(self.values, values), self.lengths + q, stored, positions)

    def select(self, keep: torch.Tensor) -> "Residual":
        """A compact copy holding only the tokens where `keep` (N_r,) is True, still sorted by head."""
        lengths = torch.bincount(self.token_heads()[keep], minlength=self.lengths.numel())
        pick = lambda t: None if t is None else t[keep].clone()  # noqa: E731
        return Residual(self.keys[keep].clone(), self.values[keep].clone(), lengths, pick(self.scores), pick(self.positions))

    def split_oldest(self, heads: torch.Tensor, count: int) -> tuple[torch.Tensor, "Residual"]:
        """Take the `count` oldest tokens of each head in `heads`: (index (len(heads), count), rest)."""
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        taken = (starts[heads][:, None] + torch.arange(count, device=starts.device)).flatten()
        keep = torch.ones(self.keys.shape[0], dtype=torch.bool, device=self.lengths.device)
        keep[taken] = False
        lengths = self.lengths.clone()
        lengths[heads] -= count
        rest = Residual(
            self.keys[keep].clone(),
            self.values[keep].clone(),
            lengths,
            None if self.scores is None else self.scores[keep].clone(),
            None if self.positions is None else self.positions[keep].clone(),
        )
        return taken.view(len(heads), count), rest
