"""CompressedCache: a `transformers.Cache` that executes a Plan with real memory savings.

Life of one request: prefill stores full precision and reads AttentionStats; at the end of the
prefill forward the plan provider is asked once and the Plan is applied, layer by layer
(`CompressedLayer.compress`); decode appends to each layer, which flushes, evicts and attends
over its own store (`cache_layer`). The container holds the Cache API, planning, fork, share
and reports.

A sliding-window layer (transformers' `layer_types`, or a `sliding_window` every layer uses) holds
and attends to only its window, as transformers' own cache does (`sliding_windows`); plans carry
the windows (`Plan.windows`) so their byte predictions and budgets count what the layer can hold.

Batch size is 1: one cache holds one request, since every head of every request keeps its own
tokens. Attention runs in `adaptive_kv.attention`, which calls back through the `CacheStep` that
`update` hands it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from adaptive_kv.cache_layer import WORKING_DTYPES, CompressedLayer, DecodeOptions
from adaptive_kv.kernels import get_backend
from adaptive_kv.plan import HeadBudget, Plan, window_tokens
from adaptive_kv.predicted_reconstruction import PREDICTED_SCORER, context_positions
from adaptive_kv.reconstruction import ReconstructionRequest, reconstruction_scores
from adaptive_kv.stats import AttentionStats, LayerObservation, StatsConfig
from adaptive_kv.step import CacheStep

PlanProvider = Callable[[AttentionStats], Plan]
# bounded prefill: (one layer's statistics, layer index) -> that layer's one-layer Plan, asked as
# soon as the layer's forward ends, so the prefill never holds more than one layer uncompressed
LayerPlanProvider = Callable[[AttentionStats, int], Plan]


# the layer types whose cache transformers bounds to the newest `sliding_window` tokens and whose
# queries attend to that window; any other attention-free or shared type is not a KV layer we hold
FULL_LAYER_TYPES = ("full_attention",)
SLIDING_LAYER_TYPES = ("sliding_attention",)


def sliding_windows(config) -> tuple[int | None, ...] | None:
    """Each layer's sliding window (None: it attends to every token), as transformers' DynamicCache
    decides from the model's config; None when no layer slides."""
    decoder_config = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder_config)
    windows = []
    for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if kind not in FULL_LAYER_TYPES + SLIDING_LAYER_TYPES:
            raise ValueError(f"layer_types[{idx}] is {kind!r}; CompressedCache supports {FULL_LAYER_TYPES + SLIDING_LAYER_TYPES}")
        windows.append(kwargs["sliding_window"] if kind in SLIDING_LAYER_TYPES else None)
    return None if all(w is None for w in windows) else tuple(windows)


@dataclass(frozen=True)
class LayerStep(CacheStep):
    """What `update` hands to the attention function: this cache's layer and the new states."""

    cache: "CompressedCache"
    layer_idx: int
    key_states: torch.Tensor  # (1, H_kv, q, D)
    value_states: torch.Tensor

    @property
    def is_compressed(self) -> bool:
        return self.cache.layers[self.layer_idx].is_compressed

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        return self.cache.attend(self, query, scaling)

    def observe(self, query: torch.Tensor, scaling: float) -> None:
        self.cache.observe(self.layer_idx, query, scaling)


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
        from adaptive_kv.attention import prepare_model  # imports transformers' model machinery: only when used

        given = sum(x is not None for x in (plan, plan_provider, layer_plan_provider))
        if capture and given:
            raise ValueError("capture=True keeps the prefill for fork(plan); give no plan, plan_provider or layer_plan_provider")
        if not capture and given != 1:
            raise ValueError("give exactly one of plan=, plan_provider= or layer_plan_provider= (or capture=True)")
        config = prepare_model(model)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.windows = sliding_windows(config)
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
        self.predictor = self.stats_config.predictor
        if self.predictor is not None:
            self.predictor.check_model(config)
        for files in self.stats_config.trained_for:  # a controller of another model would plan silently wrong
            files.check_model(config)
        self._attention_inputs: dict[int, torch.Tensor] = {}  # a layer's prefill hidden states, until observed
        self._decode_scores: dict[int, torch.Tensor] = {}  # a decode step's predicted scores, until appended
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
        options = DecodeOptions(eviction_slack, assembled, working_dtype)
        windows = self.windows or (None,) * self.num_layers
        super().__init__(layers=[CompressedLayer(i, options, windows[i]) for i in range(self.num_layers)])

    # --------------------------------------------------------------- checks
    def _check_plan(self, plan: Plan) -> None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be an adaptive_kv.Plan, got {type(plan).__name__}")
        if (plan.num_layers, plan.num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"plan has {plan.num_layers} layers x {plan.num_kv_heads} KV heads, "
                f"the model has {self.num_layers} x {self.num_kv_heads}"
            )
        if plan.windows != self.windows:
            raise ValueError(
                f"plan.windows must be the model's sliding windows {self.windows} (None: no layer slides), "
                f"got {plan.windows}; build it with windows=cache.windows (or adaptive_kv.cache.sliding_windows(config))"
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
            layer.append(key_states[0], value_states[0], self._kernels(layer.device),
                         self._decode_scores.pop(layer_idx, None))
        else:
            layer.hold_prefill(key_states[0], value_states[0])
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

    def read_attention_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        """Keep the hidden states (1, T, hidden) entering a layer's attention during the prefill, when
        a predictor scores them, and score a decode step's new tokens where the layer evicts by
        predicted scores (called by the attention module's pre-hook, `adaptive_kv.attention`)."""
        if self.predictor is None:
            return
        layer = self.layers[layer_idx]
        if not layer.is_compressed:
            if self.collects_stats:
                self._attention_inputs[layer_idx] = hidden_states[0]
        elif layer.scores_new_tokens:  # a step's tokens come right after the ones the layer has seen
            hidden = hidden_states[0]
            seq_len = layer.seen_tokens + hidden.shape[0]
            positions = context_positions(hidden.shape[0], seq_len, hidden.device)
            self._decode_scores[layer_idx] = self.predictor.scores(layer_idx, hidden, positions, seq_len)

    def observe(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Read one layer's statistics from its prefill queries (1, H_q, T, D); finish after the last."""
        layer = self.layers[layer_idx]
        if self.collects_stats:
            layer.observe(query[0], scaling, self.num_layers, self.stats_config, self._kernels(query.device))
            if self.predictor is not None:
                self._predict(layer)
        self.prefill_peak_nbytes = max(self.prefill_peak_nbytes, self.nbytes())
        if self.layer_plan_provider is not None:
            self._apply_layer_plan(layer)
        if layer_idx == self.num_layers - 1:
            self._finish_prefill()

    def _predict(self, layer: CompressedLayer) -> None:
        """Add the predictor's scores of the tokens the layer holds to its observation."""
        hidden = self._attention_inputs.pop(layer.layer_idx, None)
        if hidden is None:
            raise ValueError(f"layer {layer.layer_idx}'s attention inputs were not seen: the predictor needs a model "
                             "prepared by adaptive_kv.attention.prepare_model (its attention modules' pre-hooks)")
        held = layer.prefill[0].shape[1]  # a sliding layer holds only the context's last tokens
        positions = context_positions(held, layer.seen_tokens, hidden.device)
        predicted = self.predictor.scores(layer.layer_idx, hidden[hidden.shape[0] - held:], positions, layer.seen_tokens)
        scores = {**layer.observation.token_scores, PREDICTED_SCORER: predicted}
        layer.observation = dataclasses.replace(layer.observation, token_scores=scores)

    def _apply_layer_plan(self, layer: CompressedLayer) -> None:
        """Bounded prefill: plan this layer from its own statistics and compress it right away."""
        held = layer.prefill[0].shape[1]  # a sliding layer: its window, planned as a request of those tokens
        stats = self._stack([layer.observation], held, (layer.window,))
        plan = self.layer_plan_provider(stats, layer.layer_idx)
        if not isinstance(plan, Plan) or (plan.num_layers, plan.num_kv_heads) != (1, self.num_kv_heads):
            raise ValueError(f"layer_plan_provider must return a one-layer Plan of {self.num_kv_heads} KV heads, got {plan!r}")
        plan = plan.with_windows((layer.window,))
        if self._layer_plans and plan.layout() != self._layer_plans[0].layout():
            raise ValueError(f"layer {layer.layer_idx}'s plan has layout {plan.layout()}, "
                             f"layer 0's has {self._layer_plans[0].layout()}")
        select = acc = None
        if plan.layer_tracks_scores(0):
            if plan.scorer not in stats.token_scores:
                raise ValueError(f"plan.scorer {plan.scorer!r} is not read layer by layer; use plan_provider=")
            select, acc = stats.token_scores[plan.scorer][0], stats.token_scores["window"][0]
        layer.compress(plan, 0, select, acc, self._kernels(layer.device))
        self._layer_plans.append(plan)

    def _finish_prefill(self) -> None:
        if self.layer_plan_provider is not None:
            stats = self._stack([layer.observation for layer in self.layers], self.layers[0].seen_tokens, self.windows)
            for layer in self.layers:
                layer.observation = None
            self.plan = Plan.stack(self._layer_plans)
            self.stats = dataclasses.replace(stats, token_scores={})
            return
        seq_len = self.layers[0].seen_tokens
        stats = None
        if self.collects_stats:
            stats = self._stack([layer.observation for layer in self.layers], seq_len, self.windows)
            for layer in self.layers:
                layer.observation = None
            if self.reconstruction is not None:
                stats = stats.with_reconstruction(self._reconstruct())
            if self.predictor is not None:
                stats = stats.with_reconstruction(stats.token_scores[PREDICTED_SCORER], PREDICTED_SCORER)
        if self.capture:  # keep the full prefill and its statistics for fork()
            self.stats = stats
            return
        plan = self.plan if self.plan_provider is None else self.plan_provider(stats)
        self._apply_plan(plan, stats)
        self.prefill_peak_nbytes = max(self.prefill_peak_nbytes, self.nbytes())

    def _stack(self, observations: list[LayerObservation], seq_len: int,
               windows: tuple[int | None, ...] | None) -> AttentionStats:
        """The statistics of these layers, with the shape of the states they were read from."""
        itemsize = torch.empty((), dtype=self.layers[0].dtype).element_size()
        return AttentionStats.stack(observations, seq_len, head_dim=self.head_dim, dtype_bytes=itemsize, windows=windows)

    def _reconstruct(self) -> torch.Tensor:
        """Reconstruction scores (L, H_kv, T) over this prefill (a nested pass through the decoder, no cache)."""
        start = time.perf_counter()
        keys = [layer.prefill[0] for layer in self.layers]
        values = [layer.prefill[1] for layer in self.layers]
        scores = reconstruction_scores(self._model, keys, values, self.reconstruction, self.layers[0].seen_tokens)
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
            layer.compress(plan, layer_idx, select, acc, self._kernels(layer.device))
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
        # the predictor stays: a plan over predicted scores goes on scoring the tokens decoded after it
        options.setdefault("stats_config", dataclasses.replace(self.stats_config, reconstruction=False))
        new = CompressedCache(self._model, plan=plan, **options)
        for mine, theirs in zip(self.layers, new.layers):
            theirs.device, theirs.dtype, theirs.is_initialized = mine.device, mine.dtype, True
            theirs.prefill, theirs.seen_tokens = mine.prefill, mine.seen_tokens  # read-only: _apply copies
            theirs.first_position = mine.first_position
        new._apply_plan(plan, self.stats)
        return new

    def share(self) -> "CompressedCache":
        """A copy-on-write copy of this compressed cache, to extend by a suffix (the next question, the
        next chat turn) and decode: it shares every stored tensor with this one, and what either appends,
        flushes or evicts afterwards never reaches the other. One stored context then serves many requests
        at once; `nbytes()` of each still counts the shared tensors (what it would hold alone)."""
        if self.plan is None or not all(layer.is_compressed for layer in self.layers):
            raise ValueError("share needs a compressed cache: a finished prefill whose plan was applied")
        twin = copy.copy(self)
        twin.layers = [layer.share() for layer in self.layers]
        twin._decode_scores, twin._attention_inputs, twin._backends = {}, {}, dict(self._backends)
        return twin

    # --------------------------------------------------------------- decode
    def attend(self, step: LayerStep, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of query (1, H_q, q, D) over the step's layer's compressed store: (1, q, H_q, D)."""
        out = self.layers[step.layer_idx].attend(query[0], scaling, self._kernels(query.device))
        return out.transpose(0, 1).unsqueeze(0)

    def sync(self) -> None:
        """Bring the store's H2O scores up to date with the assembled views (they are read lazily)."""
        for layer in self.layers:
            layer.sync_scores()

    def drop_working_copy(self) -> None:
        """Free the assembled decode operands (`working_nbytes`); the next decode step rebuilds them. For a
        cache kept without decoding, e.g. a stored context that requests read through `share()` copies."""
        for layer in self.layers:
            layer.sync_scores()
            layer.view, layer.decode_layout = None, None

    def prefill_states(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (H_kv, T, D) of a layer's prefill, held until a plan lands (or for `fork`)."""
        layer = self.layers[layer_idx]
        if layer.prefill is None:
            raise ValueError(f"layer {layer_idx} holds no prefill: a plan was applied (use capture=True to keep it)")
        return layer.prefill

    def head_states(self, layer_idx: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every head's stored keys and values in `dtype`, dequantised as attention reads them (`CompressedLayer.head_states`)."""
        layer = self.layers[layer_idx]
        return layer.head_states(self._kernels(layer.device), dtype)

    def working_nbytes(self) -> int:
        """Bytes of the assembled decode operands (a dequantised working copy, on top of `nbytes`)."""
        return sum(layer.working_nbytes() for layer in self.layers)

    # --------------------------------------------------------------- reports
    def nbytes(self) -> int:
        """Bytes the cache really holds (every stored tensor)."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes a DynamicCache(config=model.config) would hold for the same tokens (a sliding layer: its window)."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0
        itemsize = torch.empty((), dtype=layer.dtype).element_size()
        tokens = sum(window_tokens(layer.seen_tokens, layer.window) for layer in self.layers)
        return 2 * self.num_kv_heads * tokens * self.head_dim * itemsize

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
