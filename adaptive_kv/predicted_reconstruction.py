"""Reconstruction scores predicted inside the prefill (after KVzap, arXiv:2601.07891).

The exact reconstruction scores (`adaptive_kv.reconstruction`) cost a second pass over the
context. A `ReconstructionPredictor` is a small per-layer model (linear, or a two-layer MLP) that
reads what the prefill computes anyway, the hidden states entering each layer's attention, and
predicts every (KV head, token)'s log reconstruction score. It runs inside the prefill, one layer
at a time, so it also works under bounded per-layer prefill.

Besides the hidden state a predictor may read where the token sits in the context
(`POSITION_FEATURES`): how much a reconstruction query attends to a token depends on its place
(near the start, near the end, its share of the way through), which the hidden state carries
poorly; on SmolLM2 they raise the held-out within-head Spearman correlation of a scorer fitted on
1k-4k contexts from 0.70 / 0.70 / 0.62 to 0.82 / 0.82 / 0.88 at 1k / 2k / 4k tokens.

Files: `scorer.json` (kind, shape, the position features it reads, the model it was fitted for,
the context lengths it was fitted on, fit metrics) and `scorer.safetensors` (the weights), checked
against each other and against the model before use. A request much longer or shorter than the
fitted contexts still gets scores, and the plans made from them say they are extrapolated
(`FittedLengths.outside`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptive_kv.model_identity import ModelIdentity, check_trained_for

PREDICTED_SCORER = "predicted_reconstruction"
KINDS = ("linear", "mlp")
SCORER_JSON = "scorer.json"
SCORER_WEIGHTS = "scorer.safetensors"
MAX_JSON_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 256 << 20
MAX_WIDTH = 4096
FORMAT_VERSION = 2
READS_FORMATS = (1, 2)  # format 1: hidden states only, no position_features field
# Where a token sits in a context of T tokens (t = 0..T-1), as the predictor reads it: its share
# of the way through, logs of its distance from the start and from the end, the share squared,
# two decays that single out the first and last NEAR_TOKENS tokens, and log T (the scores' scale
# falls with length; only the global ranking across heads reads it).
POSITION_FEATURES = ("relative", "log_position", "log_distance", "relative_squared", "near_end", "near_start",
                     "log_length")
NEAR_TOKENS = 64.0
# the exact scores are attention probabilities; below this they all mean "never looked at"
LOG_FLOOR = math.log(1e-6)
# How far past the fitted context lengths (each way) predicted scores are taken as they are. The
# scorer shipped for SmolLM2 (fitted on 1k-4k contexts) ranks held-out tokens with Spearman 0.82 at
# 1k and 2k, 0.88 at 4k and 0.63 at 8k: it degrades outside its data.
LENGTH_REACH = 1.1


@dataclass(frozen=True)
class FittedLengths:
    """The shortest and longest context (tokens) a scorer was fitted and checked on."""

    min_length: int
    max_length: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"scorer fitted_lengths must satisfy 1 <= min_length <= max_length, "
                             f"got {self.min_length}, {self.max_length}")

    @classmethod
    def of(cls, lengths: list[int]) -> "FittedLengths":
        """The span of the fitting contexts' lengths."""
        if not lengths:
            raise ValueError("scorer fitted_lengths needs at least one context length")
        return cls(min(lengths), max(lengths))

    @classmethod
    def from_json(cls, data: Any) -> "FittedLengths":
        """Read `to_json`'s object; ValueError naming the field otherwise."""
        if not isinstance(data, dict) or set(data) != {"min_length", "max_length"}:
            raise ValueError(f"scorer fitted_lengths must be an object with min_length and max_length, got {data!r}")
        try:
            return cls(int(data["min_length"]), int(data["max_length"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"scorer fitted_lengths must hold integers: {err}") from None

    def to_json(self) -> dict[str, int]:
        """The JSON object `from_json` reads."""
        return {"min_length": self.min_length, "max_length": self.max_length}

    def outside(self, seq_len: int) -> str | None:
        """Why scores for a `seq_len`-token context are extrapolated; None within reach of the fitted lengths."""
        low, high = self.min_length / LENGTH_REACH, self.max_length * LENGTH_REACH
        if low <= seq_len <= high:
            return None
        return (f"predicted scores extrapolated: {seq_len} tokens is outside the {self.min_length}-{self.max_length}"
                f" tokens the reconstruction scorer was fitted on")


def checked_position_features(names, field: str = "position_features") -> tuple[str, ...]:
    """`names` as a tuple, or a ValueError naming `field` unless they are distinct names of `POSITION_FEATURES`."""
    names = tuple(names)
    if len(set(names)) != len(names) or not set(names) <= set(POSITION_FEATURES):
        raise ValueError(f"{field} must be distinct names among {POSITION_FEATURES}, got {list(names)}")
    return names


def position_features(positions: torch.Tensor, seq_len: int, names: tuple[str, ...] = POSITION_FEATURES) -> torch.Tensor:
    """The features (N, len(names)) of tokens at `positions` (N,) of a `seq_len`-token context."""
    checked_position_features(names)
    t = positions.float()
    length = float(max(int(seq_len), 1))
    columns = {
        "relative": lambda: t / length,
        "log_position": lambda: torch.log1p(t),
        "log_distance": lambda: torch.log1p((length - 1.0 - t).clamp_min(0.0)),
        "relative_squared": lambda: (t / length) ** 2,
        "near_end": lambda: torch.exp(-(length - 1.0 - t).clamp_min(0.0) / NEAR_TOKENS),
        "near_start": lambda: torch.exp(-t / NEAR_TOKENS),
        "log_length": lambda: torch.full_like(t, math.log(length)),
    }
    if not names:
        return t.new_zeros(t.numel(), 0)
    return torch.stack([columns[name]() for name in names], dim=-1)


def context_positions(count: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions of the last `count` tokens of a `seq_len`-token context."""
    return torch.arange(seq_len - count, seq_len, device=device)


@dataclass(frozen=True)
class PredictorShape:
    """The model a predictor reads: its layers, KV heads and hidden size."""

    num_layers: int
    num_kv_heads: int
    hidden_size: int

    @classmethod
    def of(cls, config) -> "PredictorShape":
        """The shape of a transformers text config."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls(text.num_hidden_layers, heads, text.hidden_size)


@dataclass(eq=False)
class ReconstructionPredictor:
    """Per-layer models (hidden state, position features) -> log reconstruction score per KV head.

    The input of a token is its hidden state (hidden_size,) followed by its `position_features`
    (P, none for a hidden-only scorer), D = hidden_size + P. Inputs are standardised per layer
    (`mean`, `std` (L, D), from the fit's data). `linear`: one matrix (L, D, H) and bias (L, H);
    `mlp`: (L, D, width) -> SiLU -> (L, width, H). Compared by identity; `digest` tells two loaded
    copies of one scorer apart from two scorers.
    """

    kind: str
    shape: PredictorShape
    weights: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    # the model it was fitted for; None in files written before it was recorded (then the shape is checked)
    base_model: ModelIdentity | None = None
    # the context lengths it was fitted on; None in files written before they were recorded (nothing is said)
    fitted_lengths: FittedLengths | None = None
    position_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"scorer kind must be one of {KINDS}, got {self.kind!r}")
        self.position_features = checked_position_features(self.position_features, "scorer position_features")
        expected = self.expected_shapes()
        for name, dims in expected.items():
            if name not in self.weights:
                raise ValueError(f"scorer weights lack {name!r} (a {self.kind} scorer has {sorted(expected)})")
            if tuple(self.weights[name].shape) != dims:
                raise ValueError(f"scorer weight {name!r} has shape {tuple(self.weights[name].shape)}, expected {dims}")
        extra = sorted(set(self.weights) - set(expected))
        if extra:
            raise ValueError(f"scorer weights have unexpected tensors {extra}")
        self.weights = {k: v.float().contiguous() for k, v in self.weights.items()}
        if self.base_model is not None and (self.base_model.num_layers, self.base_model.num_kv_heads) != (
                self.shape.num_layers, self.shape.num_kv_heads):
            raise ValueError(f"scorer base_model {self.base_model.describe()} does not have the scorer's shape {self.shape}")

    @property
    def width(self) -> int:
        """The MLP's hidden width (0 for a linear scorer)."""
        return int(self.weights["w1"].shape[-1]) if self.kind == "mlp" else 0

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's shape for this kind and model shape."""
        L, H = self.shape.num_layers, self.shape.num_kv_heads
        D = self.shape.hidden_size + len(self.position_features)
        shapes = {"mean": (L, D), "std": (L, D)}
        if self.kind == "linear":
            return {**shapes, "w": (L, D, H), "b": (L, H)}
        width = int(self.weights["w1"].shape[-1]) if "w1" in self.weights else -1
        if not 1 <= width <= MAX_WIDTH:
            raise ValueError(f"mlp scorer width must be in [1, {MAX_WIDTH}], got {width}")
        return {**shapes, "w1": (L, D, width), "b1": (L, width), "w2": (L, width, H), "b2": (L, H)}

    def check_model(self, config) -> None:
        """Raise ValueError naming both models unless this predictor was fitted for the model of `config` (by its
        identity when the files record one, else by its shape)."""
        if self.base_model is not None:
            check_trained_for("reconstruction scorer", self.base_model, config)
        theirs = PredictorShape.of(config)
        if theirs != self.shape:
            raise ValueError(f"scorer was fitted for {self.shape}, the model is {theirs}")

    def log_scores(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Predicted log scores (H_kv, N) of one layer's attention inputs hidden (N, hidden_size): the
        tokens at `positions` (N,) of a `seq_len`-token context."""
        if positions.shape != hidden.shape[:1]:
            raise ValueError(f"positions must have one entry per token ({hidden.shape[0]}), got {tuple(positions.shape)}")
        w, b = self._folded(hidden.device)
        size = self.shape.hidden_size
        out = torch.addmm(b[0][layer_idx], hidden.float(), w[0][layer_idx][:size])
        if self.position_features:
            features = position_features(positions.to(hidden.device), seq_len, self.position_features)
            out = out + features @ w[0][layer_idx][size:]
        if self.kind == "mlp":
            out = torch.addmm(b[1][layer_idx], torch.nn.functional.silu(out), w[1][layer_idx])
        return out.T

    def scores(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Predicted scores (H_kv, N), on the exact scores' scale (probabilities), for global rankings."""
        return self.log_scores(layer_idx, hidden, positions, seq_len).clamp(LOG_FLOOR, 0.0).exp()

    def _folded(self, device: torch.device) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The first map with the input standardisation folded in ((x - m) / s) @ W + b = x @ (W / s) + (b - (m / s) @ W),
        and the MLP's second map, on `device`: computed once per device, as this runs for every layer of every prefill."""
        key = str(device)
        cache = self.__dict__.setdefault("_devices", {})
        if key not in cache:
            first, bias = (self.weights["w"], self.weights["b"]) if self.kind == "linear" else (self.weights["w1"], self.weights["b1"])
            inv = 1.0 / self.weights["std"]
            w1 = first * inv[..., None]
            b1 = bias - torch.einsum("ld,ldh->lh", self.weights["mean"] * inv, first)
            weights, biases = (w1,), (b1,)
            if self.kind == "mlp":
                weights, biases = (w1, self.weights["w2"]), (b1, self.weights["b2"])
            cache[key] = (tuple(t.to(device) for t in weights), tuple(t.to(device) for t in biases))
        return cache[key]

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        """The JSON half of the files."""
        return {"format": FORMAT_VERSION, "kind": self.kind, "width": self.width,
                "shape": {"num_layers": self.shape.num_layers, "num_kv_heads": self.shape.num_kv_heads,
                          "hidden_size": self.shape.hidden_size},
                "metrics": self.metrics, "position_features": list(self.position_features),
                **({"base_model": self.base_model.to_json()} if self.base_model is not None else {}),
                **({"fitted_lengths": self.fitted_lengths.to_json()} if self.fitted_lengths is not None else {})}

    def extrapolated(self, seq_len: int) -> str | None:
        """Why this scorer's scores for a `seq_len`-token context are extrapolated (None: within its lengths,
        or the files do not record them)."""
        return None if self.fitted_lengths is None else self.fitted_lengths.outside(seq_len)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the kind and the weights: equal for two files holding the same scorer."""
        sha = hashlib.sha256(self.kind.encode())
        if self.position_features:  # a hidden-only scorer keeps the digest it had before positions were read
            sha.update(("positions:" + ",".join(self.position_features)).encode())
        for name in sorted(self.weights):
            data = self.weights[name].detach().cpu().contiguous().reshape(-1)
            sha.update(f"{name}:{data.dtype}:{tuple(self.weights[name].shape)}".encode())
            sha.update(data.view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()

    def save(self, folder: str | Path) -> Path:
        """Write scorer.json and scorer.safetensors into `folder` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.weights, str(folder / SCORER_WEIGHTS))
        (folder / SCORER_JSON).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))
        return folder


def has_predictor(folder: str | Path) -> bool:
    """Whether `folder` holds a scorer's files."""
    return (Path(folder) / SCORER_JSON).is_file()


def load_predictor(folder: str | Path) -> ReconstructionPredictor:
    """The predictor in `folder`, loaded once per file version (same files, same object)."""
    folder = Path(folder).resolve()
    json_path, weights_path = folder / SCORER_JSON, folder / SCORER_WEIGHTS
    for path in (json_path, weights_path):
        if not path.is_file():
            raise ValueError(f"scorer folder {folder} lacks {path.name}")
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (json_path, weights_path))
    return _load(str(folder), stamp)


@functools.lru_cache(maxsize=16)
def _load(folder: str, stamp: tuple) -> ReconstructionPredictor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, weights_path = Path(folder) / SCORER_JSON, Path(folder) / SCORER_WEIGHTS
    for path, limit in ((json_path, MAX_JSON_BYTES), (weights_path, MAX_WEIGHTS_BYTES)):
        if path.stat().st_size > limit:
            raise ValueError(f"{path} is {path.stat().st_size} bytes, over the {limit}-byte limit for a scorer file")
    try:
        meta = json.loads(json_path.read_text())
        shape = PredictorShape(**{k: int(meta["shape"][k]) for k in ("num_layers", "num_kv_heads", "hidden_size")})
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{json_path} is not a scorer description (kind, shape): {err}") from None
    if meta.get("format") not in READS_FORMATS:
        raise ValueError(f"{json_path} has format {meta.get('format')!r}; this version reads formats {READS_FORMATS}")
    features = meta.get("position_features", [])
    if not isinstance(features, list) or not all(isinstance(name, str) for name in features):
        raise ValueError(f"{json_path}: position_features must be a list of names among {POSITION_FEATURES}, "
                         f"got {features!r}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is not a safetensors file: {err}") from None
    base_model = ModelIdentity.from_json(meta["base_model"]) if meta.get("base_model") is not None else None
    try:
        fitted = FittedLengths.from_json(meta["fitted_lengths"]) if meta.get("fitted_lengths") is not None else None
    except ValueError as err:
        raise ValueError(f"{json_path}: {err}") from None
    predictor = ReconstructionPredictor(kind, shape, weights, meta.get("metrics", {}), base_model, fitted, tuple(features))
    if predictor.width != int(meta.get("width", 0)):
        raise ValueError(f"{json_path} says width {meta.get('width')}, the weights have {predictor.width}")
    return predictor
