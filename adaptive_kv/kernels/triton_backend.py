"""Triton backend of the packed KV kernels: input checks and launches (kernels in `triton_kernels`).

Same functions and signatures as `reference`, so the cache runs unchanged on either backend.

Real kernels: quantize_keys, quantize_values (quantise + pack, codes bit-identical to the
reference), dequantize_keys, dequantize_values (unpack + dequantise), varlen_attention (one
launch over every KV head of a layer, optionally split over the sequence, flash-decoding style;
`need_mass` runs a second kernel pass), layout_decode (fused decode over a `DecodeLayout`: reads
packed codes and dequantises them in registers, a fixed set of launches per layer and step with
no host synchronisation; q > 1 dequantises and runs varlen_attention), window_attention_scores
(prefill statistics in two passes, never holding W x T). pack and unpack delegate to the
reference (the kernels fuse them). Shapes the kernels do not cover (head_dim or channel group not
a power of two, empty inputs) also delegate to the reference.

Importing this module imports triton; `dispatch` imports it only when the backend is chosen.
"""

from __future__ import annotations

import logging
import sys
from functools import lru_cache

import torch
import triton

from adaptive_kv.kernels import reference
from adaptive_kv.kernels import triton_kernels as K
from adaptive_kv.kernels.layout import DecodeLayout

pack = reference.pack
unpack = reference.unpack
codes_per_byte = reference.codes_per_byte
PACKABLE_BITS = reference.PACKABLE_BITS

_QUANT_BLOCK_N = 16  # tokens per program for value (de)quantisation and key dequantisation
_BLOCK_M = 16  # query rows per attention program (tl.dot needs >= 16)
_BLOCK_N = 32  # tokens per attention inner step
_TOKENS_PER_SPLIT = 512  # flash-decoding: a split below this is not worth its merge
_BLOCK_N_DECODE = 64  # tokens per fused-decode tile (at most one key group)
_NO_FMA = {"enable_fp_fusion": False}  # quantisers must round like torch (no fused multiply-add)


logger = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _fallback(op: str, why: str) -> None:
    """Log once that `op` runs the torch reference for this shape, and why."""
    logger.warning("triton %s: %s; using the torch reference", op, why)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")


# --------------------------------------------------------------------------- quantisation
def quantize_keys(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise key groups (G_n, G, D) per channel: packed codes (G_n*G, D*bits/8), scale/zero (G_n, D)."""
    _check_bits(bits)
    if keys.dim() != 3:
        raise ValueError(f"keys must be (G_n, G, D), got shape {tuple(keys.shape)}")
    num_groups, group, head_dim = keys.shape
    if not _pow2(head_dim) or keys.numel() == 0:  # nothing to launch for no tokens
        if keys.numel():
            _fallback("quantize_keys", f"head_dim={head_dim} is not a power of two")
        return reference.quantize_keys(keys, bits)
    keys = keys.contiguous()
    packed = keys.new_empty(num_groups * group, head_dim * bits // 8, dtype=torch.uint8)
    scale = keys.new_empty(num_groups, head_dim, dtype=torch.float16)
    zero = torch.empty_like(scale)
    K.quantize_keys_kernel[(num_groups,)](
        keys, packed, scale, zero, group,
        D=head_dim, BITS=bits, BLOCK_G=triton.next_power_of_2(group), **_NO_FMA,
    )
    return packed, scale, zero


def quantize_values(values: torch.Tensor, bits: int, channel_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise values (N, D) per token over channel groups: codes (N, D*bits/8), scale/zero (N, D/cg)."""
    _check_bits(bits)
    _check_2d("values", values)
    n, head_dim = values.shape
    if channel_group < 1 or head_dim % channel_group:
        raise ValueError(f"channel_group must divide head_dim={head_dim}, got {channel_group}")
    if not (_pow2(head_dim) and _pow2(channel_group)) or n == 0:
        if n:
            _fallback("quantize_values", f"head_dim={head_dim} or channel_group={channel_group} not a power of two")
        return reference.quantize_values(values, bits, channel_group)
    values = values.contiguous()
    packed = values.new_empty(n, head_dim * bits // 8, dtype=torch.uint8)
    scale = values.new_empty(n, head_dim // channel_group, dtype=torch.float16)
    zero = torch.empty_like(scale)
    K.quantize_values_kernel[(triton.cdiv(n, _QUANT_BLOCK_N),)](
        values, packed, scale, zero, n,
        D=head_dim, CG=channel_group, BITS=bits, BLOCK_N=_QUANT_BLOCK_N, **_NO_FMA,
    )
    return packed, scale, zero


def dequantize_keys(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_len: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Keys (N, D) from packed codes (N, D*bits/8) and per-group scale/zero (G_n, D) of `group_len` tokens."""
    _check_bits(bits)
    _check_2d("packed", packed)
    n = packed.shape[0]
    head_dim = packed.shape[1] * 8 // bits
    if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[1] != head_dim:
        raise ValueError(f"scale/zero must be (G_n, {head_dim}), got {tuple(scale.shape)} and {tuple(zero.shape)}")
    if not _pow2(head_dim) or n == 0:
        if n:
            _fallback("dequantize_keys", f"head_dim={head_dim} is not a power of two")
        return reference.dequantize_keys(packed, scale, zero, group_len, bits, dtype)
    # token -> group index; output_size avoids a device sync
    token_group = torch.arange(scale.shape[0], device=packed.device, dtype=torch.int32).repeat_interleave(
        group_len.to(packed.device), output_size=n
    )
    out = torch.empty(n, head_dim, dtype=dtype, device=packed.device)
    K.dequantize_keys_kernel[(triton.cdiv(n, _QUANT_BLOCK_N),)](
        packed.contiguous(), scale.contiguous(), zero.contiguous(), token_group, out, n,
        D=head_dim, BITS=bits, BLOCK_N=_QUANT_BLOCK_N, **_NO_FMA,
    )
    return out


def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Values (N, D) from packed codes (N, D*bits/8) and per-token scale/zero (N, D/cg)."""
    _check_bits(bits)
    _check_2d("packed", packed)
    n = packed.shape[0]
    head_dim = packed.shape[1] * 8 // bits
    if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != n or head_dim % scale.shape[1]:
        raise ValueError(f"scale/zero must be ({n}, D/cg), got {tuple(scale.shape)} and {tuple(zero.shape)}")
    channel_group = head_dim // scale.shape[1]
    if not (_pow2(head_dim) and _pow2(channel_group)) or n == 0:
        if n:
            _fallback("dequantize_values", f"head_dim={head_dim} or channel_group={channel_group} not a power of two")
        return reference.dequantize_values(packed, scale, zero, bits, dtype)
    out = torch.empty(n, head_dim, dtype=dtype, device=packed.device)
    K.dequantize_values_kernel[(triton.cdiv(n, _QUANT_BLOCK_N),)](
        packed.contiguous(), scale.contiguous(), zero.contiguous(), out, n,
        D=head_dim, CG=channel_group, BITS=bits, BLOCK_N=_QUANT_BLOCK_N, **_NO_FMA,
    )
    return out


# --------------------------------------------------------------------------- attention
def _default_splits(longest: int, programs: int, device: torch.device) -> int:
    """Sequence splits so that the grid fills the GPU, each split at least _TOKENS_PER_SPLIT long."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(longest, _TOKENS_PER_SPLIT), triton.cdiv(2 * sms, programs)))


def _check_attention(query, keys, values, heads, num_kv_heads) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be (H_q, q, D), got shape {tuple(query.shape)}")
    if keys.dim() != 2 or keys.shape != values.shape or keys.shape[1] != query.shape[2]:
        raise ValueError(
            f"keys/values must both be (N, D={query.shape[2]}), got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if heads.shape != (keys.shape[0],):
        raise ValueError(f"heads must be ({keys.shape[0]},), got {tuple(heads.shape)}")
    if num_kv_heads < 1 or query.shape[0] % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide the {query.shape[0]} query heads")


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

    As `reference.varlen_attention` (which, like this, takes the causal span from the query
    length q): output (H_q, q, D) and, if `need_mass`, the attention mass per token (N,).
    """
    return _varlen_attention(query, keys, values, heads, num_kv_heads, scaling, need_mass, num_splits=None)


def _varlen_attention(query, keys, values, heads, num_kv_heads, scaling, need_mass, num_splits):
    _check_attention(query, keys, values, heads, num_kv_heads)
    num_q, q_len, head_dim = query.shape
    if not _pow2(head_dim) or head_dim < 16 or keys.shape[0] == 0:
        if keys.shape[0]:
            _fallback("varlen_attention", f"head_dim={head_dim} is not a power of two >= 16")
        return reference.varlen_attention(query, keys, values, heads, num_kv_heads, scaling, q_len, need_mass)
    device = query.device
    rep = num_q // num_kv_heads
    rows_per_head = rep * q_len  # query head h*rep + r -> KV head h; rows are (r, position)
    heads = heads.to(device=device, dtype=torch.long)
    order = torch.argsort(heads, stable=True).to(torch.int32)  # tokens grouped by head, oldest first
    counts = torch.bincount(heads, minlength=num_kv_heads)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    longest = int(counts.max())  # sync: the grid needs it
    counts = counts.to(torch.int32)
    keys, values = keys.contiguous(), values.to(keys.dtype).contiguous()
    q = query.to(keys.dtype).contiguous()  # (H_kv * rows_per_head, D) in memory
    m_blocks = triton.cdiv(rows_per_head, _BLOCK_M)
    splits = num_splits or _default_splits(longest, num_kv_heads * m_blocks, device)
    split_len = _BLOCK_N * triton.cdiv(triton.cdiv(longest, splits), _BLOCK_N)
    splits = triton.cdiv(longest, split_len)
    rows = num_kv_heads * rows_per_head
    acc = torch.empty(splits, rows, head_dim, dtype=torch.float32, device=device)
    run_max = torch.empty(splits, rows, dtype=torch.float32, device=device)
    run_sum = torch.empty_like(run_max)
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"
    K.varlen_attention_kernel[(num_kv_heads, m_blocks, splits)](
        q, keys, values, order, starts, counts, acc, run_max, run_sum,
        float(scaling), q_len, rows_per_head, split_len,
        D=head_dim, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, DOT_PRECISION=precision,
    )
    # merge the splits (log-sum-exp); a split that saw no token has max -inf and weight 0
    top = run_max.amax(0)  # (rows,)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(run_max - top)  # (splits, rows)
    total = (weight * run_sum).sum(0)
    out = (weight[..., None] * acc).sum(0) / total.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    out = out.to(query.dtype).view(num_q, q_len, head_dim)
    if not need_mass:
        return out, None
    lse = top + torch.log(total)  # (rows,)
    mass = torch.zeros(keys.shape[0], dtype=torch.float32, device=device)
    K.token_mass_kernel[(num_kv_heads, triton.cdiv(longest, _BLOCK_N))](
        q, keys, order, starts, counts, lse, mass,
        float(scaling), q_len, rows_per_head, 1.0 / rep,
        D=head_dim, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, DOT_PRECISION=precision,
    )
    return out, mass


# --------------------------------------------------------------------------- fused decode over a DecodeLayout
Segment = reference.Segment


def _fused_unsupported(query: torch.Tensor, layout: DecodeLayout, residual) -> str | None:
    """Why the fused decode kernels cannot run these inputs (None if they can)."""
    num_q, q_len, head_dim = query.shape
    if q_len != 1:
        return "only a single decode query is fused"
    if not _pow2(head_dim) or head_dim < 16:
        return f"head_dim={head_dim} is not a power of two >= 16"
    if layout.group_size < 16:
        return f"group_size={layout.group_size} is below the 16 tokens of a tile"
    if not _pow2(layout.value_group):
        return f"value channel group {layout.value_group} is not a power of two"
    if layout.dtype not in (None, residual.keys.dtype) or query.dtype != residual.keys.dtype:
        return f"stored 16-bit sides ({layout.dtype}), residual ({residual.keys.dtype}) and query ({query.dtype}) differ"
    return None


def layout_decode(
    query: torch.Tensor, layout: DecodeLayout, residual, scaling: float, accumulate_mass: bool = False
) -> torch.Tensor:
    """As `reference.layout_decode`: output (R*rep, q, D) of query (R*rep, q, D) over `layout` + `residual`.

    One decode query runs fused in a fixed set of launches whatever the heads, segments and bits:
    one program per work item and per row's residual reads packed codes and dequantises them in
    registers, one merge per row, and with `accumulate_mass` one pass that adds each token's
    attention mass to its H2O score in place. No host synchronisation: the grid comes from the
    layout, which is built when the store changes. Several query tokens (q > 1) dequantise the
    store and run `varlen_attention`.
    """
    _check_layout_query(query, layout)
    why = _fused_unsupported(query, layout, residual)
    if why:
        if query.shape[1] == 1:
            _fallback("layout_decode", why)
        return reference.layout_decode(query, layout, residual, scaling, accumulate_mass, kernels=sys.modules[__name__])
    num_q, _, head_dim = query.shape
    rows = layout.num_rows
    rep = num_q // rows
    programs = layout.num_items + rows
    device = query.device
    q = query.reshape(num_q, head_dim).contiguous()
    keys, values = residual.keys.contiguous(), residual.values.contiguous()
    acc = torch.empty(programs, rep, head_dim, dtype=torch.float32, device=device)
    top = torch.empty(programs, rep, dtype=torch.float32, device=device)
    total = torch.empty_like(top)
    block_m = max(16, triton.next_power_of_2(rep))
    block_n = min(layout.group_size, _BLOCK_N_DECODE)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    K.layout_decode_kernel[(programs,)](
        q, layout.table, layout.items, keys, values, residual.lengths, acc, top, total,
        float(scaling), layout.num_items, rep,
        D=head_dim, VALUE_CG=layout.value_group, GROUP=layout.group_size,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
    )
    out = torch.empty_like(q)
    lse = torch.empty(num_q, dtype=torch.float32, device=device)
    K.layout_merge_kernel[(rows,)](acc, top, total, layout.item_ranges, out, lse, layout.num_items, rep,
                                   D=head_dim, BLOCK_M=block_m)
    if accumulate_mass:
        scores = residual.scores
        K.layout_mass_kernel[(programs,)](
            q, layout.table, layout.items, keys, residual.lengths, keys if scores is None else scores, lse,
            float(scaling), 1.0 / rep, layout.num_items, rep,
            D=head_dim, GROUP=layout.group_size, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=precision, RESIDUAL_SCORES=scores is not None,
        )
    return out.view(num_q, 1, head_dim)


def _check_layout_query(query: torch.Tensor, layout: DecodeLayout) -> None:
    if query.dim() != 3 or query.shape[0] % layout.num_rows:
        raise ValueError(f"query must be (R*rep, q, D) with R={layout.num_rows} rows, got {tuple(query.shape)}")


# --------------------------------------------------------------------------- prefill statistics
def window_attention_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float, window: int) -> dict[str, torch.Tensor]:
    """As `reference.window_attention_scores`, in two passes that never hold (H_kv, W, T).

    query (H_q, T, D), keys (H_kv, T, D). Pass 1 finds each window row's log-sum-exp, pass 2
    recomputes the probabilities block by block of keys and reduces them (fp32 throughout).
    """
    if query.dim() != 3 or keys.dim() != 3 or query.shape[1:] != keys.shape[1:] or query.shape[0] % keys.shape[0]:
        raise ValueError(f"query must be (H_q, T, D) and keys (H_kv, T, D), got {tuple(query.shape)} and {tuple(keys.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    num_q, seq_len, head_dim = query.shape
    num_kv = keys.shape[0]
    if not _pow2(head_dim) or head_dim < 16:
        _fallback("window_attention_scores", f"head_dim={head_dim} is not a power of two >= 16")
        return reference.window_attention_scores(query, keys, scaling, window)
    w = min(window, seq_len)
    rep = num_q // num_kv
    keys = keys.contiguous()
    q_win = query[:, seq_len - w :].to(keys.dtype).contiguous()  # (H_q, W, D)
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"  # half inputs: products exact in fp32
    lse = torch.empty(num_q * w, dtype=torch.float32, device=keys.device)
    K.window_lse_kernel[(num_kv, triton.cdiv(rep * w, _BLOCK_M))](
        q_win, keys, lse, float(scaling), seq_len, w, rep * w,
        D=head_dim, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, DOT_PRECISION=precision,
    )
    blocks, block_w = triton.cdiv(seq_len, _BLOCK_N), max(16, triton.next_power_of_2(w))
    window_sum = torch.empty(num_kv, seq_len, dtype=torch.float32, device=keys.device)
    last_query = torch.empty_like(window_sum)
    entropy = torch.empty(num_kv, blocks, block_w, dtype=torch.float32, device=keys.device)
    K.window_scores_kernel[(num_kv, blocks)](
        q_win, keys, lse, window_sum, last_query, entropy, float(scaling), seq_len, w, rep, 1.0 / rep,
        D=head_dim, BLOCK_W=block_w, BLOCK_T=_BLOCK_N, DOT_PRECISION=precision,
    )
    return {"window_sum": window_sum, "last_query": last_query, "row_entropy": entropy.sum(1)[:, :w]}


__all__ = [
    "pack", "unpack", "quantize_keys", "dequantize_keys", "quantize_values", "dequantize_values", "varlen_attention",
    "Segment", "layout_decode", "window_attention_scores",
]
