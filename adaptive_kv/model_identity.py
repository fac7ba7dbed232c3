"""Which model a learned file (controller, reconstruction scorer) was trained for, and the check that refuses
it on another one.

A controller's predictions and a scorer's weights are fitted to one model's attention: on another model
they would run whenever the tensor shapes happen to agree (two tiny models of different families, a
Llama and a Qwen of one size) and plan silently wrong. So each file records its `ModelIdentity` and every
cache built for a policy that reads it checks the model it runs on (`StatsConfig.trained_for`).

The identity's `fingerprint` hashes the config fields that make a model's attention what it is, from a
fixed list (family, depth, widths, heads, vocabulary, each layer's window), not the whole config: a
transformers upgrade adds and renames config fields, and a fine-tune or a copy in another folder keeps
these, so neither should orphan a trained controller. The name is what the user called the model, for
messages only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

FINGERPRINT_CHARS = 16
SHAPE_FIELDS = ("num_layers", "num_kv_heads", "head_dim")


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def head_dim_of(config: Any) -> int:
    """The attention head size: `head_dim` when the config sets it, else hidden size / attention heads."""
    text = text_config(config)
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def _architecture(config: Any) -> dict[str, Any]:
    """The fields the fingerprint hashes (see the module docstring for why these)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = text_config(config)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    return {
        "model_type": str(getattr(text, "model_type", "")),
        "num_hidden_layers": int(text.num_hidden_layers),
        "num_attention_heads": int(text.num_attention_heads),
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        "head_dim": head_dim_of(text),
        "hidden_size": int(text.hidden_size),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "layers": [[kind, kwargs.get("sliding_window")] for kind, kwargs in zip(layer_types, layer_kwargs)],
    }


@dataclass(frozen=True)
class ModelIdentity:
    """The model a file was trained for: its name, family, KV shape and config fingerprint."""

    name: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    def __post_init__(self) -> None:
        for key in ("name", "model_type", "fingerprint"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"base_model.{key} must be a string, got {getattr(self, key)!r}")
        for key in SHAPE_FIELDS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"base_model.{key} must be a positive integer, got {value!r}")
        if len(self.fingerprint) != FINGERPRINT_CHARS or any(c not in "0123456789abcdef" for c in self.fingerprint):
            raise ValueError(f"base_model.fingerprint must be {FINGERPRINT_CHARS} hex digits, got {self.fingerprint!r}")

    @classmethod
    def of(cls, config: Any, name: str | None = None) -> "ModelIdentity":
        """The identity of a transformers config; `name` defaults to the folder it was loaded from."""
        arch = _architecture(config)
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_CHARS]
        label = name if name is not None else str(getattr(config, "name_or_path", "") or "")
        return cls(label, arch["model_type"], arch["num_hidden_layers"], arch["num_key_value_heads"], arch["head_dim"],
                   digest)

    @property
    def shape(self) -> dict[str, int]:
        """num_layers, num_kv_heads, head_dim (a controller's `model_shape`)."""
        return {key: getattr(self, key) for key in SHAPE_FIELDS}

    def same_model(self, other: "ModelIdentity") -> bool:
        """Whether both name one architecture (the names may differ: a copy, a fine-tune)."""
        return self.fingerprint == other.fingerprint

    def describe(self) -> str:
        """One line for messages: name, family, shape and fingerprint."""
        return (f"{self.name or '(unnamed model)'!r} ({self.model_type}, {self.num_layers} layers x "
                f"{self.num_kv_heads} KV heads x head_dim {self.head_dim}, config {self.fingerprint})")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "ModelIdentity":
        """Inverse of `to_json`; missing or unknown fields are refused by name."""
        if not isinstance(data, dict):
            raise ValueError(f"base_model must be an object, got {type(data).__name__}")
        fields = set(cls.__dataclass_fields__)
        if set(data) != fields:
            raise ValueError(f"base_model must have exactly the fields {sorted(fields)}: missing "
                             f"{sorted(fields - set(data))}, unknown {sorted(set(data) - fields)}")
        return cls(**data)


def check_trained_for(what: str, trained_for: ModelIdentity, config: Any) -> None:
    """Raise ValueError naming both models unless `trained_for` is the model of `config`."""
    model = ModelIdentity.of(config)
    if not trained_for.same_model(model):
        raise ValueError(f"{what} was trained for {trained_for.describe()}; this model is {model.describe()}. "
                         f"Train one for this model (adaptive-kv train --model {model.name or 'FOLDER'})")


def check_shape(what: str, trained_for: str, shape: dict[str, int], config: Any) -> None:
    """For files that record no identity (written before it was recorded): raise ValueError naming both models
    unless `config`'s layers, KV heads and head size are `shape`'s."""
    model = ModelIdentity.of(config)
    if {key: shape.get(key) for key in SHAPE_FIELDS} != model.shape:
        theirs = " x ".join(f"{shape.get(key)} {key}" for key in SHAPE_FIELDS)
        raise ValueError(f"{what} was trained for {trained_for or '(unnamed model)'!r} ({theirs}); this model is "
                         f"{model.describe()}. Train one for this model (adaptive-kv train --model "
                         f"{model.name or 'FOLDER'})")


@dataclass(frozen=True)
class TrainedFor:
    """A file a policy plans from and the model it was trained for (`StatsConfig.trained_for`): the cache
    checks it against the model it is built on, so every path (generate, plan, eval, the service) refuses
    a file trained for another model before anything is planned. Files that record no identity (older
    ones) are held to their recorded shape only."""

    what: str  # e.g. "controller /path/to/folder"
    base_model: ModelIdentity | None
    model_name: str = ""  # the recorded name, for files with no identity
    shape: tuple[tuple[str, int], ...] = ()  # the recorded (field, value) shape, for files with no identity

    def check_model(self, config: Any) -> None:
        """Raise ValueError naming both models unless the file was trained for the model of `config`."""
        if self.base_model is not None:
            check_trained_for(self.what, self.base_model, config)
        elif self.shape:
            check_shape(self.what, self.model_name, dict(self.shape), config)
