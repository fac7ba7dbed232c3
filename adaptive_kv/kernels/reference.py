"""Torch reference of the packed KV kernels: the specification every other backend must match.

Layout (KIVI, arXiv:2402.02750): keys are quantised per channel over a group of tokens (outlier
channels get their own range), values per token over groups of channels. Quantisation is
asymmetric: ``x ≈ code * scale + zero`` with fp16 scale and zero. Codes of 2 and 4 bits are packed
along the channel axis, low bits first: four 2-bit or two 4-bit codes per byte; 8-bit codes are
bytes as they are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKABLE_BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
    """How many codes of `bits` share one byte."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., D) in [0, 2**bits) into bytes (..., D * bits / 8)."""
    per_byte = codes_per_byte(bits)
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dimension {codes.shape[-1]} must be a multiple of {per_byte} for {bits}-bit packing")
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes.contiguous()
    grouped = codes.view(*codes.shape[:-1], -1, per_byte)  # (..., D/per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: bytes (..., D * bits / 8) -> uint8 codes (..., D)."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # (..., D/per_byte, per_byte)
    return codes.flatten(-2)


def _scale_and_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) whose grid covers [lo, hi] after fp16 rounding.

    Rounding zero down and scale up keeps every value inside the grid, so the round-trip error
    stays within scale / 2 (tested), instead of clamping at the edges.
    """
    qmax = (1 << bits) - 1
    zero = lo.to(torch.float16)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -torch.inf)), zero)
    span = (hi - zero.float()).clamp_min(1e-6)  # 1e-6: a constant group still gets a usable scale
    scale = (span / qmax).to(torch.float16)
    too_small = scale.float() * qmax + zero.float() < hi
    scale = torch.where(too_small, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    return scale, zero


def _encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = (1 << bits) - 1
    return torch.round((x.float() - zero.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)


def quantize_keys(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise key groups (G_n, G, D) per channel: packed codes (G_n*G, D*bits/8), scale/zero (G_n, D)."""
    lo = keys.float().amin(dim=1)  # (G_n, D)
    hi = keys.float().amax(dim=1)
    scale, zero = _scale_and_zero(lo, hi, bits)
    codes = _encode(keys, scale.unsqueeze(1), zero.unsqueeze(1), bits)  # (G_n, G, D)
    return pack(codes.flatten(0, 1), bits), scale, zero


def dequantize_keys(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_len: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Keys (N, D) from packed codes (N, D*bits/8) and per-group scale/zero (G_n, D) of `group_len` tokens."""
    codes = unpack(packed, bits).float()
    scale_t = scale.float().repeat_interleave(group_len, dim=0, output_size=packed.shape[0])
    zero_t = zero.float().repeat_interleave(group_len, dim=0, output_size=packed.shape[0])
    return (codes * scale_t + zero_t).to(dtype)


def quantize_values(values: torch.Tensor, bits: int, channel_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise values (N, D) per token over channel groups: codes (N, D*bits/8), scale/zero (N, D/cg)."""
    n, d = values.shape
    grouped = values.float().view(n, d // channel_group, channel_group)
    scale, zero = _scale_and_zero(grouped.amin(-1), grouped.amax(-1), bits)
    codes = _encode(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).view(n, d)
    return pack(codes, bits), scale, zero


def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Values (N, D) from packed codes (N, D*bits/8) and per-token scale/zero (N, D/cg)."""
    codes = unpack(packed, bits).float()
    n, d = codes.shape
    groups = scale.shape[-1]
    out = codes.view(n, groups, d // groups) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return out.view(n, d).to(dtype)


def varlen_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: torch.Tensor,
    num_kv_heads: int,
    scaling: float,
    new_tokens: int = 1,
    need_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of query (H_q, q, D) over flat per-head tokens keys/values (N, D) of head `heads` (N,).

    Each head's tokens may number differently; the last `new_tokens` of each head (in flat order)
    are the queries' own tokens and are seen causally. Heads are padded in this computation only,
    never in storage. Returns the output (H_q, q, D) and, if `need_mass`, the attention mass each
    token received (N,), summed over queries and averaged over the GQA group (H2O accumulator).
    """
    num_q, q_len, head_dim = query.shape
    rep = num_q // num_kv_heads
    order = torch.argsort(heads, stable=True)
    counts = torch.bincount(heads, minlength=num_kv_heads)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(heads)
    slot[order] = torch.arange(heads.numel(), device=heads.device) - starts[heads[order]]
    longest = int(counts.max())
    dense_k = keys.new_zeros(num_kv_heads, longest, head_dim)
    dense_v = values.new_zeros(num_kv_heads, longest, head_dim)
    dense_k[heads, slot] = keys
    dense_v[heads, slot] = values
    # query i sees every old token and new tokens up to its own: slots <= count - q + i
    last_visible = counts[:, None] - q_len + torch.arange(q_len, device=heads.device)  # (H, q)
    visible = torch.arange(longest, device=heads.device) <= last_visible[..., None]  # (H, q, L)
    if not need_mass:
        # fused SDPA (same kernel and key order as DynamicCache, so the identity plan matches it)
        ragged = q_len > 1 or bool((counts != longest).any())
        mask = visible.repeat_interleave(rep, dim=0)[None] if ragged else None  # (1, H_q, q, L)
        out = F.scaled_dot_product_attention(
            query[None], dense_k[None], dense_v[None], attn_mask=mask, scale=scaling, enable_gqa=rep > 1
        )
        return out[0], None
    q = query.reshape(num_kv_heads, rep * q_len, head_dim)  # query head h*rep + r -> KV head h
    logits = torch.bmm(q, dense_k.transpose(1, 2)).float().view(num_kv_heads, rep, q_len, longest) * scaling
    logits.masked_fill_(~visible[:, None], -torch.inf)
    probs = logits.softmax(dim=-1)
    out = torch.bmm(probs.to(values.dtype).view(num_kv_heads, rep * q_len, longest), dense_v)
    mass = probs.sum(dim=(1, 2))[heads, slot] / rep if need_mass else None
    return out.view(num_q, q_len, head_dim), mass


# --------------------------------------------------------------------------- decode over the store
@dataclass(frozen=True)
class Segment:
    """One part of a layer's store as decode attention reads it; a `store.Bucket` has the same fields.

    Tokens sit in runs ("groups") of one head: `group_len` (G_n,) tokens of head `group_head`
    (G_n,). A side of 16 bits is stored as it is (N, D); a packed side holds codes (N, D*bits/8)
    with keys' scale/zero per group and channel (G_n, D) and values' per token and channel group
    (N, D/cg). Sinks and the residual are segments of 16 bits, one group per head.
    """

    key_bits: int
    value_bits: int
    keys: torch.Tensor
    values: torch.Tensor
    key_scale: torch.Tensor | None
    key_zero: torch.Tensor | None
    value_scale: torch.Tensor | None
    value_zero: torch.Tensor | None
    group_len: torch.Tensor
    group_head: torch.Tensor

    @classmethod
    def full_precision(cls, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> "Segment":
        """Tokens (N, D) sorted by head, `lengths` (H,) of them per head."""
        lengths = lengths.to(keys.device)
        heads = torch.arange(lengths.numel(), device=keys.device)
        return cls(16, 16, keys, values, None, None, None, None, lengths, heads)


def decode_segments(sinks: tuple[torch.Tensor, torch.Tensor], buckets, residual) -> list[Segment]:
    """Sinks (H, S, D) x2, buckets (`store.Bucket`) and residual (`store.Residual`) as segments, in that order."""
    sink_k, sink_v = sinks
    num_heads, num_sinks, head_dim = sink_k.shape
    lengths = torch.full((num_heads,), num_sinks, dtype=torch.long, device=sink_k.device)
    first = Segment.full_precision(sink_k.reshape(-1, head_dim), sink_v.reshape(-1, head_dim), lengths)
    last = Segment.full_precision(residual.keys, residual.values, residual.lengths)
    return [first, *buckets, last]


def segment_tokens(segment, dtype: torch.dtype, kernels=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values (N, D) in `dtype` and the head of every token (N,) int64.

    `kernels` (default: this module) provides dequantize_keys/dequantize_values.
    """
    dequantize_k = dequantize_keys if kernels is None else kernels.dequantize_keys
    dequantize_v = dequantize_values if kernels is None else kernels.dequantize_values
    num_tokens, group_len = segment.keys.shape[0], segment.group_len.long()
    keys, values = segment.keys.to(dtype), segment.values.to(dtype)
    if segment.key_bits != 16:
        keys = dequantize_k(segment.keys, segment.key_scale, segment.key_zero, group_len, segment.key_bits, dtype)
    if segment.value_bits != 16:
        values = dequantize_v(segment.values, segment.value_scale, segment.value_zero, segment.value_bits, dtype)
    heads = segment.group_head.long().repeat_interleave(group_len, output_size=num_tokens)
    return keys, values, heads


def decode_attention(
    query: torch.Tensor,
    sinks: tuple[torch.Tensor, torch.Tensor],
    buckets,
    residual,
    num_kv_heads: int,
    scaling: float,
    need_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of query (H_q, q, D) over one layer's store: sinks, buckets, then residual.

    The residual holds the q new tokens last, seen causally. Returns the output (H_q, q, D) and,
    if `need_mass`, the mass every token received (N_total,) in the order sinks, buckets, residual.
    Reference: dequantise everything, then `varlen_attention`.
    """
    parts = [segment_tokens(s, query.dtype) for s in decode_segments(sinks, buckets, residual)]
    keys, values, heads = (torch.cat(t) for t in zip(*parts))
    return varlen_attention(query, keys, values, heads, num_kv_heads, scaling, query.shape[1], need_mass)


def layout_decode(
    query: torch.Tensor, layout, residual, scaling: float, accumulate_mass: bool = False, kernels=None
) -> torch.Tensor:
    """Attention of query (R*rep, q, D) over a `DecodeLayout`'s stores and their residual: (R*rep, q, D).

    Row r = b * H + h is KV head h of sequence b; `residual` holds the newest tokens of every row
    (sorted by row, `lengths` (R,)), the q new ones last, seen causally. With `accumulate_mass`
    each token's attention mass (summed over queries, averaged over the GQA group) is added in
    place to its score tensor (`Bucket.scores`, `residual.scores`; segments without one are
    skipped). Reference: each sequence's store dequantised (with `kernels`, default this module),
    then `varlen_attention`.
    """
    kernels = kernels or sys.modules[__name__]
    heads = layout.num_kv_heads
    rep = query.shape[0] // layout.num_rows
    counts = residual.lengths.tolist()
    outs, offset = [], 0
    for seq, store in enumerate(layout.stores):
        tokens = sum(counts[seq * heads : (seq + 1) * heads])
        mine = slice(offset, offset + tokens)
        last = Segment.full_precision(residual.keys[mine], residual.values[mine], residual.lengths[seq * heads : (seq + 1) * heads])
        parts = [segment_tokens(s, query.dtype, kernels=kernels) for s in (*store, last)]
        keys, values, token_heads = (torch.cat(t) for t in zip(*parts))
        rows = slice(seq * heads * rep, (seq + 1) * heads * rep)
        out, mass = kernels.varlen_attention(query[rows], keys, values, token_heads, heads, scaling, query.shape[1],
                                             accumulate_mass)
        outs.append(out)
        if accumulate_mass:
            start = 0
            for seg in store:
                if getattr(seg, "scores", None) is not None:
                    seg.scores += mass[start : start + seg.keys.shape[0]]
                start += seg.keys.shape[0]
            if residual.scores is not None:
                residual.scores[mine] += mass[start:]
        offset += tokens
    return torch.cat(outs)


# --------------------------------------------------------------------------- prefill statistics
def window_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """Causal attention of the last `window` queries over all keys, GQA-averaged: (H_kv, W, T).

    query (H_q, T, D), keys (H_kv, T, D); fp32.
    """
    num_q, seq_len, _ = query.shape
    num_kv = keys.shape[0]
    w = min(window, seq_len)
    q_win = query[:, seq_len - w :].float().view(num_kv, num_q // num_kv, w, -1)  # (H_kv, R, W, D)
    logits = torch.einsum("hrwd,htd->hrwt", q_win, keys.float()) * scaling
    key_pos = torch.arange(seq_len, device=query.device)
    query_pos = torch.arange(seq_len - w, seq_len, device=query.device)
    logits.masked_fill_(key_pos[None, :] > query_pos[:, None], -torch.inf)
    return logits.softmax(dim=-1).mean(dim=1)


def window_attention_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float, window: int) -> dict[str, torch.Tensor]:
    """What the statistics need of `window_attention`, without keeping (H_kv, W, T).

    Returns fp32 {"window_sum": (H_kv, T) attention summed over the window rows,
    "last_query": (H_kv, T) the newest query's row, "row_entropy": (H_kv, W) -sum p log p per row}.
    """
    attn = window_attention(query, keys, scaling, window)
    plogp = torch.where(attn > 0, attn * attn.clamp_min(1e-30).log(), torch.zeros_like(attn))
    return {"window_sum": attn.sum(dim=1), "last_query": attn[:, -1], "row_entropy": -plogp.sum(-1)}
