"""CompressedCache: a `transformers.Cache` that executes a Plan with real memory savings.

Life of one request (ARCHITECTURE.md): prefill stores full precision and reads AttentionStats;
at the end of the prefill forward the plan provider is asked once and the Plan is applied: each
head keeps its sinks, recent window and top-scored tokens, quantised and packed (see `store`).
Decode appends to a full-precision residual, flushes full windows into packed groups and evicts
the lowest accumulated-attention tokens (H2O) of heads that outgrow their budget. Accumulated
attention is the "window" scorer's own measure, so under that scorer every packed token competes;
under any other scorer the middle tokens the plan selected are the plan's decision (a reconstruction
score cannot be compared with attention mass gathered later) and stay: only the prefill's recent
window and the tokens that come after it are evicted.

Batch size is 1: one cache holds one request, since every head of every request keeps its own
tokens. Attention runs in `adaptive_kv.attention`, which hands each layer's step back here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from adaptive_kv.assembled import AssembledView
from adaptive_kv.kernels import get_backend
from adaptive_kv.kernels.layout import DecodeLayout
from adaptive_kv.kernels.reference import Segment
from adaptive_kv.plan import HeadBudget, Plan
from adaptive_kv.reconstruction import ReconstructionRequest, reconstruction_scores
from adaptive_kv.selection import kept_middle, layer_ranking
from adaptive_kv.stats import AttentionStats, LayerObservation, StatsConfig, observe_layer
from adaptive_kv.store import Bucket, Residual, concat_buckets, quantize_groups

PlanProvider = Callable[[AttentionStats], Plan]
# bounded prefill: (one layer's statistics, layer index) -> that layer's one-layer Plan, asked as
# soon as the layer's forward ends, so the prefill never holds more than one layer uncompressed
LayerPlanProvider = Callable[[AttentionStats, int], Plan]
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
class LayerStep:
    """What a layer's `update` hands to the attention function: the cache and the new states."""

    cache: "CompressedCache"
    layer_idx: int
    key_states: torch.Tensor  # (1, H_kv, q, D)
    value_states: torch.Tensor


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed KV; the `Cache` API over `store` objects."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.seen_tokens = 0
        self.prefill: tuple[torch.Tensor, torch.Tensor] | None = None  # (H, T, D) each, until the plan lands
        self.sinks: tuple[torch.Tensor, torch.Tensor] | None = None  # (H, S, D) each
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.residual: Residual | None = None
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

    # --------------------------------------------------------------- accounting
    @property
    def is_compressed(self) -> bool:
        """True once a plan has been applied."""
        return self.budgets is not None

    def nbytes(self) -> int:
        """Bytes this layer's tensors really hold."""
        total = sum(t.numel() * t.element_size() for t in (self.prefill or ()))
        total += sum(t.numel() * t.element_size() for t in (self.sinks or ()))
        total += sum(b.nbytes() for b in self.buckets.values())
        return total + (self.residual.nbytes() if self.residual is not None else 0)

    def head_tokens(self) -> torch.Tensor:
        """Tokens held per head: (H,) int64."""
        if self.prefill is not None:
            return torch.full((self.prefill[0].shape[0],), self.prefill[0].shape[1], device=self.prefill[0].device)
        counts = torch.full_like(self.residual.lengths, self.sinks[0].shape[1]) + self.residual.lengths
        for bucket in self.buckets.values():
            counts.index_add_(0, bucket.group_head.long(), bucket.group_len.long())
        return counts


class CompressedCache(Cache):
    """A `transformers.Cache` that compresses every (layer, KV head) as a Plan says.

    Give a fixed `plan`, a `plan_provider` (AttentionStats -> Plan, asked once after prefill,
    which may weigh every layer against the others) or a `layer_plan_provider` (bounded prefill:
    each layer is planned from its own statistics and compressed as soon as its forward ends, so
    the prefill's peak is one layer at full precision plus the compressed rest;
    `prefill_peak_nbytes` records it). `eviction_slack` tokens (default: one group) may accumulate above a head's budget
    before decode-time eviction runs, so eviction is amortised (under a non-"window" scorer, whose
    selected middle tokens stay, a head may also sit up to one group over its budget while its newest
    tokens wait in the full-precision residual). `assembled` keeps each layer's
    decode operands dequantised between steps (`AssembledView`: fast, but a working copy of the
    kept tokens, `working_nbytes()`); None uses it on CPU only, False dequantises from the packed
    store at every step (least memory; the fused kernel on CUDA). `working_dtype="auto"` holds a
    view side (keys or values) whose every head is quantised in bfloat16 on a CPU with native
    bf16, once a head holds BF16_MIN_TOKENS (half the bytes read per step; its rounding is far
    below the quantisation error), and every 16-bit side exactly; "model" holds everything in the
    model's dtype (the view then equals the reference's dequantisation).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        plan: Plan | None = None,
        plan_provider: PlanProvider | None = None,
        layer_plan_provider: LayerPlanProvider | None = None,
        stats_config: StatsConfig | None = None,
        eviction_slack: int | None = None,
        backend: str | None = None,
        capture: bool = False,
        reconstruction: ReconstructionRequest | None = None,
        assembled: bool | None = None,
        working_dtype: str = "auto",
    ) -> None:
        from adaptive_kv.attention import prepare_model

        given = sum(x is not None for x in (plan, plan_provider, layer_plan_provider))
        if capture and given:
            raise ValueError("capture=True keeps the prefill for fork(plan); give no plan, plan_provider or layer_plan_provider")
        if not capture and given != 1:
            raise ValueError("give exactly one of plan=, plan_provider= or layer_plan_provider= (or capture=True)")
        config = prepare_model(model)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if plan is not None:
            self._check_plan(plan)
        self.plan = plan
        self.plan_provider = plan_provider
        self.layer_plan_provider = layer_plan_provider
        self._layer_plans: list[Plan] = []
        self.prefill_peak_nbytes = 0  # most bytes the cache held at once during prefill
        layout = plan or Plan.full(1, 1)
        self.stats_config = stats_config or StatsConfig(sink_tokens=layout.sink_tokens, group_size=layout.group_size)
        if self.stats_config.reconstruction and reconstruction is None:
            raise ValueError(
                "stats_config.reconstruction needs the context's ids: pass "
                "reconstruction=ReconstructionRequest.for_prompt(tokenizer, input_ids)"
            )
        if layer_plan_provider is not None and self.stats_config.reconstruction:
            raise ValueError("reconstruction scores need every layer's prefill: plan with plan_provider=, "
                             "not layer_plan_provider=")
        if reconstruction is not None and not isinstance(reconstruction, ReconstructionRequest):
            raise ValueError(f"reconstruction must be a ReconstructionRequest, got {type(reconstruction).__name__}")
        self.reconstruction = reconstruction
        self.reconstruction_seconds = 0.0
        if eviction_slack is not None and eviction_slack < 0:
            raise ValueError(f"eviction_slack must be >= 0, got {eviction_slack}")
        self.eviction_slack = eviction_slack
        self.backend = backend
        if assembled not in (None, True, False):
            raise ValueError(f"assembled must be None (on CPU), True or False, got {assembled!r}")
        self.assembled = assembled
        if working_dtype not in WORKING_DTYPES:
            raise ValueError(f"working_dtype must be one of {WORKING_DTYPES}, got {working_dtype!r}")
        self.working_dtype = working_dtype
        self._backends: dict[str, Any] = {}
        self.capture = capture
        self._model = model
        self.stats: AttentionStats | None = None
        super().__init__(layers=[CompressedLayer(i) for i in range(self.num_layers)])

    # --------------------------------------------------------------- checks
    def _check_plan(self, plan: Plan) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be an adaptive_kv.Plan, got {type(plan).__name__}")
        if (plan.num_layers, plan.num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"plan has {plan.num_layers} layers x {plan.num_kv_heads} KV heads, "
                f"the model has {self.num_layers} x {self.num_kv_heads}"
            )

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers - 1}], got {layer_idx}")
        expected = (1, self.num_kv_heads, key_states.shape[2] if key_states.dim() == 4 else -1, self.head_dim)
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            if states.dim() != 4 or tuple(states.shape) != expected or states.shape[2] < 1:
                raise ValueError(
                    f"{name} must have shape (batch=1, num_kv_heads={self.num_kv_heads}, seq_len>=1, "
                    f"head_dim={self.head_dim}), got {tuple(states.shape)}; CompressedCache holds one request"
                )
        if not key_states.is_floating_point():
            raise ValueError(f"key_states must be floating point, got {key_states.dtype}")

    def _kernels(self, device: torch.device):
        # resolved once per device: this runs for every layer of every decode step
        key = str(device)
        if key not in self._backends:
            self._backends[key] = get_backend(device, self.backend)
        return self._backends[key]

    # --------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Store the new states of `layer_idx` and return a LayerStep for the attention function."""
        self._check_states(key_states, value_states, layer_idx)
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if layer.is_compressed:
            if layer.view is not None and (key_states.shape[2] > 1 or self._store_changes_due(layer)):
                self._sync_scores(layer)  # the store's scores are read or rebuilt below
            self._maintain(layer)
            layer.residual = layer.residual.append(key_states[0], value_states[0], layer.seen_tokens,
                                                   sizes=layer.residual_lengths)
            q = key_states.shape[2]
            layer.residual_lengths = [n + q for n in layer.residual_lengths]
            layer.held = [n + q for n in layer.held]
            if layer.view is not None and key_states.shape[2] == 1:
                layer.view.append(key_states[0], value_states[0])
            else:  # a multi-token step (a question after compression) goes through the reference once
                layer.view = None
        elif layer.prefill is None:
            layer.prefill = (key_states[0], value_states[0])
        else:
            raise ValueError("CompressedCache compresses after the first forward: chunked prefill is not supported")
        layer.seen_tokens += key_states.shape[2]
        step = LayerStep(self, layer_idx, key_states, value_states)
        return step, step

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search is not supported: one cache is one request."""
        raise NotImplementedError("CompressedCache holds one request; beam search is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        """Cropping is not supported (evicted tokens cannot come back)."""
        raise NotImplementedError("CompressedCache cannot be cropped")

    # --------------------------------------------------------------- prefill
    @property
    def collects_stats(self) -> bool:
        """Whether prefill reads attention statistics (needed by providers and evicting plans)."""
        planned = self.plan_provider is not None or self.layer_plan_provider is not None
        return self.capture or planned or self.plan.tracks_scores

    def observe(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Read one layer's statistics from its prefill queries (1, H_q, T, D); finish after the last."""
        layer = self.layers[layer_idx]
        if self.collects_stats:
            keys, values = layer.prefill
            layer.observation = observe_layer(
                query[0], keys, values, scaling, layer_idx, self.num_layers, self.stats_config,
                kernels=self._kernels(query.device),
            )
        self.prefill_peak_nbytes = max(self.prefill_peak_nbytes, self.nbytes())
        if self.layer_plan_provider is not None:
            self._apply_layer_plan(layer)
        if layer_idx == self.num_layers - 1:
            self._finish_prefill()

    def _apply_layer_plan(self, layer: CompressedLayer) -> None:
        """Bounded prefill: plan this layer from its own statistics and compress it right away."""
        seq_len = layer.prefill[0].shape[1]
        stats = self._stack([layer.observation], seq_len)
        plan = self.layer_plan_provider(stats, layer.layer_idx)
        if not isinstance(plan, Plan) or (plan.num_layers, plan.num_kv_heads) != (1, self.num_kv_heads):
            raise ValueError(f"layer_plan_provider must return a one-layer Plan of {self.num_kv_heads} KV heads, got {plan!r}")
        if self._layer_plans and plan.layout() != self._layer_plans[0].layout():
            raise ValueError(f"layer {layer.layer_idx}'s plan has layout {plan.layout()}, "
                             f"layer 0's has {self._layer_plans[0].layout()}")
        select = acc = None
        if plan.layer_tracks_scores(0):
            if plan.scorer not in stats.token_scores:
                raise ValueError(f"plan.scorer {plan.scorer!r} is not read layer by layer; use plan_provider=")
            select, acc = stats.token_scores[plan.scorer][0], stats.token_scores["window"][0]
        self._apply(layer, plan, select, acc, row=0)
        self._layer_plans.append(plan)

    def _finish_prefill(self) -> None:
        if self.layer_plan_provider is not None:
            stats = self._stack([layer.observation for layer in self.layers], self.layers[0].seen_tokens)
            for layer in self.layers:
                layer.observation = None
            self.plan = Plan.stack(self._layer_plans)
            self.stats = dataclasses.replace(stats, token_scores={})
            return
        seq_len = self.layers[0].prefill[0].shape[1]
        stats = None
        if self.collects_stats:
            stats = self._stack([layer.observation for layer in self.layers], seq_len)
            for layer in self.layers:
                layer.observation = None
            if self.reconstruction is not None:
                stats = stats.with_reconstruction(self._reconstruct())
        if self.capture:  # keep the full prefill and its statistics for fork()
            self.stats = stats
            return
        plan = self.plan if self.plan_provider is None else self.plan_provider(stats)
        self._apply_plan(plan, stats)
        self.prefill_peak_nbytes = max(self.prefill_peak_nbytes, self.nbytes())

    def _stack(self, observations: list[LayerObservation], seq_len: int) -> AttentionStats:
        """The statistics of these layers, with the shape of the states they were read from."""
        itemsize = torch.empty((), dtype=self.layers[0].dtype).element_size()
        return AttentionStats.stack(observations, seq_len, head_dim=self.head_dim, dtype_bytes=itemsize)

    def _reconstruct(self) -> torch.Tensor:
        """Reconstruction scores (L, H_kv, T) over this prefill (a nested pass through the decoder, no cache)."""
        start = time.perf_counter()
        keys = [layer.prefill[0] for layer in self.layers]
        values = [layer.prefill[1] for layer in self.layers]
        scores = reconstruction_scores(self._model, keys, values, self.reconstruction)
        self.reconstruction_seconds = time.perf_counter() - start
        return scores

    def _apply_plan(self, plan: Plan, stats: AttentionStats | None) -> None:
        self._check_plan(plan)  # before anything changes: a bad plan leaves the prefill intact
        if plan.tracks_scores and stats is None:
            raise ValueError("a plan that evicts needs prefill statistics")
        if plan.tracks_scores and plan.scorer not in stats.token_scores:
            raise ValueError(
                f"plan.scorer {plan.scorer!r} was not read during prefill; reconstruction scores need "
                "StatsConfig(reconstruction=True) and a ReconstructionRequest"
            )
        self.plan = plan
        for layer_idx, layer in enumerate(self.layers):
            select = acc = None
            if stats is not None and plan.layer_tracks_scores(layer_idx):
                select = stats.token_scores[plan.scorer][layer_idx]
                acc = stats.token_scores["window"][layer_idx]
            self._apply(layer, plan, select, acc)
        self.stats = None if stats is None else dataclasses.replace(stats, token_scores={})

    @property
    def is_captured(self) -> bool:
        """True when this cache holds a full prefill kept for `fork`."""
        return self.capture and self.layers[0].prefill is not None and self.stats is not None

    def fork(self, plan: Plan, **options: Any) -> "CompressedCache":
        """A new cache holding this captured prefill compressed by `plan`; this one stays unchanged.

        One prefill then serves every policy and budget compared on it (evaluation, search).
        """
        if not self.is_captured:
            raise ValueError("fork needs a cache built with capture=True and a finished prefill")
        options.setdefault("backend", self.backend)
        options.setdefault("working_dtype", self.working_dtype)
        options.setdefault("stats_config", dataclasses.replace(self.stats_config, reconstruction=False))
        new = CompressedCache(self._model, plan=plan, **options)
        for mine, theirs in zip(self.layers, new.layers):
            theirs.device, theirs.dtype, theirs.is_initialized = mine.device, mine.dtype, True
            theirs.prefill, theirs.seen_tokens = mine.prefill, mine.seen_tokens  # read-only: _apply copies
        new._apply_plan(plan, self.stats)
        return new

    def _apply(self, layer: CompressedLayer, plan: Plan, select: torch.Tensor | None, acc: torch.Tensor | None,
               row: int | None = None) -> None:
        """Keep sinks + recent + top-ranked tokens per head; pack the middle; free the prefill.

        `row` is the plan's row for this layer (default its index; 0 for a one-layer plan).
        """
        row = layer.layer_idx if row is None else row
        keys, values = layer.prefill  # (H, T, D)
        num_heads, seq_len, _ = keys.shape
        group = plan.group_size
        sinks = min(plan.sink_tokens, seq_len)
        recent_start = max(sinks, seq_len - plan.recent_window)
        budgets = plan.heads[row]
        ranking = None if select is None else layer_ranking(select, plan.selection, sinks, recent_start)
        grouped: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        residual_idx: list[torch.Tensor] = []
        for head, budget in enumerate(budgets):
            wanted = plan.kept_tokens(row, head, seq_len) - sinks - (seq_len - recent_start)
            if ranking is None:  # keep-all plans need no ranking
                middle = torch.arange(sinks, recent_start, device=keys.device)
            else:
                middle = kept_middle(ranking[head], sinks, recent_start, wanted)
            full_groups = middle.numel() // group
            if full_groups:
                grouped.setdefault((budget.key_bits, budget.value_bits), []).append(
                    (head, middle[: full_groups * group].view(full_groups, group))
                )
            residual_idx.append(torch.cat([middle[full_groups * group :], torch.arange(recent_start, seq_len, device=keys.device)]))
        track_positions = plan.layer_tracks_scores(row) and plan.selection == "shared"
        floor = PROTECTED_SCORE if plan.scorer not in RUNNING_SCORERS else 0.0  # every packed token is middle
        kernels = self._kernels(keys.device)
        layer.buckets = {}
        for bits, parts in grouped.items():
            heads = torch.cat([torch.full((idx.shape[0],), h, device=keys.device) for h, idx in parts])
            index = torch.cat([idx for _, idx in parts])  # (G_n, G)
            layer.buckets[bits] = quantize_groups(
                kernels, keys[heads[:, None], index], values[heads[:, None], index], heads, *bits,
                None if acc is None else acc[heads[:, None], index] + floor, index if track_positions else None,
            )
        lengths = torch.tensor([idx.numel() for idx in residual_idx], dtype=torch.long, device=keys.device)
        head_of = torch.arange(num_heads, device=keys.device).repeat_interleave(lengths)
        flat_idx = torch.cat(residual_idx)
        layer.residual = Residual(
            keys[head_of, flat_idx].clone(), values[head_of, flat_idx].clone(), lengths,
            None if acc is None else acc[head_of, flat_idx].float() + floor * (flat_idx < recent_start),
            flat_idx.to(torch.int32) if track_positions else None,
        )
        layer.sinks = (keys[:, :sinks].clone(), values[:, :sinks].clone())
        layer.budgets = budgets
        layer.prefill = None
        layer.view = None
        layer.decode_layout = None
        layer.residual_lengths, layer.held = lengths.tolist(), layer.head_tokens().tolist()

    # --------------------------------------------------------------- decode
    def _maintain(self, layer: CompressedLayer) -> None:
        """Flush full residual windows into packed groups, then evict over-budget heads (H2O)."""
        plan, group = self.plan, self.plan.group_size
        kernels = self._kernels(layer.device)
        threshold = plan.recent_window + group
        while max(layer.residual_lengths) >= threshold:
            ready = torch.tensor([h for h, n in enumerate(layer.residual_lengths) if n >= threshold],
                                 device=layer.residual.lengths.device)
            taken, rest = layer.residual.split_oldest(ready, group)  # (n, G)
            for bits in {(layer.budgets[h].key_bits, layer.budgets[h].value_bits) for h in ready.tolist()}:
                rows = torch.tensor([i for i, h in enumerate(ready.tolist()) if
                                     (layer.budgets[h].key_bits, layer.budgets[h].value_bits) == bits], device=taken.device)
                idx = taken[rows]
                scores = None if layer.residual.scores is None else layer.residual.scores[idx]
                positions = None if layer.residual.positions is None else layer.residual.positions[idx]
                new = quantize_groups(
                    kernels, layer.residual.keys[idx], layer.residual.values[idx], ready[rows], *bits, scores, positions
                )
                if layer.view is not None:  # rewrite only the flushed tokens, where the store puts them
                    layer.view.flush(ready[rows].tolist(), group, *new.dequantize(kernels, layer.dtype),
                                     insert_at=self._bucket_end(layer, bits))
                layer.buckets[bits] = concat_buckets(layer.buckets.get(bits), new)
                layer.decode_layout = None
            layer.residual = rest
            layer.residual_lengths = rest.lengths.tolist()
        self._evict(layer)

    @staticmethod
    def _bucket_end(layer: CompressedLayer, bits: tuple[int, int]) -> int:
        """Index in store order (sinks, buckets, residual) just after bucket `bits` (a new one goes last)."""
        end = layer.sinks[0].shape[0] * layer.sinks[0].shape[1]
        for key, bucket in layer.buckets.items():
            end += bucket.num_tokens
            if key == bits:
                break
        return end

    def _evict(self, layer: CompressedLayer) -> None:
        if not self.plan.layer_tracks_scores(layer.layer_idx):
            return
        slack = self._slack()
        held = layer.held
        over = [
            (head, held[head] - budget.keep)
            for head, budget in enumerate(layer.budgets)
            if budget.keep is not None and held[head] > budget.keep + slack
        ]
        if not over:
            return
        shared = self._shared_scores(layer) if self.plan.selection == "shared" else None
        kept = [torch.ones(layer.sinks[0].shape[0] * layer.sinks[0].shape[1], dtype=torch.bool, device=layer.device)]
        for bits, bucket in list(layer.buckets.items()):
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
                layer.buckets[bits] = bucket.select(keep)
                layer.decode_layout = None
        kept = torch.cat(kept)
        if layer.view is not None and not bool(kept.all()):  # compact the view's rows: no dequantisation
            layer.view.drop(kept)
        layer.held = layer.head_tokens().tolist()

    @staticmethod
    def _shared_scores(layer: CompressedLayer) -> torch.Tensor:
        """One H2O score per position for the whole layer: (seen_tokens,) fp32.

        Each head's accumulated scores are normalised to a distribution over its evictable tokens,
        then a position scores the mean over the heads that may evict it, so every head of the layer
        ranks a position the same way and equal budgets keep equal positions.
        """
        parts = [(b.token_heads(), b.scores, b.positions) for b in layer.buckets.values()]
        parts.append((layer.residual.token_heads(), layer.residual.scores, layer.residual.positions))
        heads, scores, positions = (torch.cat(x) for x in zip(*parts))
        num_heads = layer.residual.lengths.numel()
        free = scores < PROTECTED_SCORE  # protected tokens are never evicted: they neither rank nor normalise
        scores = scores * free
        per_head = scores.new_zeros(num_heads).index_add_(0, heads, scores)
        share = scores / per_head.clamp_min(1e-30)[heads]
        total = share.new_zeros(layer.seen_tokens).index_add_(0, positions.long(), share)
        count = share.new_zeros(layer.seen_tokens).index_add_(0, positions.long(), free.to(share.dtype))
        return total / count.clamp_min(1)

    # --------------------------------------------------------------- attention
    def attend(self, step: LayerStep, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of query (1, H_q, q, D) over this layer's compressed store: (1, q, H_q, D)."""
        layer = self.layers[step.layer_idx]
        kernels = self._kernels(query.device)
        need_mass = self.plan.layer_tracks_scores(step.layer_idx)
        if query.shape[2] == 1 and self._uses_view(query.device):
            if layer.view is None:
                layer.view = AssembledView.build(layer.sinks, list(layer.buckets.values()), layer.residual, kernels,
                                                 query.dtype, *self._working_dtypes(layer, query))
            # H2O mass accumulates in the view; _sync_scores writes it back
            out = layer.view.attend(query[0], scaling, self._mass_heads(layer) if need_mass else None)
        else:
            # the triton backend runs one decode query fused, H2O scores included, without host syncs
            if layer.decode_layout is None:
                layer.decode_layout = self._decode_layout(layer)
            out = kernels.layout_decode(query[0], layer.decode_layout, layer.residual, scaling, accumulate_mass=need_mass)
        return out.transpose(0, 1).unsqueeze(0)  # (1, q, H_q, D)

    def _decode_layout(self, layer: CompressedLayer) -> DecodeLayout:
        num_heads, sinks, head_dim = layer.sinks[0].shape
        lengths = torch.full((num_heads,), sinks, dtype=torch.long, device=layer.sinks[0].device)
        sink_segment = Segment.full_precision(layer.sinks[0].reshape(-1, head_dim), layer.sinks[1].reshape(-1, head_dim),
                                              lengths)
        return DecodeLayout.build([[sink_segment, *layer.buckets.values()]], num_heads, self.plan.group_size)

    def _slack(self) -> int:
        """Tokens a head may hold above its budget before decode-time eviction runs."""
        return self.plan.group_size if self.eviction_slack is None else self.eviction_slack

    def _store_changes_due(self, layer: CompressedLayer) -> bool:
        """Whether the coming `_maintain` flushes or evicts (the same tests it runs, on the mirrors)."""
        plan = self.plan
        if max(layer.residual_lengths) >= plan.recent_window + plan.group_size:
            return True
        slack = self._slack()
        return any(b.keep is not None and n > b.keep + slack for n, b in zip(layer.held, layer.budgets))

    @staticmethod
    def _sync_scores(layer: CompressedLayer) -> None:
        """Write the H2O scores an assembled view accumulated back into the store (buckets, residual)."""
        if layer.view is None or layer.view.scores is None:
            return
        scores = layer.view.store_scores(layer.sinks[0].shape[0] * layer.sinks[0].shape[1])
        layer.decode_layout = None  # it holds the replaced score tensors' addresses
        offset = 0
        for bucket in layer.buckets.values():
            bucket.scores = scores[offset : offset + bucket.num_tokens].clone()
            offset += bucket.num_tokens
        layer.residual.scores = scores[offset:].clone()

    def sync(self) -> None:
        """Bring the store's H2O scores up to date with the assembled views (they are read lazily)."""
        for layer in self.layers:
            self._sync_scores(layer)

    def _mass_heads(self, layer: CompressedLayer) -> tuple[int, ...]:
        """KV heads whose H2O scores decide an eviction: every head when a layer ranks tokens together,
        else those with a finite budget (a keep-all head's scores are never read; the fast path skips them)."""
        if self.plan.selection == "shared":
            return tuple(range(len(layer.budgets)))
        return tuple(h for h, budget in enumerate(layer.budgets) if budget.keep is not None)

    def _working_dtypes(self, layer: CompressedLayer, query: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """Dtypes of the view's keys and values: bfloat16 for a side whose every head is quantised
        (`working_dtype="auto"`, fp32 model, a CPU with native bf16, a head holding at least
        BF16_MIN_TOKENS), else the model's dtype."""
        exact = query.dtype
        if (self.working_dtype == "model" or exact != torch.float32 or max(layer.held) < BF16_MIN_TOKENS
                or not _native_bf16(query.device)):
            return exact, exact
        lossy = lambda bits: all(b < 16 for b in bits)  # noqa: E731
        return (torch.bfloat16 if lossy(b.key_bits for b in layer.budgets) else exact,
                torch.bfloat16 if lossy(b.value_bits for b in layer.budgets) else exact)

    def _uses_view(self, device: torch.device) -> bool:
        # on CPU the assembled operands are the fast path; on CUDA the fused kernel reads packed codes
        return self.assembled if self.assembled is not None else device.type == "cpu"

    def working_nbytes(self) -> int:
        """Bytes of the assembled decode operands (a dequantised working copy, on top of `nbytes`)."""
        return sum(layer.view.nbytes() for layer in self.layers if layer.view is not None)


    # --------------------------------------------------------------- reports
    def nbytes(self) -> int:
        """Bytes the cache really holds (every stored tensor)."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes a DynamicCache would hold for the same tokens."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0
        itemsize = torch.empty((), dtype=layer.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * layer.seen_tokens * self.head_dim * itemsize

    def predicted_nbytes(self) -> int | None:
        """The plan's byte prediction for the prefill length (valid right after the plan is applied)."""
        if self.plan is None or not self.layers[0].is_initialized:
            return None
        itemsize = torch.empty((), dtype=self.layers[0].dtype).element_size()
        return self.plan.nbytes(self.layers[0].seen_tokens, self.head_dim, itemsize)

    def report(self) -> dict[str, Any]:
        """KV report: full bytes, real bytes, ratio, plan summary and per-layer/head token counts."""
        full, real = self.full_nbytes(), self.nbytes()
        layers = []
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            tokens = layer.head_tokens().tolist()
            budgets = layer.budgets or (HeadBudget(),) * self.num_kv_heads
            layers.append({
                "layer": layer.layer_idx,
                "bytes": layer.nbytes(),
                "heads": [
                    {"tokens": t, "key_bits": b.key_bits, "value_bits": b.value_bits, "keep": b.keep}
                    for t, b in zip(tokens, budgets)
                ],
            })
        return {
            "full_bytes": full,
            "bytes": real,
            "ratio": (full / real) if real else None,
            "working_bytes": self.working_nbytes(),
            "seq_len": self.get_seq_length(),
            "plan": None if self.plan is None else self.plan.summary(),
            "layers": layers,
        }
