"""Triton kernels of the packed KV store; host code (checks, launches) is in `triton_backend`.

Only `@triton.jit` code lives here. The torch reference (`reference.py`) is the specification:
quantisation reproduces its fp16 rounding of scale and zero bit for bit, so the integer codes
match exactly; attention is an online-softmax (FlashAttention-2) loop in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------- shared helpers
@triton.jit
def _round_half_even(x):
    """torch.round for x >= 0: halves go to the even neighbour.

    floor(x + 0.5) is wrong twice: it rounds halves up and, in fp32, x + 0.5 itself can round up
    (x = 0.5 - 2**-25 gives 1.0). floor and x - floor(x) are exact, so decide on the fraction.
    """
    r = tl.floor(x)
    frac = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return r + up.to(tl.float32)


@triton.jit
def _fp16_next(h, UP: tl.constexpr):
    """torch.nextafter(h, +inf if UP else -inf) for finite fp16 `h`, on its bit pattern."""
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    negative = bits >= 0x8000
    is_zero = (bits & 0x7FFF) == 0
    if UP:
        nxt = tl.where(is_zero, 0x0001, tl.where(negative, bits - 1, bits + 1))
    else:
        nxt = tl.where(is_zero, 0x8001, tl.where(negative, bits + 1, bits - 1))
    return nxt.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _scale_and_zero(lo, hi, QMAX: tl.constexpr):
    """fp16 (scale, zero) whose grid covers [lo, hi]: reference `_scale_and_zero`, same rounding.

    Division is `div_rn` (IEEE, like torch) rather than Triton's fast fp32 division; the launch
    turns off FMA fusion so `scale * qmax + zero` rounds twice, as torch does.
    """
    zero = lo.to(tl.float16)
    zero = tl.where(zero.to(tl.float32) > lo, _fp16_next(zero, False), zero)
    span = tl.maximum(hi - zero.to(tl.float32), 1e-6)
    scale = tl.math.div_rn(span, tl.full(span.shape, QMAX, tl.float32)).to(tl.float16)
    too_small = scale.to(tl.float32) * QMAX + zero.to(tl.float32) < hi
    scale = tl.where(too_small, _fp16_next(scale, True), scale)
    return scale, zero


@triton.jit
def _encode(x, scale, zero, QMAX: tl.constexpr):
    """Integer codes (int32) of fp32 `x` on the grid (scale, zero): round half even, clamp.

    An 8-bit constant group can get scale 0 (1e-6 / 255 underflows fp16); the reference then
    divides 0 by 0 and casts NaN to uint8, which gives 0 on CPU. Code 0 is chosen explicitly here.
    """
    scale = scale.to(tl.float32)
    q = tl.math.div_rn(x - zero.to(tl.float32), tl.where(scale > 0, scale, 1.0))
    q = tl.where(scale > 0, q, 0.0)
    q = _round_half_even(tl.maximum(q, 0.0))
    return tl.minimum(q, QMAX).to(tl.int32)


@triton.jit
def _pack(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Codes (ROWS, D) -> bytes (ROWS, D*BITS/8), low bits first (codes never overlap: sum == or)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    grouped = tl.reshape(codes, (ROWS, D // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * BITS
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack(packed_ptr, rows, row_ok, cols, D: tl.constexpr, BITS: tl.constexpr):
    """fp32 codes (R, D) of token `rows`: byte c // per_byte, shifted by (c % per_byte) * bits."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(packed_ptr + rows[:, None] * (D // PER_BYTE) + cols[None, :] // PER_BYTE, mask=row_ok[:, None], other=0)
    shift = (cols % PER_BYTE) * BITS
    return ((byte.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


# --------------------------------------------------------------------------- quantisation
@triton.jit
def quantize_keys_kernel(
    keys_ptr, packed_ptr, scale_ptr, zero_ptr, group,
    D: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """One program per group: keys (G, D) -> per-channel scale/zero (D,) and packed codes (G, D*b/8)."""
    gid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, D)
    row_ok = rows < group
    tokens = gid * group + rows  # flat token index
    x = tl.load(keys_ptr + tokens[:, None] * D + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    lo = tl.min(tl.where(row_ok[:, None], x, float("inf")), axis=0)  # (D,)
    hi = tl.max(tl.where(row_ok[:, None], x, float("-inf")), axis=0)
    scale, zero = _scale_and_zero(lo, hi, (1 << BITS) - 1)
    tl.store(scale_ptr + gid * D + cols, scale)
    tl.store(zero_ptr + gid * D + cols, zero)
    codes = _encode(x, scale[None, :], zero[None, :], (1 << BITS) - 1)
    packed = _pack(codes, BLOCK_G, D, BITS)
    out_cols = tl.arange(0, D * BITS // 8)
    tl.store(packed_ptr + tokens[:, None] * (D * BITS // 8) + out_cols[None, :], packed, mask=row_ok[:, None])


@triton.jit
def quantize_values_kernel(
    values_ptr, packed_ptr, scale_ptr, zero_ptr, num_tokens,
    D: tl.constexpr, CG: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_N tokens per program: values (N, D) -> scale/zero per (token, channel group), packed codes."""
    NG: tl.constexpr = D // CG
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    g = tl.arange(0, NG)
    c = tl.arange(0, CG)
    offs = rows[:, None, None] * D + g[None, :, None] * CG + c[None, None, :]  # (BLOCK_N, NG, CG)
    x = tl.load(values_ptr + offs, mask=row_ok[:, None, None], other=0.0).to(tl.float32)
    scale, zero = _scale_and_zero(tl.min(x, axis=2), tl.max(x, axis=2), (1 << BITS) - 1)  # (BLOCK_N, NG)
    sz_offs = rows[:, None] * NG + g[None, :]
    tl.store(scale_ptr + sz_offs, scale, mask=row_ok[:, None])
    tl.store(zero_ptr + sz_offs, zero, mask=row_ok[:, None])
    codes = _encode(x, scale[:, :, None], zero[:, :, None], (1 << BITS) - 1)
    packed = _pack(tl.reshape(codes, (BLOCK_N, D)), BLOCK_N, D, BITS)
    out_cols = tl.arange(0, D * BITS // 8)
    tl.store(packed_ptr + rows[:, None] * (D * BITS // 8) + out_cols[None, :], packed, mask=row_ok[:, None])


@triton.jit
def dequantize_keys_kernel(
    packed_ptr, scale_ptr, zero_ptr, token_group_ptr, out_ptr, num_tokens,
    D: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Keys (N, D) = code * scale[group] + zero[group], each token's group from `token_group` (N,)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    cols = tl.arange(0, D)
    codes = _unpack(packed_ptr, rows, row_ok, cols, D, BITS)
    grp = tl.load(token_group_ptr + rows, mask=row_ok, other=0)
    sz = grp[:, None] * D + cols[None, :]
    scale = tl.load(scale_ptr + sz, mask=row_ok[:, None], other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + sz, mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = codes * scale + zero
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def dequantize_values_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr, num_tokens,
    D: tl.constexpr, CG: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Values (N, D) = code * scale[token, c // CG] + zero[token, c // CG]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    cols = tl.arange(0, D)
    codes = _unpack(packed_ptr, rows, row_ok, cols, D, BITS)
    sz = rows[:, None] * (D // CG) + cols[None, :] // CG
    scale = tl.load(scale_ptr + sz, mask=row_ok[:, None], other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + sz, mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = codes * scale + zero
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- attention
@triton.jit
def varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, order_ptr, starts_ptr, counts_ptr,
    acc_ptr, max_ptr, sum_ptr,
    scaling, q_len, rows_per_head, split_len,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial attention of one (KV head, row block, sequence split); grid (H_kv, M blocks, splits).

    Rows are the rep * q query rows of one KV head (GQA: the head's query heads share each K/V
    load). Row r is query position r % q and sees slot j of its head iff j <= count - q + r % q.
    Tokens of the head are `order[start : start + count]` (flat indices, oldest first). Writes the
    unnormalised output, running max and running sum; the host merges the splits.
    DOT_PRECISION is "ieee" for fp32 inputs (tl.dot would otherwise use TF32 on GPUs).
    """
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    start = tl.load(starts_ptr + head)
    count = tl.load(counts_ptr + head)
    row_ok = rows < rows_per_head
    dims = tl.arange(0, D)
    q_rows = head * rows_per_head + rows
    q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    last_visible = count - q_len + rows % q_len  # (BLOCK_M,)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, count)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        idx = tl.load(order_ptr + start + cols, mask=col_ok, other=0).to(tl.int64)
        k = tl.load(k_ptr + idx[:, None] * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scaling  # (BLOCK_M, BLOCK_N)
        visible = col_ok[None, :] & (cols[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + idx[:, None] * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
        m_i = m_new
    out_rows = split * tl.num_programs(0) * rows_per_head + q_rows
    tl.store(acc_ptr + out_rows[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(max_ptr + out_rows, m_i, mask=row_ok)
    tl.store(sum_ptr + out_rows, l_i, mask=row_ok)


@triton.jit
def token_mass_kernel(
    q_ptr, k_ptr, order_ptr, starts_ptr, counts_ptr, lse_ptr, mass_ptr,
    scaling, q_len, rows_per_head, inv_rep,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Second pass for H2O: mass of each token = sum over the head's rows of exp(s - lse) / rep.

    Grid (H_kv, token blocks); recomputes the logits against the final log-sum-exp of each row,
    so no (rows, tokens) probability matrix is ever stored.
    """
    head = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(starts_ptr + head)
    count = tl.load(counts_ptr + head)
    col_ok = cols < count
    dims = tl.arange(0, D)
    idx = tl.load(order_ptr + start + cols, mask=col_ok, other=0).to(tl.int64)
    k = tl.load(k_ptr + idx[:, None] * D + dims[None, :], mask=col_ok[:, None], other=0.0)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, rows_per_head, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_per_head
        q_rows = head * rows_per_head + rows
        q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + q_rows, mask=row_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scaling
        visible = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= (count - q_len + rows % q_len)[:, None])
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        total += tl.sum(p, axis=0)
    tl.store(mass_ptr + idx, total * inv_rep, mask=col_ok)


# --------------------------------------------------------------------------- fused decode over a DecodeLayout
@triton.jit
def _dequant_rows(
    data_ptr, scale_ptr, zero_ptr, rows, sz_rows, row_ok, dims,
    D: tl.constexpr, BITS: tl.constexpr, CG: tl.constexpr,
):
    """Rows (R, D) of a stored side: as stored (BITS 16) or code * scale + zero in fp32.

    Scale/zero row `sz_rows` holds D // CG entries: keys use their group (CG 1), values their own
    token (CG = channel group). The caller rounds to the model dtype, as the reference does.
    """
    # one return after an if/else: the compiler only drops the untaken branch of a constexpr if/else;
    # code after an early return is still built, and _unpack's 8 // BITS divides by zero at 16 bits
    if BITS == 16:
        rows_out = tl.load(data_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    else:
        codes = _unpack(data_ptr, rows, row_ok, dims, D, BITS)
        sz = sz_rows[:, None] * (D // CG) + dims[None, :] // CG
        scale = tl.load(scale_ptr + sz, mask=row_ok[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + sz, mask=row_ok[:, None], other=0.0).to(tl.float32)
        rows_out = codes * scale + zero
    return rows_out


@triton.jit
def _typed(address, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """A stored side's pointer from its address: the model's dtype at 16 bits, packed bytes below."""
    if BITS == 16:
        ptr = address.to(tl.pointer_type(DTYPE))
    else:
        ptr = address.to(tl.pointer_type(tl.uint8))
    return ptr


@triton.jit
def _range_tiles(
    q, m_i, l_i, acc, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
    start, count, scale_row, scaling, dims,
    D: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_CG: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the query rows over tokens start .. start + count of one segment.

    The range is whole groups, all full but the last, and BLOCK_N divides GROUP: each tile reads
    one key scale row. Keys and values are dequantised in registers and rounded to the query's
    dtype, as the reference dequantises them.
    """
    for n0 in range(0, count, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < count
        tok = start + offs
        group_row = tl.zeros_like(tok) + scale_row + n0 // GROUP
        k = _dequant_rows(k_ptr, k_scale_ptr, k_zero_ptr, tok, group_row, ok, dims, D, KEY_BITS, 1).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scaling
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds >= 1 token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _dequant_rows(v_ptr, v_scale_ptr, v_zero_ptr, tok, tok, ok, dims, D, VALUE_BITS, VALUE_CG).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _segment_tiles(
    q, m_i, l_i, acc, seg, start, count, scale_row, scaling, dims,
    D: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_CG: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """`_range_tiles` over a segment-table row `seg` (pointer to its SEGMENT_FIELDS int64 entries)."""
    return _range_tiles(
        q, m_i, l_i, acc,
        _typed(tl.load(seg + 2), KEY_BITS, DTYPE), _typed(tl.load(seg + 3), VALUE_BITS, DTYPE),
        tl.load(seg + 4).to(tl.pointer_type(tl.float16)), tl.load(seg + 5).to(tl.pointer_type(tl.float16)),
        tl.load(seg + 6).to(tl.pointer_type(tl.float16)), tl.load(seg + 7).to(tl.pointer_type(tl.float16)),
        start, count, scale_row, scaling, dims, D, KEY_BITS, VALUE_BITS, VALUE_CG, GROUP, BLOCK_N, DOT_PRECISION,
    )


@triton.jit
def _segment_by_value_bits(
    q, m_i, l_i, acc, seg, start, count, scale_row, scaling, dims,
    D: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_CG: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Branch on the segment's value bits (read at run time) to the loop compiled for them."""
    value_bits = tl.load(seg + 1)
    if value_bits == 16:
        m_i, l_i, acc = _segment_tiles(q, m_i, l_i, acc, seg, start, count, scale_row, scaling, dims,
                                       D, KEY_BITS, 16, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
    elif value_bits == 8:
        m_i, l_i, acc = _segment_tiles(q, m_i, l_i, acc, seg, start, count, scale_row, scaling, dims,
                                       D, KEY_BITS, 8, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
    elif value_bits == 4:
        m_i, l_i, acc = _segment_tiles(q, m_i, l_i, acc, seg, start, count, scale_row, scaling, dims,
                                       D, KEY_BITS, 4, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
    else:
        m_i, l_i, acc = _segment_tiles(q, m_i, l_i, acc, seg, start, count, scale_row, scaling, dims,
                                       D, KEY_BITS, 2, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _item(item_ptr, res_len_ptr, num_items, pid):
    """(segment, row, first token, tokens, scale row) of work item `pid`; past the table, a row's residual."""
    if pid < num_items:
        base = item_ptr + pid * 5
        seg = tl.load(base)
        row = tl.load(base + 1)
        start = tl.load(base + 2)
        count = tl.load(base + 3)
        scale_row = tl.load(base + 4)
    else:  # the residual of row pid - num_items: its tokens follow the earlier rows' (sorted by row)
        row = (pid - num_items).to(tl.int64)
        seg = row * 0 - 1
        start = row * 0
        for r in range(0, row):
            start += tl.load(res_len_ptr + r)
        count = tl.load(res_len_ptr + row)
        scale_row = row * 0
    return seg, row, start, count, scale_row


@triton.jit
def layout_decode_kernel(
    q_ptr, seg_ptr, item_ptr, res_k_ptr, res_v_ptr, res_len_ptr, acc_ptr, max_ptr, sum_ptr,
    scaling, num_items, rep,
    D: tl.constexpr, VALUE_CG: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial decode attention of one work item; grid (items + rows,).

    Items come from a `DecodeLayout` (one contiguous token range of one head in one segment, the
    segment's bits and tensor addresses read from the table); the last `rows` programs read each
    row's residual. The rep query heads of a KV head share every load. Writes the unnormalised
    output, max and sum per (program, query head) for `layout_merge_kernel`. Nothing here depends
    on the host: the grid is fixed by the layout.
    """
    pid = tl.program_id(0)
    seg, row, start, count, scale_row = _item(item_ptr, res_len_ptr, num_items, pid)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < rep
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + (row * rep + rows)[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    DTYPE: tl.constexpr = res_k_ptr.dtype.element_ty
    if pid < num_items:
        entry = seg_ptr + seg * 9
        key_bits = tl.load(entry)
        if key_bits == 16:
            m_i, l_i, acc = _segment_by_value_bits(q, m_i, l_i, acc, entry, start, count, scale_row, scaling, dims,
                                                   D, 16, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
        elif key_bits == 8:
            m_i, l_i, acc = _segment_by_value_bits(q, m_i, l_i, acc, entry, start, count, scale_row, scaling, dims,
                                                   D, 8, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
        elif key_bits == 4:
            m_i, l_i, acc = _segment_by_value_bits(q, m_i, l_i, acc, entry, start, count, scale_row, scaling, dims,
                                                   D, 4, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
        else:
            m_i, l_i, acc = _segment_by_value_bits(q, m_i, l_i, acc, entry, start, count, scale_row, scaling, dims,
                                                   D, 2, VALUE_CG, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
    else:
        m_i, l_i, acc = _range_tiles(q, m_i, l_i, acc, res_k_ptr, res_v_ptr, res_k_ptr, res_k_ptr, res_k_ptr,
                                     res_k_ptr, start, count, scale_row, scaling, dims,
                                     D, 16, 16, VALUE_CG, GROUP, BLOCK_N, DOT_PRECISION)
    out = pid * rep + rows
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(max_ptr + out, m_i, mask=row_ok)
    tl.store(sum_ptr + out, l_i, mask=row_ok)


@triton.jit
def layout_merge_kernel(
    acc_ptr, max_ptr, sum_ptr, ranges_ptr, out_ptr, lse_ptr, num_items, rep,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge one row's partials (its items, then its residual) by log-sum-exp; grid (rows,).

    Writes the normalised output in the query's dtype and each query head's log-sum-exp (fp32),
    which the mass pass reads.
    """
    row = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < rep
    dims = tl.arange(0, D)
    part = (num_items + row) * rep + rows
    m_i = tl.load(max_ptr + part, mask=row_ok, other=float("-inf"))
    l_i = tl.load(sum_ptr + part, mask=row_ok, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    for i in range(tl.load(ranges_ptr + row), tl.load(ranges_ptr + row + 1)):
        item = i * rep + rows
        m_p = tl.load(max_ptr + item, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, m_p)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        mine, theirs = tl.exp(m_i - safe), tl.exp(m_p - safe)
        l_i = l_i * mine + tl.load(sum_ptr + item, mask=row_ok, other=0.0) * theirs
        acc_p = tl.load(acc_ptr + item[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
        acc = acc * mine[:, None] + acc_p * theirs[:, None]
        m_i = m_new
    out = row * rep + rows
    total = tl.maximum(l_i, 1.1754943508222875e-38)
    tl.store(out_ptr + out[:, None] * D + dims[None, :], (acc / total[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + out, m_i + tl.log(total), mask=row_ok)


@triton.jit
def _mass_tiles(
    q, lse, row_ok, k_ptr, k_scale_ptr, k_zero_ptr, scores_ptr, start, count, scale_row, scaling, inv_rep, dims,
    D: tl.constexpr, KEY_BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add each token's attention mass (probabilities summed over the rows / rep) to its H2O score."""
    for n0 in range(0, count, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < count
        tok = start + offs
        group_row = tl.zeros_like(tok) + scale_row + n0 // GROUP
        k = _dequant_rows(k_ptr, k_scale_ptr, k_zero_ptr, tok, group_row, ok, dims, D, KEY_BITS, 1).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scaling
        p = tl.where(row_ok[:, None] & ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        old = tl.load(scores_ptr + tok, mask=ok, other=0.0)
        tl.store(scores_ptr + tok, old + tl.sum(p, axis=0) * inv_rep, mask=ok)


@triton.jit
def _segment_mass(
    q, lse, row_ok, seg, start, count, scale_row, scaling, inv_rep, dims,
    D: tl.constexpr, KEY_BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _mass_tiles(q, lse, row_ok, _typed(tl.load(seg + 2), KEY_BITS, DTYPE),
                tl.load(seg + 4).to(tl.pointer_type(tl.float16)), tl.load(seg + 5).to(tl.pointer_type(tl.float16)),
                tl.load(seg + 8).to(tl.pointer_type(tl.float32)), start, count, scale_row, scaling, inv_rep, dims,
                D, KEY_BITS, GROUP, BLOCK_N, DOT_PRECISION)


@triton.jit
def layout_mass_kernel(
    q_ptr, seg_ptr, item_ptr, res_k_ptr, res_len_ptr, res_scores_ptr, lse_ptr,
    scaling, inv_rep, num_items, rep,
    D: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RESIDUAL_SCORES: tl.constexpr,
):
    """H2O pass after the merge; grid (items + rows,) as `layout_decode_kernel`.

    Recomputes each token's logits against its rows' final log-sum-exp and adds the mass to the
    token's score in place (a segment whose table entry has no score tensor is skipped), so no
    (rows, tokens) matrix is stored and nothing returns to the host.
    """
    pid = tl.program_id(0)
    seg, row, start, count, scale_row = _item(item_ptr, res_len_ptr, num_items, pid)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < rep
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + (row * rep + rows)[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + row * rep + rows, mask=row_ok, other=float("inf"))
    DTYPE: tl.constexpr = res_k_ptr.dtype.element_ty
    if pid < num_items:
        entry = seg_ptr + seg * 9
        if tl.load(entry + 8) != 0:
            key_bits = tl.load(entry)
            if key_bits == 16:
                _segment_mass(q, lse, row_ok, entry, start, count, scale_row, scaling, inv_rep, dims,
                              D, 16, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
            elif key_bits == 8:
                _segment_mass(q, lse, row_ok, entry, start, count, scale_row, scaling, inv_rep, dims,
                              D, 8, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
            elif key_bits == 4:
                _segment_mass(q, lse, row_ok, entry, start, count, scale_row, scaling, inv_rep, dims,
                              D, 4, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
            else:
                _segment_mass(q, lse, row_ok, entry, start, count, scale_row, scaling, inv_rep, dims,
                              D, 2, GROUP, BLOCK_N, DTYPE, DOT_PRECISION)
    elif RESIDUAL_SCORES:
        _mass_tiles(q, lse, row_ok, res_k_ptr, res_k_ptr, res_k_ptr, res_scores_ptr, start, count, scale_row,
                    scaling, inv_rep, dims, D, 16, GROUP, BLOCK_N, DOT_PRECISION)


# --------------------------------------------------------------------------- prefill statistics
@triton.jit
def window_lse_kernel(
    q_ptr, k_ptr, lse_ptr, scaling, seq_len, window, rows_per_head,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 1: log-sum-exp of every observation-window row; grid (H_kv, row blocks).

    Rows of KV head h are its rep query heads' W window queries, (r, w) -> q row (h*rep + r)*W + w,
    and window row w sees keys 0 .. T - W + w (causal). Online softmax in fp32, nothing stored
    per key.
    """
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_per_head
    dims = tl.arange(0, D)
    q_rows = head * rows_per_head + rows
    q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    last_visible = seq_len - window + rows % window
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, seq_len, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + (head * seq_len + cols[:, None]) * D + dims[None, :], mask=(cols < seq_len)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scaling
        s = tl.where(cols[None, :] <= last_visible[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is visible to every row
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + q_rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def window_scores_kernel(
    q_ptr, k_ptr, lse_ptr, window_sum_ptr, last_query_ptr, entropy_ptr,
    scaling, seq_len, window, rep, inv_rep,
    D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 2: per-key aggregates of the GQA-averaged window probabilities; grid (H_kv, key blocks).

    Recomputes p = exp(s - lse) for the W rows of each of the head's rep query heads against one
    block of keys, averages over rep, and writes the window sum and the last row per key (H_kv, T)
    and this block's share of each row's entropy -sum p log p (H_kv, key blocks, BLOCK_W). Only a
    (W, BLOCK_T) tile ever exists.
    """
    head = tl.program_id(0)
    block = tl.program_id(1)
    cols = block * BLOCK_T + tl.arange(0, BLOCK_T)
    col_ok = cols < seq_len
    dims = tl.arange(0, D)
    k = tl.load(k_ptr + (head * seq_len + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
    w = tl.arange(0, BLOCK_W)
    w_ok = w < window
    visible = w_ok[:, None] & col_ok[None, :] & (cols[None, :] <= (seq_len - window + w)[:, None])
    probs = tl.zeros((BLOCK_W, BLOCK_T), tl.float32)
    for r in range(0, rep):
        q_rows = (head * rep + r) * window + w
        q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=w_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + q_rows, mask=w_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scaling
        probs += tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    probs = probs * inv_rep
    tl.store(window_sum_ptr + head * seq_len + cols, tl.sum(probs, axis=0), mask=col_ok)
    last = tl.sum(tl.where((w == window - 1)[:, None], probs, 0.0), axis=0)
    tl.store(last_query_ptr + head * seq_len + cols, last, mask=col_ok)
    plogp = tl.where(probs > 0, probs * tl.log(tl.maximum(probs, 1e-30)), 0.0)
    tl.store(entropy_ptr + (head * tl.num_programs(1) + block) * BLOCK_W + w, -tl.sum(plogp, axis=1))
