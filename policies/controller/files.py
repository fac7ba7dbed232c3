"""Controller files: safetensors weights + a JSON config. Never pickle: loading runs no code.

`controller.json` holds the format version, the model shape it was trained for, the feature names,
the option grid, the cache layout, the layer weights and the network size; `controller.safetensors`
holds the weights (with the feature normalisation as buffers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptive_kv.plan import Layout
from adaptive_kv.policies.controller.net import ControllerNet
from adaptive_kv.policies.controller.options import HeadOption, grid_from_json, grid_to_json

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "controller.json", "controller.safetensors"


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

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if not isinstance(self.model_shape.get(key), int) or self.model_shape[key] < 1:
                raise ValueError(f"model_shape.{key} must be a positive integer, got {self.model_shape.get(key)!r}")
        if len(self.layer_weights) != self.model_shape["num_layers"]:
            raise ValueError(f"layer_weights must have {self.model_shape['num_layers']} entries, got {len(self.layer_weights)}")
        needed = sorted({o.share_feature for o in self.grid if o.allocation == "global"} - set(self.feature_names))
        if needed:
            raise ValueError(f"the grid's global options read features {needed}, missing from feature_names")
        if not isinstance(self.layout, Layout):
            raise ValueError(f"layout must be an adaptive_kv.plan.Layout, got {type(self.layout).__name__}")

    def build(self) -> ControllerNet:
        """A network of this shape (random weights)."""
        heads = self.model_shape["num_layers"] * self.model_shape["num_kv_heads"]
        return ControllerNet(len(self.feature_names), heads, len(self.grid), self.hidden, self.layers, self.embedding)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["grid"] = grid_to_json(self.grid)
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

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"controller file missing: {path}")
    try:
        config = ControllerConfig.from_json(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"corrupt controller config {config_path}: {exc}") from None
    net = config.build()
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"corrupt controller weights {weights_path}: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(f"controller weights {weights_path} do not match its config: expected {expected}, got {got}")
    net.load_state_dict(state)
    return config, net.eval()
