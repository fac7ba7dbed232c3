"""The one place that touches transformers' attention internals.

`prepare_model` registers our attention function under the name ``adaptive_kv`` through
transformers' AttentionInterface (with SDPA's mask builder) and selects it on the model. The
function is plain SDPA for every cache but ours, so a prepared model behaves exactly as before
with DynamicCache; with a CompressedCache it reads prefill statistics and decodes over the
packed store.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from adaptive_kv.step import CacheStep

ATTENTION_NAME = "adaptive_kv"


def adaptive_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA, except for a compressed layer's step, which its cache computes itself."""
    recorder = kwargs.pop("kv_recorder", None)  # training labels read the queries that follow a context
    reconstruction = kwargs.pop("kv_reconstruction", None)
    if reconstruction is not None:  # the context-reconstruction pass (adaptive_kv.reconstruction)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return reconstruction.attend(module.layer_idx, query, key, value, scaling), None
    if not isinstance(key, CacheStep):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if key.is_compressed:
        if recorder is not None:
            recorder(key.layer_idx, query, key.key_states, key.value_states, scaling)
        return key.attend(query, scaling), None
    # prefill: exact SDPA over the full-precision states, then read the statistics
    out, _ = sdpa_attention_forward(module, query, key.key_states, key.value_states, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    key.observe(query, scaling)
    return out, None


def register() -> None:
    """Register the attention function and its mask builder under ATTENTION_NAME (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, adaptive_kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _hand_attention_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module: give its input hidden states to a cache that reads them
    (a CompressedCache whose predictor scores tokens inside the prefill); any other cache: nothing."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    read = getattr(cache, "read_attention_input", None)
    if read is not None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        read(module.layer_idx, hidden)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules (those transformers gives a `layer_idx`), in layer order."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


def prepare_model(model: torch.nn.Module) -> PreTrainedConfig:
    """Select the adaptive_kv attention on `model` (idempotent) and return its text config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError("model must be a transformers causal LM with a config (num_hidden_layers, num_attention_heads)")
    register()
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    if not getattr(model, "_adaptive_kv_hooked", False):
        for module in attention_modules(model):
            module.register_forward_pre_hook(_hand_attention_input, with_kwargs=True)
        model._adaptive_kv_hooked = True
    return config
