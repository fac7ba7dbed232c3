"""One layer of a CompressedCache: its store and everything that changes it.

Life of a layer: the prefill's states are held in full precision (`hold_prefill`) and observed
(`observe`); `compress` keeps each head's sinks, recent window and top-ranked tokens as the
plan's row says, quantised and packed (see `store`), and frees the rest. Each decode step
`append`s the new token: full residual windows are flushed into packed groups, heads over their
budget evict their lowest accumulated-attention tokens (H2O), and `attend` reads the store.
Accumulated attention is the "window" scorer's own measure, so under that scorer every packed
token competes; under any other scorer the middle tokens the plan selected are the plan's decision
(a reconstruction score cannot be compared with attention mass gathered later) and stay: only
the prefill's recent window and the tokens that come after it are evicted. Under predicted
reconstruction scores the measure itself continues: each new token is scored by the same
predictor from the hidden states entering the layer's attention, and every stored token competes
by that score (no attention mass is accumulated).

A sliding-window layer (`window`) holds only the `window - 1` newest tokens of the prefill, as
transformers' own cache does, and is observed and compressed over them alone; each decode step
first drops the tokens that leave its window (`_slide`: they are never attended again), so every
token it stores carries its position.

Decode reads the store one of two ways: an `AssembledView` kept dequantised between steps (the CPU
fast path) or, through the kernel backend, straight from the packed store along a `DecodeLayout`
rebuilt only when the store changes (the triton backend fuses it, without host syncs).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from adaptive_kv.assembled import AssembledView
from adaptive_kv.kernels.layout import DecodeLayout
from adaptive_kv.kernels.reference import Segment
from adaptive_kv.plan import HeadBudget, Plan, window_tokens
from adaptive_kv.predicted_reconstruction import PREDICTED_SCORER
from adaptive_kv.selection import kept_middle, layer_ranking
from adaptive_kv.stats import LayerObservation, StatsConfig, observe_layer
from adaptive_kv.store import Bucket, Residual, concat_buckets, quantize_groups

WORKING_DTYPES = ("auto", "model")
# a bf16 working copy pays casts and a mask over its whole capacity at every step: below about this
# many tokens per head that costs more than the halved reads save (benchmarks/cache_overhead.py:
# 3-6 % slower at 1k, about 25 % faster at 8k on the embedded model)
BF16_MIN_TOKENS = 2048
# H2O score floor of the middle tokens a plan's (non-"window") scorer selected: decode-time eviction
# never picks a token at or above it. Measured (benchmarks/results/eval_learned): with the prefill's
# window mass as their score instead, the first eviction after a query-agnostic question dropped the
# reconstruction-selected needle, and niah_single at 1/4 fell from 60 (the full cache) to 20.
PROTECTED_SCORE = 1e30
RUNNING_SCORERS = ("window",)  # scorers whose measure decode-time attention mass continues


def _native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively here (a bf16 working copy then reads half the bytes, fast)."""
    if device.type != "cpu":
        return False
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class DecodeOptions:
    """How every layer of one cache decodes (see `CompressedCache` for their meaning)."""

    eviction_slack: int | None = None
    assembled: bool | None = None
    working_dtype: str = "auto"


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed KV: the `Cache` layer API, its store, flush, eviction and attention."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, options: DecodeOptions = DecodeOptions(), window: int | None = None) -> None:
        super().__init__()
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
            raise ValueError(f"window must be None (attend to every token) or an integer >= 2, got {window!r}")
        self.layer_idx = layer_idx
        self.options = options
        self.window = window  # sliding window: a decode query attends to this many newest tokens
        self.seen_tokens = 0
        self.first_position = 0  # position of the oldest token held: the first sink (sinks leave a sliding window too)
        self.prefill: tuple[torch.Tensor, torch.Tensor] | None = None  # (H, T, D) each, until the plan lands
        self.sinks: tuple[torch.Tensor, torch.Tensor] | None = None  # (H, S, D) each
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.residual: Residual | None = None
        self.plan: Plan | None = None  # the plan whose row `row` this layer executes
        self.row = layer_idx
        self.budgets: tuple[HeadBudget, ...] | None = None
        self.observation: LayerObservation | None = None
        self.view: AssembledView | None = None  # decode operands kept between steps (assembled.py)
        # where a decode step reads the packed store from (kernels/layout.py); rebuilt after any change
        # to the sinks or buckets (their tensors or scores), never per step
        self.decode_layout: DecodeLayout | None = None
        # Python mirrors of residual lengths and tokens held per head: the per-step checks for a
        # flush or an eviction then cost no tensor op (they run for every layer of every token)
        self.residual_lengths: list[int] = []
        self.held: list[int] = []

    # --------------------------------------------------------------- Cache API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record device and dtype of the first states."""
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Not used directly: `CompressedCache.update` drives the layer."""
        raise NotImplementedError("use CompressedCache.update")

    def get_seq_length(self) -> int:
        """Tokens seen so far (positions stay those of the original sequence after eviction)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for mask creation, in original positions."""
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        """No maximum length."""
        return -1

    # --------------------------------------------------------------- prefill
    def hold_prefill(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Keep the prefill's states (H, T, D) in full precision until the plan lands."""
        if self.prefill is not None:
            raise ValueError("CompressedCache compresses after the first forward: chunked prefill is not supported")
        seq_len = key_states.shape[1]
        held = window_tokens(seq_len, self.window)
        self.prefill = (key_states[:, seq_len - held:], value_states[:, seq_len - held:])
        self.first_position = seq_len - held
        self.seen_tokens += seq_len

    def observe(self, query: torch.Tensor, scaling: float, num_layers: int, config: StatsConfig, kernels) -> None:
        """Read this layer's statistics from its prefill queries (H_q, T, D), over the tokens it holds."""
        keys, values = self.prefill
        held = keys.shape[1]
        self.observation = observe_layer(query[:, query.shape[1] - held:], keys, values, scaling, self.layer_idx,
                                         num_layers, config, kernels=kernels)

    # --------------------------------------------------------------- planning
    def compress(self, plan: Plan, row: int, select: torch.Tensor | None, acc: torch.Tensor | None, kernels) -> None:
        """Keep sinks + recent + top-ranked tokens per head as `plan`'s row `row` says; pack the middle; free the prefill.

        `select` (H, T) ranks the middle tokens (None: keep-all plans need no ranking); `acc` (H, T)
        starts the H2O scores of an evicting layer. Of a sliding layer, only the newest tokens it holds are
        ranked.
        """
        keys, values = self.prefill  # (H, T, D)
        num_heads, seq_len, _ = keys.shape
        if select is not None:
            select, acc = select[:, select.shape[1] - seq_len:], acc[:, acc.shape[1] - seq_len:]
        group = plan.group_size
        sinks = min(plan.sink_tokens, seq_len)
        recent_start = max(sinks, seq_len - plan.recent_window)
        budgets = plan.heads[row]
        ranking = None if select is None else layer_ranking(select, plan.selection, sinks, recent_start)
        grouped: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        residual_idx: list[torch.Tensor] = []
        for head, budget in enumerate(budgets):
            wanted = plan.kept_tokens(row, head, seq_len) - sinks - (seq_len - recent_start)
            if ranking is None:
                middle = torch.arange(sinks, recent_start, device=keys.device)
            else:
                middle = kept_middle(ranking[head], sinks, recent_start, wanted)
            full_groups = middle.numel() // group
            if full_groups:
                grouped.setdefault((budget.key_bits, budget.value_bits), []).append(
                    (head, middle[: full_groups * group].view(full_groups, group))
                )
            residual_idx.append(torch.cat([middle[full_groups * group :], torch.arange(recent_start, seq_len, device=keys.device)]))
        track_positions = (plan.layer_tracks_scores(row) and plan.selection == "shared") or self.window is not None
        first = self.first_position
        if plan.scorer == PREDICTED_SCORER and acc is not None:
            acc = select  # decode-time eviction goes on ranking by the predicted scores: nothing is protected
        continues = plan.scorer in RUNNING_SCORERS or plan.scorer == PREDICTED_SCORER
        floor = 0.0 if continues else PROTECTED_SCORE  # every packed token is middle
        self.buckets = {}
        for bits, parts in grouped.items():
            heads = torch.cat([torch.full((idx.shape[0],), h, device=keys.device) for h, idx in parts])
            index = torch.cat([idx for _, idx in parts])  # (G_n, G)
            self.buckets[bits] = quantize_groups(
                kernels, keys[heads[:, None], index], values[heads[:, None], index], heads, *bits,
                None if acc is None else acc[heads[:, None], index] + floor, index + first if track_positions else None,
            )
        lengths = torch.tensor([idx.numel() for idx in residual_idx], dtype=torch.long, device=keys.device)
        head_of = torch.arange(num_heads, device=keys.device).repeat_interleave(lengths)
        flat_idx = torch.cat(residual_idx)
        self.residual = Residual(
            keys[head_of, flat_idx].clone(), values[head_of, flat_idx].clone(), lengths,
            None if acc is None else acc[head_of, flat_idx].float() + floor * (flat_idx < recent_start),
            (flat_idx + first).to(torch.int32) if track_positions else None,
        )
        self.sinks = (keys[:, :sinks].clone(), values[:, :sinks].clone())
        self.plan, self.row, self.budgets = plan, row, budgets
        self.prefill = None
        self.view = None
        self.decode_layout = None
        self.residual_lengths, self.held = lengths.tolist(), self.head_tokens().tolist()

    def share(self) -> "CompressedLayer":
        """A copy-on-write copy of this compressed layer: the stored keys, values and codes are shared
        (flush, eviction and sliding replace those tensors, never write into them), while the scores
        that attention accumulates in place are copied, so neither copy sees the other's tokens."""
        if not self.is_compressed:
            raise ValueError(f"layer {self.layer_idx} holds no compressed store to share (no plan applied yet)")
        if self.view is not None:
            self.sync_scores()  # the view's accumulated mass belongs in the store that is shared
        twin = copy.copy(self)
        own = lambda t: None if t is None else t.clone()  # noqa: E731
        twin.buckets = {bits: dataclasses.replace(b, scores=own(b.scores)) for bits, b in self.buckets.items()}
        twin.residual = dataclasses.replace(self.residual, scores=own(self.residual.scores))
        twin.view, twin.decode_layout, twin.observation = None, None, None
        twin.residual_lengths, twin.held = list(self.residual_lengths), list(self.held)
        return twin

    @property
    def is_compressed(self) -> bool:
        """True once a plan has been applied."""
        return self.budgets is not None

    @property
    def tracks_scores(self) -> bool:
        """Whether this layer keeps H2O scores (some head may evict at decode time)."""
        return self.plan.layer_tracks_scores(self.row)

    @property
    def scores_new_tokens(self) -> bool:
        """Whether each decode step's tokens need predicted scores (the layer evicts by them)."""
        return self.tracks_scores and self.plan.scorer == PREDICTED_SCORER

    @property
    def accumulates_mass(self) -> bool:
        """Whether attention adds each query's mass to the stored scores (H2O)."""
        return self.tracks_scores and self.plan.scorer != PREDICTED_SCORER

    # --------------------------------------------------------------- decode
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, kernels,
               scores: torch.Tensor | None = None) -> None:
        """One decode step's new tokens (H, q, D): flush and evict as due, then append to the residual.

        `scores` (H, q): the new tokens' predicted scores, required where the layer evicts by them."""
        q = key_states.shape[1]
        if self.scores_new_tokens and (scores is None or tuple(scores.shape) != (key_states.shape[0], q)):
            raise ValueError(f"layer {self.layer_idx} evicts by predicted scores: each decode step needs the new "
                             f"tokens' scores (KV heads x {q}) from the cache's predictor, got "
                             f"{None if scores is None else tuple(scores.shape)}")
        if self.view is not None and (q > 1 or self._store_changes_due()):
            self.sync_scores()  # the store's scores are read or rebuilt below
        if self.window is not None:
            # the step's first query sees the window ending at itself (a multi-token step's later
            # queries then also see up to q - 1 older tokens: nothing masks within a step)
            self._slide(self.seen_tokens - self.window + 1)
        self._flush(kernels)
        self._evict()
        self.residual = self.residual.append(key_states, value_states, self.seen_tokens, sizes=self.residual_lengths,
                                             scores=scores if self.scores_new_tokens else None)
        self.residual_lengths = [n + q for n in self.residual_lengths]
        self.held = [n + q for n in self.held]
        if self.view is not None and q == 1:
            self.view.append(key_states, value_states)
        else:  # a multi-token step (a question after compression) goes through the kernels once
            self.view = None
        self.seen_tokens += q

    def attend(self, query: torch.Tensor, scaling: float, kernels) -> torch.Tensor:
        """Attention of query (H_q, q, D) over this layer's store: (H_q, q, D)."""
        need_mass = self.accumulates_mass
        if query.shape[1] == 1 and self._uses_view(query.device):
            if self.view is None:
                self.view = AssembledView.build(self.sinks, list(self.buckets.values()), self.residual, kernels,
                                                query.dtype, *self._working_dtypes(query), track_scores=need_mass)
            # H2O mass accumulates in the view; sync_scores writes it back
            return self.view.attend(query, scaling, self._mass_heads() if need_mass else None)
        # the triton backend runs one decode query fused, H2O scores included, without host syncs
        if self.decode_layout is None:
            self.decode_layout = self._decode_layout()
        return kernels.layout_decode(query, self.decode_layout, self.residual, scaling, accumulate_mass=need_mass)

    def sync_scores(self) -> None:
        """Write the H2O scores an assembled view accumulated back into the store (buckets, residual)."""
        if self.view is None or self.view.scores is None:
            return
        scores = self.view.store_scores(self.sinks[0].shape[0] * self.sinks[0].shape[1])
        self.decode_layout = None  # it holds the replaced score tensors' addresses
        offset = 0
        for bucket in self.buckets.values():
            bucket.scores = scores[offset : offset + bucket.num_tokens].clone()
            offset += bucket.num_tokens
        self.residual.scores = scores[offset:].clone()

    def _decode_layout(self) -> DecodeLayout:
        num_heads, sinks, head_dim = self.sinks[0].shape
        lengths = torch.full((num_heads,), sinks, dtype=torch.long, device=self.sinks[0].device)
        sink_segment = Segment.full_precision(self.sinks[0].reshape(-1, head_dim), self.sinks[1].reshape(-1, head_dim),
                                              lengths)
        return DecodeLayout.build([[sink_segment, *self.buckets.values()]], num_heads, self.plan.group_size)

    def _flush(self, kernels) -> None:
        """Move every residual window that is full into packed groups of its head's bits."""
        group = self.plan.group_size
        threshold = self.plan.recent_window + group
        while max(self.residual_lengths) >= threshold:
            ready = torch.tensor([h for h, n in enumerate(self.residual_lengths) if n >= threshold],
                                 device=self.residual.lengths.device)
            taken, rest = self.residual.split_oldest(ready, group)  # (n, G)
            for bits in {(self.budgets[h].key_bits, self.budgets[h].value_bits) for h in ready.tolist()}:
                rows = torch.tensor([i for i, h in enumerate(ready.tolist()) if
                                     (self.budgets[h].key_bits, self.budgets[h].value_bits) == bits], device=taken.device)
                idx = taken[rows]
                scores = None if self.residual.scores is None else self.residual.scores[idx]
                positions = None if self.residual.positions is None else self.residual.positions[idx]
                new = quantize_groups(
                    kernels, self.residual.keys[idx], self.residual.values[idx], ready[rows], *bits, scores, positions
                )
                if self.view is not None:  # rewrite only the flushed tokens, where the store puts them
                    self.view.flush(ready[rows].tolist(), group, *new.dequantize(kernels, self.dtype),
                                    insert_at=self._bucket_end(bits))
                self.buckets[bits] = concat_buckets(self.buckets.get(bits), new)
                self.decode_layout = None
            self.residual = rest
            self.residual_lengths = rest.lengths.tolist()

    def _slide(self, cutoff: int) -> None:
        """Drop every token before position `cutoff`: it left this sliding layer's window for good."""
        if self.first_position >= cutoff:
            return
        num_heads, num_sinks, _ = self.sinks[0].shape
        dropped_sinks = min(num_sinks, cutoff - self.first_position)
        sink_keep = torch.ones(num_heads, num_sinks, dtype=torch.bool, device=self.device)
        sink_keep[:, :dropped_sinks] = False
        kept = [sink_keep.flatten()]
        if dropped_sinks:  # a copy: a slice would pin the dropped sinks' storage
            self.sinks = (self.sinks[0][:, dropped_sinks:].clone(), self.sinks[1][:, dropped_sinks:].clone())
        for bits, bucket in list(self.buckets.items()):
            keep = bucket.positions >= cutoff
            kept.append(keep)
            if not bool(keep.all()):
                self.buckets[bits] = bucket.select(keep)
        self.buckets = {bits: b for bits, b in self.buckets.items() if b.num_tokens}
        residual_keep = self.residual.positions >= cutoff
        residual_changed = not bool(residual_keep.all())
        if residual_changed:
            self.residual = self.residual.select(residual_keep)
            self.residual_lengths = self.residual.lengths.tolist()
        kept = torch.cat(kept)
        if self.view is not None:
            if residual_changed:  # the view locates residual tokens by their place: rebuild it
                self.view = None
            elif not bool(kept.all()):
                self.view.drop(kept)
        self.decode_layout = None
        self.first_position = cutoff
        self.held = self.head_tokens().tolist()

    def _bucket_end(self, bits: tuple[int, int]) -> int:
        """Index in store order (sinks, buckets, residual) just after bucket `bits` (a new one goes last)."""
        end = self.sinks[0].shape[0] * self.sinks[0].shape[1]
        for key, bucket in self.buckets.items():
            end += bucket.num_tokens
            if key == bits:
                break
        return end

    def _slack(self) -> int:
        """Tokens a head may hold above its budget before decode-time eviction runs."""
        slack = self.options.eviction_slack
        return self.plan.group_size if slack is None else slack

    def _evict(self) -> None:
        """Drop the lowest-scored evictable tokens of every head over its budget (plus slack)."""
        if not self.tracks_scores:
            return
        slack = self._slack()
        over = [
            (head, self.held[head] - budget.keep)
            for head, budget in enumerate(self.budgets)
            if budget.keep is not None and self.held[head] > budget.keep + slack
        ]
        if not over:
            return
        shared = self.shared_scores() if self.plan.selection == "shared" else None
        kept = [torch.ones(self.sinks[0].shape[0] * self.sinks[0].shape[1], dtype=torch.bool, device=self.device)]
        for bits, bucket in list(self.buckets.items()):
            heads = bucket.token_heads()
            scores = bucket.scores if shared is None else shared[bucket.positions.long()]
            keep = torch.ones(bucket.num_tokens, dtype=torch.bool, device=heads.device)
            for head, excess in over:
                mine = torch.nonzero((heads == head) & (bucket.scores < PROTECTED_SCORE)).flatten()
                excess = min(excess, mine.numel())
                if excess > 0:
                    keep[mine[scores[mine].topk(excess, largest=False).indices]] = False
            kept.append(keep)
            if not keep.all():
                self.buckets[bits] = bucket.select(keep)
                self.decode_layout = None
        kept = torch.cat(kept)
        if self.view is not None and not bool(kept.all()):  # compact the view's rows: no dequantisation
            self.view.drop(kept)
        self.held = self.head_tokens().tolist()

    def shared_scores(self) -> torch.Tensor:
        """One H2O score per position for the whole layer: (seen_tokens,) fp32.

        Each head's accumulated scores are normalised to a distribution over its evictable tokens,
        then a position scores the mean over the heads that may evict it, so every head of the layer
        ranks a position the same way and equal budgets keep equal positions.
        """
        parts = [(b.token_heads(), b.scores, b.positions) for b in self.buckets.values()]
        parts.append((self.residual.token_heads(), self.residual.scores, self.residual.positions))
        heads, scores, positions = (torch.cat(x) for x in zip(*parts))
        num_heads = self.residual.lengths.numel()
        free = scores < PROTECTED_SCORE  # protected tokens are never evicted: they neither rank nor normalise
        scores = scores * free
        per_head = scores.new_zeros(num_heads).index_add_(0, heads, scores)
        share = scores / per_head.clamp_min(1e-30)[heads]
        total = share.new_zeros(self.seen_tokens).index_add_(0, positions.long(), share)
        count = share.new_zeros(self.seen_tokens).index_add_(0, positions.long(), free.to(share.dtype))
        return total / count.clamp_min(1)

    def _store_changes_due(self) -> bool:
        """Whether the coming step flushes or evicts (the same tests `_flush` and `_evict` run, on the mirrors)."""
        if max(self.residual_lengths) >= self.plan.recent_window + self.plan.group_size:
            return True
        if self.window is not None and self.first_position < self.seen_tokens - self.window + 1:
            return True
        slack = self._slack()
        return any(b.keep is not None and n > b.keep + slack for n, b in zip(self.held, self.budgets))

    def _mass_heads(self) -> tuple[int, ...]:
        """KV heads whose H2O scores decide an eviction: every head when a layer ranks tokens together,
        else those with a finite budget (a keep-all head's scores are never read; the fast path skips them)."""
        if self.plan.selection == "shared":
            return tuple(range(len(self.budgets)))
        return tuple(h for h, budget in enumerate(self.budgets) if budget.keep is not None)

    def _working_dtypes(self, query: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """Dtypes of the view's keys and values: bfloat16 for a side whose every head is quantised
        (`working_dtype="auto"`, fp32 model, a CPU with native bf16, a head holding at least
        BF16_MIN_TOKENS), else the model's dtype."""
        exact = query.dtype
        if (self.options.working_dtype == "model" or exact != torch.float32 or max(self.held) < BF16_MIN_TOKENS
                or not _native_bf16(query.device)):
            return exact, exact
        lossy = lambda bits: all(b < 16 for b in bits)  # noqa: E731
        return (torch.bfloat16 if lossy(b.key_bits for b in self.budgets) else exact,
                torch.bfloat16 if lossy(b.value_bits for b in self.budgets) else exact)

    def _uses_view(self, device: torch.device) -> bool:
        # on CPU the assembled operands are the fast path; on CUDA the fused kernel reads packed codes
        assembled = self.options.assembled
        return assembled if assembled is not None else device.type == "cpu"

    # --------------------------------------------------------------- reports
    def nbytes(self) -> int:
        """Bytes this layer's tensors really hold."""
        total = sum(t.numel() * t.element_size() for t in (self.prefill or ()))
        total += sum(t.numel() * t.element_size() for t in (self.sinks or ()))
        total += sum(b.nbytes() for b in self.buckets.values())
        return total + (self.residual.nbytes() if self.residual is not None else 0)

    def working_nbytes(self) -> int:
        """Bytes of the assembled decode operands (a dequantised working copy, on top of `nbytes`)."""
        return 0 if self.view is None else self.view.nbytes()

    def head_tokens(self) -> torch.Tensor:
        """Tokens held per head: (H,) int64."""
        if self.prefill is not None:
            return torch.full((self.prefill[0].shape[0],), self.prefill[0].shape[1], device=self.prefill[0].device)
        counts = torch.full_like(self.residual.lengths, self.sinks[0].shape[1]) + self.residual.lengths
        for bucket in self.buckets.values():
            counts.index_add_(0, bucket.group_head.long(), bucket.group_len.long())
        return counts

    def head_states(self, kernels, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every head's stored keys and values as attention reads them (dequantised): [(N_h, D), (N_h, D)].

        Token order within a head is storage order (sinks, packed groups, residual), not position.
        """
        num_heads = self.sinks[0].shape[0]
        keys = [[self.sinks[0][h].to(dtype)] for h in range(num_heads)]
        values = [[self.sinks[1][h].to(dtype)] for h in range(num_heads)]
        parts = [(b.token_heads(), *b.dequantize(kernels, dtype)) for b in self.buckets.values()]
        parts.append((self.residual.token_heads(), self.residual.keys.to(dtype), self.residual.values.to(dtype)))
        for heads, k, v in parts:
            for h in range(num_heads):
                mine = heads == h
                keys[h].append(k[mine])
                values[h].append(v[mine])
        return [(torch.cat(k), torch.cat(v)) for k, v in zip(keys, values)]
