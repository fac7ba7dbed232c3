"""Where a decode step reads a layer's packed store from, computed once per store change.

A decode step over a compressed layer reads tokens from several segments (sinks, one bucket per
bit pair), each holding runs ("groups") of one head. Working out which tokens belong to which
head (sorting, counting, sizing a grid) at every step costs host work and a device sync per
segment, which dominates a GPU decode step. `DecodeLayout` does that work when the store changes
(a plan applied, a group flushed, tokens evicted) and keeps the result on the device:

* a segment table, one row per segment: bit widths and the addresses of its tensors;
* work items, each one contiguous range of one head's tokens in one segment, no longer than
  `tokens_per_item` (so long heads split over many programs, flash-decoding style), sorted by the
  attention row (sequence x KV head) they belong to, with each row's item range.

A range covers whole groups, and every group in it but the last is full, so a range's tile of
`group_size` tokens reads one key scale row. The residual (the newest tokens, which change every
step) is not part of the layout: the step passes it as it is.

Several sequences' stores make one layout (rows b * H + h), so one launch serves a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# segment table columns
KEY_BITS, VALUE_BITS, KEYS, VALUES, KEY_SCALE, KEY_ZERO, VALUE_SCALE, VALUE_ZERO, SCORES = range(9)
SEGMENT_FIELDS = 9
# work item columns
ITEM_SEGMENT, ITEM_ROW, ITEM_START, ITEM_TOKENS, ITEM_SCALE_ROW = range(5)
ITEM_FIELDS = 5
PROGRAMS_PER_SM = 4  # items per streaming multiprocessor the default split aims for
DEFAULT_TOKENS_PER_ITEM = 1024  # off CUDA (the interpreter) there is no SM count to aim for


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@dataclass(frozen=True)
class DecodeLayout:
    """Device-resident layout of one or more sequences' packed stores (residuals excluded)."""

    stores: tuple[tuple, ...]  # per sequence: its segments (sinks `Segment`, then `Bucket`s)
    table: torch.Tensor  # (S, SEGMENT_FIELDS) int64: bits, then tensor addresses (0: none)
    items: torch.Tensor  # (P, ITEM_FIELDS) int64, sorted by row
    item_ranges: torch.Tensor  # (R + 1,) int64: row r's items are items[item_ranges[r]:item_ranges[r + 1]]
    num_items: int
    num_kv_heads: int
    group_size: int
    value_group: int  # channels per value scale (one for every packed value side of the layout)
    dtype: torch.dtype | None  # of every 16-bit side (None: no 16-bit side)

    @property
    def num_rows(self) -> int:
        """Attention rows: sequences x KV heads."""
        return len(self.stores) * self.num_kv_heads

    @classmethod
    def build(cls, stores: Sequence[Sequence], num_kv_heads: int, group_size: int,
              tokens_per_item: int | None = None) -> "DecodeLayout":
        """Layout of `stores` (per sequence: its segments, e.g. `[sinks_segment, *buckets]`).

        `tokens_per_item` (a multiple of `group_size`; default: enough items to give every SM a
        few) bounds the tokens one program reads.
        """
        if group_size < 1 or group_size & (group_size - 1):
            raise ValueError(f"group_size must be a power of two, got {group_size}")
        if not stores or not all(stores):
            raise ValueError("a decode layout needs one or more stores of one or more segments (the sinks at least)")
        device = stores[0][0].keys.device
        segments = [seg for store in stores for seg in store if seg.keys.shape[0]]
        tokens_per_item = tokens_per_item or _default_tokens_per_item(segments, group_size, device)
        if tokens_per_item % group_size:
            raise ValueError(f"tokens_per_item must be a multiple of group_size={group_size}, got {tokens_per_item}")
        rows, items, dtype, value_group = [], [], None, 0
        for seq, store in enumerate(stores):
            for seg in store:
                if not seg.keys.shape[0]:
                    continue
                index = len(rows)
                rows.append(_table_row(seg))
                ranges = _segment_ranges(seg, group_size, tokens_per_item)  # (n, 4): head, start, tokens, scale row
                segment = torch.full_like(ranges[:, :1], index)
                items.append(torch.cat([segment, seq * num_kv_heads + ranges[:, :1], ranges[:, 1:]], dim=1))
                for bits, data in ((seg.key_bits, seg.keys), (seg.value_bits, seg.values)):
                    if bits == 16:
                        if dtype not in (None, data.dtype):
                            raise ValueError(f"16-bit sides must share one dtype, got {dtype} and {data.dtype}")
                        dtype = data.dtype
                if seg.value_bits != 16:
                    group = seg.values.shape[1] * 8 // seg.value_bits // seg.value_scale.shape[1]
                    if value_group not in (0, group):
                        raise ValueError(f"value channel groups differ within a layout: {value_group} and {group}")
                    value_group = group
        items = torch.cat(items) if items else torch.zeros(0, ITEM_FIELDS, dtype=torch.long, device=device)
        items = items[torch.argsort(items[:, ITEM_ROW], stable=True)]
        num_rows = len(stores) * num_kv_heads
        per_row = torch.bincount(items[:, ITEM_ROW], minlength=num_rows)
        item_ranges = torch.cat([per_row.new_zeros(1), torch.cumsum(per_row, 0)])
        table = torch.tensor(rows or [[0] * SEGMENT_FIELDS], dtype=torch.long).to(device)  # never empty: a kernel argument
        return cls(tuple(tuple(store) for store in stores), table, items.contiguous(), item_ranges,
                   items.shape[0], num_kv_heads, group_size, value_group or 1, dtype)


def _table_row(seg) -> list[int]:
    scores = getattr(seg, "scores", None)
    return [seg.key_bits, seg.value_bits, _address(seg.keys), _address(seg.values), _address(seg.key_scale),
            _address(seg.key_zero), _address(seg.value_scale), _address(seg.value_zero), _address(scores)]


def _segment_ranges(seg, group_size: int, tokens_per_item: int) -> torch.Tensor:
    """Contiguous token ranges of one segment: (n, 4) int64 rows (head, first token, tokens, first scale row).

    Consecutive groups of one head join while the earlier one is full (so a tile of `group_size`
    tokens from a range's start stays in one group), up to `tokens_per_item` tokens.
    """
    glen = seg.group_len.long()
    ghead = seg.group_head.long()
    gstart = torch.cumsum(glen, 0) - glen
    g = torch.arange(glen.numel(), device=glen.device)
    joins = torch.zeros_like(ghead, dtype=torch.bool)
    joins[1:] = (ghead[1:] == ghead[:-1]) & (glen[:-1] == group_size)
    stretch = torch.cumsum(~joins, 0) - 1  # stretch of joinable groups each group belongs to
    first_of_stretch = g[~joins][stretch]
    chunk = (g - first_of_stretch) * group_size // tokens_per_item  # full groups before it in the stretch
    new_range = ~joins | (chunk != torch.cat([chunk.new_full((1,), -1), chunk[:-1]]))
    range_id = torch.cumsum(new_range, 0) - 1
    count = int(range_id[-1]) + 1
    tokens = torch.zeros(count, dtype=torch.long, device=glen.device).index_add_(0, range_id, glen)
    first = g[new_range]
    return torch.stack([ghead[first], gstart[first], tokens, first], dim=1)


def _default_tokens_per_item(segments, group_size: int, device: torch.device) -> int:
    if device.type != "cuda" or not segments:
        return max(group_size, DEFAULT_TOKENS_PER_ITEM // group_size * group_size)
    total = sum(seg.keys.shape[0] for seg in segments)
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    per_item = -(-total // target)
    return max(4 * group_size, -(-per_item // group_size) * group_size)
