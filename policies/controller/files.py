"""Controller files: safetensors weights + a JSON config. Never pickle: loading runs no code.

`controller.json` holds the format version, the model it was trained for (`base_model`: name, family,
shape, config fingerprint; files written before it was recorded have only the shape), the feature
names, the option grid, the cache layout, the layer weights and the network size;
`controller.safetensors` holds the weights (with the feature normalisation as buffers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptive_kv.model_identity import ModelIdentity, TrainedFor
from adaptive_kv.plan import Layout
from adaptive_kv.policies.controller.net import ControllerNet
from adaptive_kv.policies.controller.options import HeadOption, grid_from_json, grid_to_json

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "controller.json", "controller.safetensors"
# every size a file may declare, bounded before anything is built from it: (low, high) inclusive
SIZE_BOUNDS = {"hidden": (1, 1024), "layers": (1, 16), "embedding": (1, 256)}
SHAPE_BOUNDS = {"num_layers": (1, 1024), "num_kv_heads": (1, 1024), "head_dim": (1, 4096)}
MAX_FEATURES, MAX_OPTIONS = 256, 1024
MAX_CONFIG_BYTES, MAX_WEIGHTS_BYTES = 1 << 20, 64 << 20


@dataclass(frozen=True)
class ControllerConfig:
    """Everything needed to rebuild and use a controller, besides its weights."""

    model_shape: dict[str, int]  # num_layers, num_kv_heads, head_dim
    feature_names: tuple[str, ...]
    grid: tuple[HeadOption, ...]
    layout: Layout
    layer_weights: tuple[float, ...]
    hidden: int = 64
    layers: int = 2
    embedding: int = 8
    model_name: str = ""
    version: int = FORMAT_VERSION
    notes: dict[str, Any] = field(default_factory=dict)
    # the model it was trained for; None in files written before it was recorded (then only the shape is checked)
    base_model: ModelIdentity | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_shape, dict):
            raise ValueError(f"model_shape must be an object, got {type(self.model_shape).__name__}")
        for key, (low, high) in SHAPE_BOUNDS.items():
            value = self.model_shape.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"model_shape.{key} must be an integer in [{low}, {high}], got {value!r}")
        for key, (low, high) in SIZE_BOUNDS.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{key} must be an integer in [{low}, {high}], got {value!r}")
        if not 1 <= len(self.feature_names) <= MAX_FEATURES or not all(isinstance(f, str) for f in self.feature_names):
            raise ValueError(f"feature_names must be 1 to {MAX_FEATURES} names, got {len(self.feature_names)} entries")
        if not 1 <= len(self.grid) <= MAX_OPTIONS:
            raise ValueError(f"grid must have 1 to {MAX_OPTIONS} options, got {len(self.grid)}")
        if len(self.layer_weights) != self.model_shape["num_layers"]:
            raise ValueError(f"layer_weights must have {self.model_shape['num_layers']} entries, got {len(self.layer_weights)}")
        needed = sorted({o.share_feature for o in self.grid if o.allocation == "global"} - set(self.feature_names))
        if needed:
            raise ValueError(f"the grid's global options read features {needed}, missing from feature_names")
        if not isinstance(self.layout, Layout):
            raise ValueError(f"layout must be an adaptive_kv.plan.Layout, got {type(self.layout).__name__}")
        if self.base_model is not None:
            if not isinstance(self.base_model, ModelIdentity):
                raise ValueError(f"base_model must be a ModelIdentity, got {type(self.base_model).__name__}")
            if self.base_model.shape != {key: self.model_shape[key] for key in SHAPE_BOUNDS}:
                raise ValueError(f"base_model {self.base_model.describe()} does not have model_shape {self.model_shape}")

    def trained_for(self, what: str) -> TrainedFor:
        """The model check of this controller (`StatsConfig.trained_for`); `what` names it in messages."""
        return TrainedFor(what, self.base_model, self.model_name, tuple(sorted(self.model_shape.items())))

    def build(self) -> ControllerNet:
        """A network of this shape (random weights)."""
        heads = self.model_shape["num_layers"] * self.model_shape["num_kv_heads"]
        return ControllerNet(len(self.feature_names), heads, len(self.grid), self.hidden, self.layers, self.embedding)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["grid"] = grid_to_json(self.grid)
        if self.base_model is None:  # files stay readable by versions that do not know the field
            del data["base_model"]
        data["feature_names"], data["layer_weights"] = list(self.feature_names), list(self.layer_weights)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "ControllerConfig":
        """Inverse of `to_json`; unknown versions and fields are refused."""
        if not isinstance(data, dict):
            raise ValueError("controller config must be a JSON object")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"controller format version {data.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown controller config fields {unknown}")
        data = dict(data)
        data["grid"] = grid_from_json(data.get("grid"))
        if not isinstance(data.get("layout"), dict):
            raise ValueError("controller config layout must be an object of Layout fields")
        data["layout"] = Layout(**data["layout"])
        data["feature_names"] = tuple(data.get("feature_names", ()))
        data["layer_weights"] = tuple(float(w) for w in data.get("layer_weights", ()))
        if data.get("base_model") is not None:
            data["base_model"] = ModelIdentity.from_json(data["base_model"])
        return cls(**data)


def save_controller(folder: str | Path, config: ControllerConfig, net: ControllerNet) -> Path:
    """Write controller.json + controller.safetensors into `folder`; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=1))
    return folder


def load_controller(folder: str | Path) -> tuple[ControllerConfig, ControllerNet]:
    """Read a controller folder; a missing, corrupt or mismatched file raises ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from safetensors import safe_open

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path, limit in ((config_path, MAX_CONFIG_BYTES), (weights_path, MAX_WEIGHTS_BYTES)):
        if not path.is_file():
            raise ValueError(f"controller file missing: {path}")
        if path.stat().st_size > limit:
            raise ValueError(f"{path} is {path.stat().st_size} bytes, over the {limit}-byte limit for a controller file")
    try:
        config = ControllerConfig.from_json(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"corrupt controller config {config_path}: {exc}") from None
    expected = expected_shapes(config)
    try:  # the header first: nothing is built or read in full for weights that cannot fit the config
        with safe_open(str(weights_path), framework="pt") as handle:
            got = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"corrupt controller weights {weights_path}: {exc}") from None
    if expected != got:
        raise ValueError(f"controller weights {weights_path} do not match its config: expected {expected}, got {got}")
    net = config.build()
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"corrupt controller weights {weights_path}: {exc}") from None
    net.load_state_dict(state)
    return config, net.eval()


def expected_shapes(config: ControllerConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a controller of `config`'s sizes holds (`ControllerNet`), without building it."""
    heads = config.model_shape["num_layers"] * config.model_shape["num_kv_heads"]
    features, options = len(config.feature_names), len(config.grid)
    shapes = {"head_embedding.weight": (heads, config.embedding), "feature_mean": (features,), "feature_std": (features,)}
    width = features + config.embedding
    for i in range(config.layers):
        shapes[f"mlp.{2 * i}.weight"], shapes[f"mlp.{2 * i}.bias"] = (config.hidden, width), (config.hidden,)
        width = config.hidden
    shapes[f"mlp.{2 * config.layers}.weight"], shapes[f"mlp.{2 * config.layers}.bias"] = (options, width), (options,)
    return shapes
