"""Torch reference of the packed KV kernels: the specification every other backend must match.

Layout (KIVI, arXiv:2402.02750): keys are quantised per channel over a group of tokens (outlier
channels get their own range), values per token over groups of channels. Quantisation is
asymmetric: ``x ≈ code * scale + zero`` with fp16 scale and zero. Codes of 2 and 4 bits are packed
along the channel axis, low bits first: four 2-bit or two 4-bit codes per byte; 8-bit codes are
bytes as they are.
"""

from __future__ import annotations

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
