"""The learned controller as a policy: statistics -> predicted distortion -> knapsack -> Plan."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.model_identity import TrainedFor
from adaptive_kv.plan import HeadBudget, Layout, Plan
from adaptive_kv.policies.controller.allocator import allocate, warm_up
from adaptive_kv.policies.base import Policy, check_fraction, check_layer
from adaptive_kv.policies.controller.files import ControllerConfig, load_controller
from adaptive_kv.policies.controller.net import ControllerNet, FoldedNet
from adaptive_kv.policies.controller.options import global_keeps_from_share, keeps_nbytes, option_bytes
from adaptive_kv.policies.controller.trained_range import TrainedRange
from adaptive_kv.policies.kvzip import KVzip
from adaptive_kv.policies.registry import register
from adaptive_kv.predicted_reconstruction import (PREDICTED_SCORER, SCORER_JSON, ReconstructionPredictor, has_predictor,
                                                  load_predictor)
from adaptive_kv.stats import PREDICTED_FEATURES, PREDICTED_TWIN, RECONSTRUCTION_FEATURES, AttentionStats, StatsConfig


MEMO_LENGTHS = 256  # context lengths whose option bytes and budgets a policy keeps


def _option_budgets(grid, seq_len: int, floor: int) -> tuple:
    """HeadBudget of every uniform option at `seq_len` (None for global ones)."""
    return tuple(option.budget(seq_len, floor) if option.allocation == "uniform" else None for option in grid)


def _held_groups(stats: AttentionStats) -> dict[tuple[int, bool], tuple[int, ...]]:
    """Layers by (tokens a full cache holds for them, whether they slide): one group when no layer slides.
    A sliding layer that holds every token still stores their positions, so it prices its options apart."""
    if stats.windows is None:
        return {(stats.seq_len, False): tuple(range(stats.num_layers))}
    groups: dict[tuple[int, bool], list[int]] = {}
    for layer, window in enumerate(stats.windows):
        groups.setdefault((stats.layer_tokens(layer), window is not None), []).append(layer)
    return {key: tuple(layers) for key, layers in groups.items()}


@functools.lru_cache(maxsize=4096)
def _head_budget(keep: int, key_bits: int, value_bits: int, seq_len: int) -> HeadBudget:
    """A head's budget for a global option's keep, memoised (the same counts recur)."""
    return HeadBudget(None if keep >= seq_len else keep, key_bits, value_bits)


@dataclass(frozen=True)
class _GridParts:
    """A grid's uniform and global options, their columns, and per context length the uniform
    options' bytes and budgets (memoised per policy: the same few lengths come back)."""

    uniform: list[int]
    glob: list[int]
    uniform_grid: tuple
    global_grid: tuple
    share_features: tuple[str, ...]
    column: dict[int, int]  # grid index of a global option -> its column among the global ones
    uniform_bytes: dict[tuple[int, int, int, bool], list[int]]  # (held tokens, head_dim, dtype bytes, sliding)
    budgets: dict[tuple[int, int], tuple]

    @classmethod
    def of(cls, grid) -> "_GridParts":
        """Split `grid`."""
        uniform = [i for i, o in enumerate(grid) if o.allocation == "uniform"]
        glob = [i for i, o in enumerate(grid) if o.allocation == "global"]
        return cls(uniform, glob, tuple(grid[c] for c in uniform), tuple(grid[c] for c in glob),
                   tuple(grid[c].share_feature for c in glob), {c: i for i, c in enumerate(glob)}, {}, {})


@functools.lru_cache(maxsize=64)
def _feature_index(have: tuple[str, ...], want: tuple[str, ...]) -> torch.Tensor:
    """Positions of the controller's features among the statistics' features."""
    return torch.tensor([have.index(f) for f in want])


RECONSTRUCTION_SOURCES = ("exact", "predicted")


def default_reconstruction(config: ControllerConfig) -> str:
    """The reconstruction source a controller reads unless told: its notes' `reconstruction` (training
    writes the source it trained on), else "exact"."""
    source = config.notes.get("reconstruction", "exact")
    if source not in RECONSTRUCTION_SOURCES:
        raise ValueError(f"controller notes.reconstruction must be one of {RECONSTRUCTION_SOURCES}, got {source!r}")
    return source


def _predicted_twins(names: tuple[str, ...]) -> tuple[str, ...]:
    """Each exact reconstruction feature's predicted twin (other names unchanged)."""
    return tuple(PREDICTED_TWIN.get(name, name) for name in names)


def _reads_predicted(layout: Layout, feature_names: tuple[str, ...]) -> bool:
    """Whether a controller's features or scorer come from a reconstruction predictor."""
    return layout.scorer == PREDICTED_SCORER or any(f in PREDICTED_FEATURES for f in feature_names)


# The controller trained for the embedded model ships with the package (a few kB).
SHIPPED = Path(__file__).resolve().parent / "controller" / "shipped" / "smollm2-135m"


@register("learned")
@dataclass(frozen=True)
class Learned(Policy):
    """The adaptive-kv controller: per (layer, KV head) keep and key/value bits for this request.

    A small network (`ControllerNet`) reads each head's AttentionStats features and predicts the
    distortion of the head's attention output under every option of its grid (keep fraction x
    bits); the allocator picks one option per head minimising the layer-weighted predicted
    distortion within the byte budget (multiple-choice knapsack). `path` is a controller folder
    (default: the one shipped for the embedded model); the cache layout (sinks, window, group,
    scorer, selection) is the one the controller was trained with, so the layout fields of this
    policy are ignored.
    """

    path: str | None = None
    # where the reconstruction scores and features come from: "exact" (the second pass), "predicted"
    # (the predictor in `scorer_path`, default the controller's folder: no second pass), or "auto":
    # the controller's own default (`controller.json` notes; exact when they say nothing)
    reconstruction: str = "auto"
    scorer_path: str | None = None
    config: ControllerConfig = field(init=False, repr=False, compare=False)
    net: ControllerNet = field(init=False, repr=False, compare=False)
    predictor: ReconstructionPredictor | None = field(init=False, repr=False, compare=False, default=None)
    # the model check the cache runs (`StatsConfig.trained_for`): the controller's files name their model
    trained_for: tuple[TrainedFor, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reconstruction not in ("auto", *RECONSTRUCTION_SOURCES):
            raise ValueError(f"reconstruction must be one of {('auto', *RECONSTRUCTION_SOURCES)}, got {self.reconstruction!r}")
        folder = Path(self.path) if self.path is not None else SHIPPED
        config, net = load_controller(folder)
        if self.reconstruction == "auto":
            object.__setattr__(self, "reconstruction", default_reconstruction(config))
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "trained_for", (config.trained_for(f"controller {folder}"),))
        if _reads_predicted(self._layout, self.feature_names):
            scorer = Path(self.scorer_path) if self.scorer_path is not None else folder
            if not has_predictor(scorer):
                raise ValueError(f"scorer_path {scorer} holds no reconstruction predictor ({SCORER_JSON}); "
                                 "fit one with `adaptive-kv train-scorer`")
            object.__setattr__(self, "predictor", load_predictor(scorer))
        warm_up()

    @classmethod
    def from_parts(cls, config: ControllerConfig, net: ControllerNet) -> "Learned":
        """A policy over an in-memory controller (training and tests), with no files read. It reads
        reconstruction features by their exact names, as training presents them (`capture_reading`)."""
        policy = object.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                object.__setattr__(policy, f.name, f.default)
        object.__setattr__(policy, "reconstruction", "exact")
        object.__setattr__(policy, "config", config)
        object.__setattr__(policy, "net", net.eval())
        warm_up()
        return policy

    def layout(self, **overrides: Any) -> Layout:
        """The layout the controller was trained with (its scorer predicted where `reconstruction` says so)."""
        layout = self.config.layout
        if self.reconstruction == "predicted" and layout.scorer == "reconstruction":
            layout = dataclasses.replace(layout, scorer=PREDICTED_SCORER)
        return dataclasses.replace(layout, **overrides)

    @functools.cached_property
    def feature_names(self) -> tuple[str, ...]:
        """The statistics' features the controller reads, in its order."""
        names = tuple(self.config.feature_names)
        return _predicted_twins(names) if self.reconstruction == "predicted" else names

    def stats_config(self) -> StatsConfig:
        """Exact reconstruction is read when the controller's scorer or features use it, the predictor
        runs when they use predicted scores."""
        layout = self._layout
        recon = layout.scorer == "reconstruction" or any(f in RECONSTRUCTION_FEATURES for f in self.feature_names)
        return StatsConfig(sink_tokens=layout.sink_tokens, group_size=layout.group_size, reconstruction=recon,
                           predictor=self.predictor, trained_for=self.trained_for)

    def check_model(self, config) -> None:
        """Raise ValueError naming both models unless the controller (and its scorer) were trained for the model
        of `config`; every cache built from `stats_config()` runs this check itself."""
        for files in self.trained_for:
            files.check_model(config)
        if self.predictor is not None:
            self.predictor.check_model(config)

    def predict(self, stats: AttentionStats, first_layer: int = 0) -> torch.Tensor:
        """Predicted log-distortion (L, H, O) of every option for every head (layers from `first_layer`)."""
        shape = self.config.model_shape
        layers_ok = stats.num_layers == shape["num_layers"] or (stats.num_layers == 1 and first_layer < shape["num_layers"])
        if not layers_ok or stats.num_kv_heads != shape["num_kv_heads"]:
            raise ValueError(
                f"controller was trained for {shape['num_layers']} layers x {shape['num_kv_heads']} KV heads, "
                f"the statistics have {stats.num_layers} x {stats.num_kv_heads}"
            )
        missing = [f for f in self.feature_names if f not in stats.feature_names]
        if missing:
            raise ValueError(f"statistics lack the controller's features {missing}; build the cache with policy.stats_config()")
        idx = _feature_index(tuple(stats.feature_names), self.feature_names)
        features = stats.features[..., idx].float().reshape(-1, len(idx))
        first = first_layer * stats.num_kv_heads  # head identities: layer * H + head
        with torch.inference_mode():
            pred = self._folded(features, first)
        return pred.view(stats.num_layers, stats.num_kv_heads, -1)

    def plan(self, stats: AttentionStats, budget: float) -> Plan:
        """One option per head: least weighted predicted distortion within `budget` x the full cache's bytes.

        One knapsack over every head of every layer, each read at its own layer's index. A sliding-window
        layer holds only its window (`AttentionStats.layer_tokens`), so, as for every policy, its full
        bytes count only those tokens, its options are fractions of them and their bytes include the
        positions it stores; the plan carries the model's windows (`stats.windows`).

        A request outside the lengths and budgets the controller was trained on (`trained_range`) is
        planned by kvzip's global allocation of the same reconstruction scores instead, and the plan's
        note says why."""
        extrapolated = None if self.predictor is None else self.predictor.extrapolated(stats.seq_len)
        reason = None if self._trained_range is None else self._trained_range.outside(stats.seq_len, budget)
        if reason is not None:
            try:
                plan = self._fallback.plan(stats, budget)
            except InfeasibleBudget:  # kvzip's floor is higher on sliding layers: the controller still plans
                plan, how = self._decide(stats, 0, budget), "kvzip's allocation cannot reach it, so the controller planned"
            else:
                how = "planned by kvzip's global allocation of the same scores"
            return dataclasses.replace(plan, note=f"{reason}; {how}").noted(extrapolated)
        return self._decide(stats, 0, budget).noted(extrapolated)

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """One option per head: least weighted predicted distortion within the budget."""
        return self._decide(stats, 0, budget)

    def plan_layer(self, stats: AttentionStats, layer_idx: int, num_layers: int, budget: float) -> Plan:
        """The knapsack within one layer, at `budget` x that layer's bytes (bounded prefill)."""
        check_layer(stats, layer_idx, num_layers)
        return self._decide(stats, layer_idx, budget)

    def option_tables(self, stats: AttentionStats, first_layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The knapsack's input: weighted predicted distortion and bytes (N, O) of every head's options,
        and the global options' keeps (N, G) (None without global options). Head n is layer n // H of the
        statistics (the model's layer `first_layer` + n // H); a sliding layer's options are priced over
        the tokens it holds."""
        head_dim, dtype_bytes = stats.head_dim, stats.dtype_bytes
        if head_dim != self.config.model_shape["head_dim"]:
            raise ValueError(f"controller was trained for head_dim {self.config.model_shape['head_dim']}, got {head_dim}")
        layout = self._layout
        weights = self._layer_weights[first_layer : first_layer + stats.num_layers]
        cost = np.exp(self.predict(stats, first_layer).double().numpy()) * weights[:, None, None]  # (L, H, O)
        grid, floor = self.config.grid, layout.floor
        parts = self._grid_parts
        num_layers, heads = stats.num_layers, stats.num_kv_heads
        nbytes = np.empty((num_layers, heads, len(grid)), dtype=np.float64)
        groups = _held_groups(stats)
        uniform = np.empty((num_layers, 1, len(parts.uniform)), dtype=np.float64)  # per layer, every head alike
        for (held, sliding), layers in groups.items():
            memo = (held, head_dim, dtype_bytes, sliding)
            if memo not in parts.uniform_bytes:  # the same few context lengths come back on every request
                if len(parts.uniform_bytes) >= MEMO_LENGTHS:  # a server sees any length: stay bounded
                    parts.uniform_bytes.clear()
                parts.uniform_bytes[memo] = option_bytes(parts.uniform_grid, layout, held, head_dim, dtype_bytes,
                                                         sliding)
            uniform[list(layers), 0] = parts.uniform_bytes[memo]
        nbytes[:, :, parts.uniform] = uniform
        keeps = None
        if parts.glob:
            # global options: each head's keep (and so its bytes) comes from its share of the global top
            share = stats.features[..., _feature_index(tuple(stats.feature_names), parts.share_features)]
            width = len(parts.glob)
            keeps = np.empty((num_layers, heads, width), dtype=np.int64)
            glob = np.empty((num_layers, heads, width), dtype=np.float64)
            for (held, sliding), layers in groups.items():
                rows = list(layers)
                keeps[rows] = global_keeps_from_share(share[rows], held, floor).numpy()
                glob[rows] = keeps_nbytes(parts.global_grid, keeps[rows].reshape(-1, width), layout, head_dim,
                                          dtype_bytes, sliding).reshape(len(rows), heads, width)
            nbytes[:, :, parts.glob] = glob
            keeps = keeps.reshape(num_layers * heads, width)
        return cost.reshape(num_layers * heads, -1), nbytes.reshape(num_layers * heads, -1), keeps

    def _decide(self, stats: AttentionStats, first_layer: int, budget: float) -> Plan:
        check_fraction("budget", budget)
        cost, nbytes, keeps = self.option_tables(stats, first_layer)
        layout, seq_len, grid, parts = self._layout, stats.seq_len, self.config.grid, self._grid_parts
        floor, heads = layout.floor, stats.num_kv_heads
        held = [stats.layer_tokens(l) for l in range(stats.num_layers)]
        # a DynamicCache's bytes: keys and values of every head and token its layer holds
        full = 2 * heads * sum(held) * stats.head_dim * stats.dtype_bytes
        try:
            choice = allocate(cost, nbytes, budget * full).tolist()
        except ValueError:
            minimum = nbytes.min(-1).sum() / full
            raise InfeasibleBudget(budget, minimum, seq_len, "every head at its smallest option") from None
        rows = []
        for l, tokens in enumerate(held):
            if (tokens, floor) not in parts.budgets:
                if len(parts.budgets) >= MEMO_LENGTHS:
                    parts.budgets.clear()
                parts.budgets[(tokens, floor)] = _option_budgets(grid, tokens, floor)
            options = parts.budgets[(tokens, floor)]  # None for global options
            row = [options[c] for c in choice[l * heads : (l + 1) * heads]]
            for h, c in enumerate(choice[l * heads : (l + 1) * heads]):
                if row[h] is None:
                    n = l * heads + h
                    row[h] = _head_budget(int(keeps[n, parts.column[c]]), grid[c].key_bits, grid[c].value_bits, tokens)
            rows.append(tuple(row))
        return Plan(tuple(rows), **layout.keywords(), windows=stats.windows)

    @functools.cached_property
    def _folded(self) -> FoldedNet:
        """The network in its folded inference form (computed once; the weights never change after loading)."""
        return self.net.folded()

    @functools.cached_property
    def _layout(self) -> Layout:
        """`layout()` built once: both halves of a decision read it."""
        return self.layout()

    def weights_digest(self) -> str:
        """sha256 of the controller's config and weights and of the predictor it reads, if any."""
        described = {"config": self.config.to_json(), "reconstruction": self.reconstruction}
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
        tensors = dict(self.net.state_dict())
        if self.predictor is not None:
            digest.update(self.predictor.digest.encode())
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @functools.cached_property
    def _trained_range(self) -> TrainedRange | None:
        """The lengths and budgets the controller was trained on (None: its files predate the record)."""
        return TrainedRange.from_notes(self.config.notes)

    @functools.cached_property
    def _fallback(self) -> KVzip:
        """kvzip over the scores this controller reads, in its layout: the plan outside its range."""
        layout = self._layout
        return KVzip(sink_tokens=layout.sink_tokens, recent_window=layout.recent_window, group_size=layout.group_size,
                     selection=layout.selection, scorer=layout.scorer)

    @functools.cached_property
    def _layer_weights(self) -> np.ndarray:
        """The controller's per-layer distortion weights as an array."""
        return np.asarray(self.config.layer_weights, dtype=np.float64)

    @functools.cached_property
    def _grid_parts(self) -> "_GridParts":
        """The grid split once into uniform and global options (hashing 45 options per call costs)."""
        parts = _GridParts.of(self.config.grid)
        if self.reconstruction == "predicted":
            parts = dataclasses.replace(parts, share_features=_predicted_twins(parts.share_features))
        return parts
