"""The Plan: the one contract between deciding (policies) and executing (the cache).

A Plan says, for every (layer, KV head), how many tokens stay in the cache and at what key/value
bit-width, plus the global layout knobs (sink tokens, full-precision recent window, quantisation
group size, token scorer). It is frozen, validated at construction and JSON-serialisable, and it
predicts its own storage bytes so the cache's real bytes can be checked against it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

ALLOWED_BITS: tuple[int, ...] = (16, 8, 4, 2)
TOKEN_SCORERS: tuple[str, ...] = ("snapkv", "window", "last_query", "key_norm", "reconstruction",
                                  "predicted_reconstruction")
# How a layer's KV heads rank their tokens before each takes its top `keep`:
# "per_head": each head by its own scores; "shared": all heads by one ranking (the mean of their
# scores, each normalised to a distribution), so kept sets nest and equal keeps hold equal tokens.
SELECTIONS: tuple[str, ...] = ("per_head", "shared")

# Per-token bookkeeping of a cache that may evict at decode time: one fp32 accumulated-attention
# score per kept token (H2O). Kept in the prediction so predicted and real bytes agree.
SCORE_BYTES = 4
# Per packed key group: its length and its head (int16 each).
GROUP_INDEX_BYTES = 4
SCALE_BYTES = 2  # fp16 scales and zero points
# Per head: the int64 length of its full-precision residual segment.
RESIDUAL_INDEX_BYTES = 8
# Per evictable token of a shared-selection plan: its int32 original position, so decode-time
# eviction can rank one position the same way in every head of the layer, and per token of a
# sliding-window layer, so the tokens that leave its window can be found.
POSITION_BYTES = 4


def window_tokens(seq_len: int, window: int | None) -> int:
    """Tokens a layer holds after `seq_len` tokens: all of them, or for a sliding-window layer the
    `window - 1` newest (what transformers' DynamicSlidingWindowLayer keeps between steps; the next
    query sees them and itself, `window` tokens)."""
    return seq_len if window is None else min(seq_len, window - 1)


def _check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high] (no upper bound when `high` is None); else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class HeadBudget:
    """What one (layer, KV head) keeps: `keep` tokens (None = all) at key/value bit-widths."""

    keep: int | None = None
    key_bits: int = 16
    value_bits: int = 16

    def __post_init__(self) -> None:
        if self.keep is not None:
            if isinstance(self.keep, float) and math.isnan(self.keep):
                raise ValueError("keep must be a non-negative integer or None (keep all), got nan")
            check_int("keep", self.keep, 0)
        _check_bits("key_bits", self.key_bits)
        _check_bits("value_bits", self.value_bits)

    @property
    def is_identity(self) -> bool:
        """True when this head keeps every token in full precision."""
        return self.keep is None and self.key_bits == 16 and self.value_bits == 16


@dataclass(frozen=True)
class Layout:
    """What every head of a plan shares: sinks and recent window kept in full precision, the
    quantisation group, the token scorer and how a layer's heads select tokens (`SELECTIONS`)."""

    sink_tokens: int = 4
    recent_window: int = 32
    group_size: int = 32
    scorer: str = "snapkv"
    selection: str = "per_head"

    def __post_init__(self) -> None:
        check_int("sink_tokens", self.sink_tokens, 0, 1024)
        check_int("recent_window", self.recent_window, 0, 65536)
        check_int("group_size", self.group_size, 1, 4096)
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, got {self.group_size}")
        if self.scorer not in TOKEN_SCORERS:
            raise ValueError(f"scorer must be one of {TOKEN_SCORERS}, got {self.scorer!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")

    @property
    def floor(self) -> int:
        """Tokens a head keeps at the least: its sinks and its recent window."""
        return self.sink_tokens + self.recent_window

    def keywords(self) -> dict[str, Any]:
        """The layout as Plan keywords (`Plan(heads, **layout.keywords())`) and JSON."""
        return dict(sink_tokens=self.sink_tokens, recent_window=self.recent_window, group_size=self.group_size,
                    scorer=self.scorer, selection=self.selection)


@dataclass(frozen=True)
class Plan:
    """Per-(layer, KV head) budgets plus the global cache layout; see module docstring."""

    heads: tuple[tuple[HeadBudget, ...], ...]
    sink_tokens: int = 4
    recent_window: int = 32
    group_size: int = 32
    scorer: str = "snapkv"
    selection: str = "per_head"
    # per layer: None (attends to every token) or its sliding window (attends to that many newest
    # tokens); None for the whole tuple when no layer slides
    windows: tuple[int | None, ...] | None = None
    # why the plan is what it is, when its policy did not decide the usual way (e.g. a controller asked
    # outside the lengths and budgets it was trained on, or token scores predicted beyond the lengths
    # their scorer was fitted on); shown in reports, never read by the cache
    note: str | None = None
    num_layers: int = field(init=False)
    num_kv_heads: int = field(init=False)

    def noted(self, note: str | None) -> "Plan":
        """This plan with `note` added to what it already says (itself when `note` is None)."""
        if note is None:
            return self
        return dataclasses.replace(self, note=note if self.note is None else f"{self.note}; {note}")

    def __post_init__(self) -> None:
        heads = tuple(tuple(layer) for layer in self.heads)
        if not heads or not heads[0]:
            raise ValueError("heads must be a non-empty (num_layers x num_kv_heads) table of HeadBudget")
        width = len(heads[0])
        for layer_idx, layer in enumerate(heads):
            if len(layer) != width:
                raise ValueError(
                    f"heads[{layer_idx}] has {len(layer)} KV heads, expected {width} like layer 0"
                )
            for head_idx, budget in enumerate(layer):
                if not isinstance(budget, HeadBudget):
                    raise ValueError(f"heads[{layer_idx}][{head_idx}] must be a HeadBudget, got {budget!r}")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "num_layers", len(heads))
        object.__setattr__(self, "num_kv_heads", width)
        layout = Layout(self.sink_tokens, self.recent_window, self.group_size, self.scorer, self.selection)
        object.__setattr__(self, "_layout", layout)  # built once: byte counts read it per head
        object.__setattr__(self, "windows", _check_windows(self.windows, len(heads)))
        if self.note is not None and not isinstance(self.note, str):
            raise ValueError(f"note must be None or a string, got {type(self.note).__name__}")
        floor = layout.floor
        for layer_idx, layer in enumerate(heads):
            window = self.layer_window(layer_idx)
            for head_idx, budget in enumerate(layer):
                if budget.keep is not None and budget.keep < floor:
                    raise ValueError(
                        f"heads[{layer_idx}][{head_idx}].keep must be >= sink_tokens + recent_window "
                        f"= {floor} (or None to keep all), got {budget.keep}"
                    )
                if budget.keep is not None and window is not None and budget.keep > window - 1:
                    raise ValueError(
                        f"heads[{layer_idx}][{head_idx}].keep must be <= windows[{layer_idx}] - 1 = {window - 1} "
                        f"(the tokens a sliding-window layer holds) or None, got {budget.keep}"
                    )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def full(cls, num_layers: int, num_kv_heads: int, **layout: Any) -> "Plan":
        """The identity plan: every token of every head in full precision (== DynamicCache)."""
        return cls.uniform(num_layers, num_kv_heads, keep=None, key_bits=16, value_bits=16, **layout)

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_kv_heads: int,
        *,
        keep: int | None = None,
        key_bits: int = 16,
        value_bits: int | None = None,
        **layout: Any,
    ) -> "Plan":
        """The same budget for every (layer, KV head); value_bits defaults to key_bits."""
        check_int("num_layers", num_layers, 1)
        check_int("num_kv_heads", num_kv_heads, 1)
        budget = HeadBudget(keep, key_bits, key_bits if value_bits is None else value_bits)
        return cls(tuple((budget,) * num_kv_heads for _ in range(num_layers)), **layout)

    @classmethod
    def uniform_fraction(
        cls,
        num_layers: int,
        num_kv_heads: int,
        seq_len: int,
        *,
        keep_fraction: float = 1.0,
        key_bits: int = 16,
        value_bits: int | None = None,
        **layout: Any,
    ) -> "Plan":
        """A uniform plan keeping `keep_fraction` of `seq_len` tokens per head (1.0 = keep all)."""
        if not isinstance(keep_fraction, (int, float)) or math.isnan(keep_fraction) or not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
        check_int("seq_len", seq_len, 1)
        keep = None
        if keep_fraction < 1:
            floor = layout.get("sink_tokens", 4) + layout.get("recent_window", 32)
            keep = max(floor, int(round(keep_fraction * seq_len)))
        return cls.uniform(num_layers, num_kv_heads, keep=keep, key_bits=key_bits, value_bits=value_bits, **layout)

    # ----------------------------------------------------------------- queries
    @property
    def is_identity(self) -> bool:
        """True when the plan compresses nothing."""
        return all(b.is_identity for layer in self.heads for b in layer)

    @functools.cached_property  # read for every layer of every decode step; a Plan is frozen
    def _evicting_layers(self) -> tuple[bool, ...]:
        return tuple(any(b.keep is not None for b in layer) for layer in self.heads)

    @property
    def tracks_scores(self) -> bool:
        """True when some head has a finite budget, so some layer's tokens carry H2O scores."""
        return any(self._evicting_layers)

    def layer_tracks_scores(self, layer_idx: int) -> bool:
        """True when a head of this layer has a finite budget: the layer's tokens carry H2O scores
        (and, with shared selection, their positions) for decode eviction; other layers carry none."""
        return self._evicting_layers[layer_idx]

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer (None: it attends to every token)."""
        return None if self.windows is None else self.windows[layer_idx]

    def layer_tokens(self, layer_idx: int, seq_len: int) -> int:
        """Tokens a full cache holds for this layer after `seq_len` tokens (`window_tokens`)."""
        return window_tokens(seq_len, self.layer_window(layer_idx))

    def with_windows(self, windows: tuple[int | None, ...] | None) -> "Plan":
        """This plan for layers with these sliding windows (validated against every head's keep)."""
        return dataclasses.replace(self, windows=windows)

    def fitted_to(self, windows: tuple[int | None, ...] | None, seq_len: int) -> "Plan":
        """This plan for layers with these sliding windows after `seq_len` tokens: a head whose keep
        reaches all its layer holds keeps all (None)."""
        windows = _check_windows(windows, self.num_layers)
        held = [window_tokens(seq_len, None if windows is None else windows[layer]) for layer in range(self.num_layers)]
        rows = tuple(
            tuple(b if b.keep is None or b.keep < held[layer] else dataclasses.replace(b, keep=None) for b in row)
            for layer, row in enumerate(self.heads)
        )
        return Plan(rows, **self.layout().keywords(), windows=windows)

    @classmethod
    def stack(cls, layers: Iterable["Plan"]) -> "Plan":
        """One plan from one-layer plans of the same layout, in layer order (plans made layer by layer)."""
        layers = list(layers)
        if not layers or any(p.num_layers != 1 for p in layers):
            raise ValueError("Plan.stack takes a non-empty sequence of one-layer plans")
        layout = layers[0].layout()
        for idx, p in enumerate(layers):
            if p.layout() != layout:
                raise ValueError(f"layer {idx}'s plan has layout {p.layout()}, layer 0's has {layout}")
        windows = tuple(p.layer_window(0) for p in layers)
        return cls(tuple(p.heads[0] for p in layers), **layout.keywords(), windows=windows)

    def layout(self) -> Layout:
        """The layout (sinks, window, group, scorer, selection) shared by every head."""
        return self._layout

    def kept_tokens(self, layer_idx: int, head_idx: int, seq_len: int) -> int:
        """Tokens this head holds right after the plan is applied to `seq_len` tokens."""
        keep = self.heads[layer_idx][head_idx].keep
        held = self.layer_tokens(layer_idx, seq_len)
        return held if keep is None else min(keep, held)

    def head_nbytes(self, layer_idx: int, head_idx: int, seq_len: int, head_dim: int, dtype_bytes: int) -> int:
        """Predicted bytes of one head's keys, values and metadata after applying to `seq_len` tokens."""
        budget = self.heads[layer_idx][head_idx]
        kept = self.kept_tokens(layer_idx, head_idx, seq_len)
        return kept_nbytes(kept, budget.key_bits, budget.value_bits, self.layout(), head_dim, dtype_bytes,
                           tracks_scores=self.layer_tracks_scores(layer_idx),
                           sliding=self.layer_window(layer_idx) is not None)

    def nbytes(self, seq_len: int, head_dim: int, dtype_bytes: int) -> int:
        """Predicted bytes of the whole cache after applying this plan to `seq_len` tokens."""
        check_int("seq_len", seq_len, 0)
        return sum(
            self.head_nbytes(layer, head, seq_len, head_dim, dtype_bytes)
            for layer in range(self.num_layers)
            for head in range(self.num_kv_heads)
        )

    def full_nbytes(self, seq_len: int, head_dim: int, dtype_bytes: int) -> int:
        """Bytes a DynamicCache holds for `seq_len` tokens of this model shape (a sliding layer: its window)."""
        tokens = sum(self.layer_tokens(layer, seq_len) for layer in range(self.num_layers))
        return 2 * self.num_kv_heads * tokens * head_dim * dtype_bytes

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data.pop("num_layers"), data.pop("num_kv_heads")
        data["heads"] = [[asdict(b) for b in layer] for layer in self.heads]
        if self.windows is None:
            data.pop("windows")
        else:
            data["windows"] = list(self.windows)
        if self.note is None:
            data.pop("note")
        return data

    def to_json(self) -> str:
        """JSON text of `to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """Inverse of `to_dict`; validates everything."""
        if not isinstance(data, dict) or "heads" not in data:
            raise ValueError("plan must be an object with a 'heads' field")
        unknown = set(data) - {"heads", "sink_tokens", "recent_window", "group_size", "scorer", "selection", "windows",
                               "note"}
        if unknown:
            raise ValueError(f"unknown plan fields {sorted(unknown)}")
        heads = tuple(tuple(_budget_from(b) for b in layer) for layer in data["heads"])
        fields = {k: v for k, v in data.items() if k != "heads"}
        if isinstance(fields.get("windows"), list):
            fields["windows"] = tuple(fields["windows"])
        return cls(heads, **fields)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    def summary(self) -> dict[str, Any]:
        """Compact description: mean keep / bits over heads (for reports)."""
        flat = [b for layer in self.heads for b in layer]
        finite = [b.keep for b in flat if b.keep is not None]
        return {
            "heads": len(flat),
            "keep_all_heads": len(flat) - len(finite),
            "mean_keep": sum(finite) / len(finite) if finite else None,
            "mean_key_bits": sum(b.key_bits for b in flat) / len(flat),
            "mean_value_bits": sum(b.value_bits for b in flat) / len(flat),
            "sink_tokens": self.sink_tokens,
            "recent_window": self.recent_window,
            "group_size": self.group_size,
            "scorer": self.scorer,
            "selection": self.selection,
            **({"note": self.note} if self.note is not None else {}),
        }


def _check_windows(windows: Any, num_layers: int) -> tuple[int | None, ...] | None:
    """Validated per-layer sliding windows; None when no layer slides."""
    if windows is None:
        return None
    if not isinstance(windows, (tuple, list)) or len(windows) != num_layers:
        raise ValueError(f"windows must be None or one entry per layer ({num_layers}), got {windows!r}")
    for idx, window in enumerate(windows):
        if window is not None:
            check_int(f"windows[{idx}]", window, 2)
    windows = tuple(windows)
    return None if all(w is None for w in windows) else windows


def _budget_from(data: Any) -> HeadBudget:
    if not isinstance(data, dict):
        raise ValueError(f"each head budget must be an object with keep/key_bits/value_bits, got {data!r}")
    return HeadBudget(**data)


def value_group_size(group_size: int, head_dim: int) -> int:
    """Channels sharing one per-token value scale: the group size, capped at head_dim."""
    return min(group_size, head_dim)


def _positive(x):
    """max(x, 0) for ints and integer arrays alike (no branch, so NumPy arrays pass through)."""
    return x * (x > 0)


def kept_nbytes(kept, key_bits, value_bits, layout: Layout, head_dim: int, dtype_bytes: int,
                tracks_scores: bool, sliding: bool = False):
    """Bytes of a head holding `kept` tokens (an int, or an integer NumPy array of counts) at these bits
    (ints, or integer arrays broadcasting against `kept`).

    The one byte formula: `Plan.head_nbytes` calls it per head, the learned controller on arrays of
    candidate keeps. Sinks and the recent window stay full precision; the middle is cut into whole
    groups of `group_size`, and its remainder joins the full-precision residual (KIVI).
    """
    group_size = layout.group_size
    groups = _positive(kept - layout.floor) // group_size
    packed_tokens = groups * group_size
    fp_tokens = kept - packed_tokens
    total = 2 * fp_tokens * head_dim * dtype_bytes + RESIDUAL_INDEX_BYTES
    total = total + _key_bytes(key_bits, packed_tokens, groups, head_dim, dtype_bytes)
    total = total + _value_bytes(value_bits, packed_tokens, head_dim, group_size, dtype_bytes)
    total = total + groups * GROUP_INDEX_BYTES
    tracks_positions = sliding or (tracks_scores and layout.selection == "shared")
    per_token = (SCORE_BYTES if tracks_scores else 0) + (POSITION_BYTES if tracks_positions else 0)
    if per_token:  # sinks carry neither: H2O never evicts them, and their positions are implicit
        total = total + _positive(kept - layout.sink_tokens) * per_token
    return total


# Branch-free in `bits` (16 = stored as is), so one call prices every option of a grid at once:
# bits may be an int or an integer array broadcasting against the token counts.
def _key_bytes(bits, tokens, groups, head_dim: int, dtype_bytes: int):
    whole = bits == 16
    # codes + one (scale, zero) pair per channel per group
    packed = tokens * head_dim * bits // 8 + groups * head_dim * 2 * SCALE_BYTES
    return whole * (tokens * head_dim * dtype_bytes) + (1 - whole) * packed


def _value_bytes(bits, tokens, head_dim: int, group_size: int, dtype_bytes: int):
    whole = bits == 16
    channel_groups = math.ceil(head_dim / value_group_size(group_size, head_dim))
    packed = tokens * head_dim * bits // 8 + tokens * channel_groups * 2 * SCALE_BYTES
    return whole * (tokens * head_dim * dtype_bytes) + (1 - whole) * packed


def iter_heads(plan: Plan) -> Iterable[tuple[int, int, HeadBudget]]:
    """(layer_idx, head_idx, budget) for every head."""
    for layer_idx, layer in enumerate(plan.heads):
        for head_idx, budget in enumerate(layer):
            yield layer_idx, head_idx, budget
