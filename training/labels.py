"""Labels: per (layer, head, option), the distortion of the head's attention output.

One request = one capturing prefill of its context (statistics exactly as the cache reads them at
runtime) and one forward of the ids that follow it over an uncompressed fork, recording their
queries. For every option the captured prefill is forked with that option on every head (the
cache's own selection and quantisation: no second implementation); since a head's attention
output depends only on its own keys and values, each head's distortion under "only this head
compressed" is read from that one fork. Distortion = ||o' - o||^2 / ||o||^2 of the attention
outputs of the following queries (mean over the GQA group and the queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adaptive_kv.cache import CompressedCache
from adaptive_kv.kernels import get_backend
from adaptive_kv.plan import Plan
from adaptive_kv.policies.options import HeadOption
from adaptive_kv.reconstruction import ReconstructionRequest
from adaptive_kv.stats import StatsConfig
from adaptive_kv.training.calibration import CalibrationRequest


@dataclass(frozen=True)
class RequestLabels:
    """Features (L, H, F) of one request and the distortion (L, H, O) of every option."""

    key: str
    task: str
    protocol: str
    seq_len: int
    features: torch.Tensor
    feature_names: tuple[str, ...]
    distortion: torch.Tensor


def option_plan(option: HeadOption, num_layers: int, num_heads: int, seq_len: int, layout: dict[str, Any]) -> Plan:
    """The plan giving every head `option`."""
    floor = layout["sink_tokens"] + layout["recent_window"]
    budget = option.budget(seq_len, floor)
    return Plan(tuple((budget,) * num_heads for _ in range(num_layers)), **layout)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor,
           new_values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Outputs (H_kv, G, Q, D) of queries (H_q, Q, D) over context keys (H_kv, N, D) + causal new keys (H_kv, Q, D)."""
    num_kv, q_len, head_dim = new_keys.shape
    n = keys.shape[1]
    k = torch.cat([keys, new_keys], dim=1).float()  # (H_kv, N + Q, D)
    v = torch.cat([values, new_values], dim=1).float()
    q = query.float().view(num_kv, -1, q_len, head_dim)  # (H_kv, G, Q, D): GQA groups are contiguous
    logits = q @ k.transpose(1, 2).unsqueeze(1) * scaling  # (H_kv, G, Q, N + Q)
    future = torch.triu(torch.ones(q_len, q_len, dtype=torch.bool), diagonal=1)
    logits[..., n:] = logits[..., n:].masked_fill(future, float("-inf"))
    return logits.softmax(-1) @ v.unsqueeze(1)


class _Recorder:
    """Keeps each layer's queries and new keys/values of one forward (see attention.py's kv_recorder)."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.scaling = 1.0

    def __call__(self, layer_idx, query, key_states, value_states, scaling) -> None:
        self.layers[layer_idx] = (query[0], key_states[0], value_states[0])
        self.scaling = scaling


@torch.inference_mode()
def capture(model, tokenizer, context_ids: tuple[int, ...], stats_config: StatsConfig) -> tuple[CompressedCache, torch.Tensor]:
    """A capturing prefill of the context (with reconstruction scores when the config asks), and its last logits (1, V)."""
    request = ReconstructionRequest.for_prompt(tokenizer, context_ids) if stats_config.reconstruction else None
    cache = CompressedCache(model, capture=True, stats_config=stats_config, reconstruction=request)
    logits = model(torch.tensor([list(context_ids)], device=model.device), cache=cache).logits[:, -1]
    return cache, logits


@torch.inference_mode()
def collect_labels(model, tokenizer, request: CalibrationRequest, grid: tuple[HeadOption, ...],
                   layout: dict[str, Any], stats_config: StatsConfig) -> RequestLabels:
    """Distortion of every (layer, head, option) for one request."""
    captured, _ = capture(model, tokenizer, request.context_ids, stats_config)
    num_layers, num_heads, seq_len = captured.num_layers, captured.num_kv_heads, captured.layers[0].seen_tokens
    recorder = _Recorder()
    identity = captured.fork(Plan.full(num_layers, num_heads, **layout))
    model(torch.tensor([list(request.follow_ids)], device=model.device), cache=identity, kv_recorder=recorder)
    kernels = get_backend(model.device)
    reference = [_outputs(captured.layers[l].prefill, recorder.layers[l], recorder.scaling) for l in range(num_layers)]
    distortion = torch.zeros(num_layers, num_heads, len(grid))
    for o, option in enumerate(grid):
        # every head of a layer holds the same number of tokens under a uniform option: one batched call
        fork = captured.fork(option_plan(option, num_layers, num_heads, seq_len, layout))
        for l, layer in enumerate(fork.layers):
            states = layer.head_states(kernels, torch.float32)
            keys = torch.stack([k for k, _ in states])
            values = torch.stack([v for _, v in states])
            out = _outputs((keys, values), recorder.layers[l], recorder.scaling)
            err = (out - reference[l]).pow(2).sum((1, 2, 3))
            distortion[l, :, o] = err / reference[l].pow(2).sum((1, 2, 3)).clamp_min(1e-12)
    stats = captured.stats
    return RequestLabels(request.key, request.task, request.protocol, seq_len, stats.features.clone(),
                         stats.feature_names, distortion)


def _outputs(context, recorded, scaling: float) -> torch.Tensor:
    """Attention outputs (H_kv, G, Q, D) of the recorded queries over `context` keys/values (H_kv, N, D)."""
    query, new_keys, new_values = recorded  # (H_q, Q, D), (H_kv, Q, D)
    keys, values = context
    return attend(query, keys, values, new_keys, new_values, scaling)


def save_labels(path, labels: list[RequestLabels]) -> None:
    """One safetensors file (features, distortion stacked) + a JSON sidecar with keys and names."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": torch.stack([x.features for x in labels]).contiguous(),
               "distortion": torch.stack([x.distortion for x in labels]).contiguous()}, str(path))
    meta = [{"key": x.key, "task": x.task, "protocol": x.protocol, "seq_len": x.seq_len} for x in labels]
    path.with_suffix(".json").write_text(json.dumps({"feature_names": list(labels[0].feature_names), "requests": meta}))


def load_labels(path) -> list[RequestLabels]:
    """Inverse of `save_labels`."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    names = tuple(meta["feature_names"])
    return [
        RequestLabels(m["key"], m["task"], m["protocol"], m["seq_len"], tensors["features"][i], names, tensors["distortion"][i])
        for i, m in enumerate(meta["requests"])
    ]
