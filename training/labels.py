"""Labels: per (layer, head, option), the distortion of the head's attention output.

One request = one capturing prefill of its context (statistics exactly as the cache reads them at
runtime) and one forward of the ids that follow it over an uncompressed fork, recording their
queries. For every option the captured prefill is forked with that option on every head (the
cache's own selection and quantisation: no second implementation); since a head's attention
output depends only on its own keys and values, each head's distortion under "only this head
compressed" is read from that one fork. A global option gives each head its own keep (its share of
the request's global allocation), so its fork holds heads of different lengths.

Distortion (`LabelTarget`) is measured on the queries that predict the answer (task requests; all
following queries for natural text) or on every following query, and either relative to the
head's own output, ||o' - o||^2 / ||o||^2, or in the residual stream: the head's part of the
output projection, ||W_h (o'_h - o_h)||^2 / ||W o||^2, so a head weighs by what it adds to its
layer's output. Measured on the 1k calibration requests, the answer rows in the residual stream
are where a global allocation (KVzip's per-head counts) beats uniform keeps at equal bytes on NIAH,
as it does on the answers; the relative error over every following query ranks them the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_kv.plan import Layout, Plan, window_tokens
from adaptive_kv.policies.controller.options import HeadOption, option_keeps, plan_from_choices
from adaptive_kv.prefill import Captured, capture
from adaptive_kv.stats import AttentionStats, StatsConfig
from adaptive_kv.training.calibration import CalibrationRequest


LABEL_ROWS: tuple[str, ...] = ("answer", "all")
LABEL_ERRORS: tuple[str, ...] = ("residual", "relative")


@dataclass(frozen=True)
class LabelTarget:
    """Which queries the distortion is measured on, and how it is normalised (see the module docstring)."""

    rows: str = "answer"
    error: str = "residual"

    def __post_init__(self) -> None:
        if self.rows not in LABEL_ROWS:
            raise ValueError(f"label rows must be one of {LABEL_ROWS}, got {self.rows!r}")
        if self.error not in LABEL_ERRORS:
            raise ValueError(f"label error must be one of {LABEL_ERRORS}, got {self.error!r}")

    def row_slice(self, request: CalibrationRequest) -> slice:
        """The following queries measured: those predicting the answer tokens, or all."""
        if self.rows == "all" or request.answer_tokens == 0:
            return slice(None)
        return slice(-request.answer_tokens - 1, -1)


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


def option_plan(option: HeadOption, num_layers: int, num_heads: int, seq_len: int, layout: Layout,
                stats: AttentionStats | None = None, windows: tuple[int | None, ...] | None = None) -> Plan:
    """The plan giving every head `option` (a global option's keeps come from the request's `stats`), for
    layers with these sliding `windows` (the model's: `cache.windows`): a sliding layer's option is a fraction
    of the tokens it holds, as the learned policy plans it (`option_keeps`)."""
    floor = layout.floor
    if option.allocation == "global":
        if stats is None:
            raise ValueError("a global option's plan needs the request's statistics")
        keeps = option_keeps((option,), stats.features, stats.feature_names, seq_len, floor, windows)
        choice = torch.zeros(num_layers, num_heads, dtype=torch.long)
        return plan_from_choices((option,), choice, keeps, seq_len, layout, windows)
    rows = []
    for layer in range(num_layers):
        held = window_tokens(seq_len, None if windows is None else windows[layer])
        rows.append((option.budget(held, floor),) * num_heads)
    return Plan(tuple(rows), **layout.keywords(), windows=windows)


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


def capture_reading(model, tokenizer, ids, stats_config: StatsConfig) -> Captured:
    """The capturing prefill of `ids`; when `stats_config` predicts reconstruction scores (and reads no
    exact ones) they stand under the exact names (`AttentionStats.predicted_as_exact`), so labels, fits
    and validation treat a controller on predicted scores as one on exact scores."""
    prefill = capture(model, tokenizer, ids, stats_config)
    if stats_config.predictor is not None and not stats_config.reconstruction:
        prefill.cache.stats = prefill.cache.stats.predicted_as_exact()
    return prefill


@torch.inference_mode()
def collect_labels(model, tokenizer, request: CalibrationRequest, grid: tuple[HeadOption, ...],
                   layout: Layout, stats_config: StatsConfig, target: LabelTarget = LabelTarget()) -> RequestLabels:
    """Distortion of every (layer, head, option) for one request."""
    captured = capture_reading(model, tokenizer, request.context_ids, stats_config).cache
    num_layers, num_heads, seq_len = captured.num_layers, captured.num_kv_heads, captured.get_seq_length()
    recorder = _Recorder()
    identity = captured.fork(Plan.full(num_layers, num_heads, **layout.keywords(), windows=captured.windows))
    model(torch.tensor([list(request.follow_ids)], device=model.device), cache=identity, kv_recorder=recorder)
    rows = target.row_slice(request)
    reference = [_outputs(captured.prefill_states(l), recorder.layers[l], recorder.scaling)[:, :, rows]
                 for l in range(num_layers)]
    measure = _residual_error(model, reference) if target.error == "residual" else _relative_error
    distortion = torch.zeros(num_layers, num_heads, len(grid))
    for o, option in enumerate(grid):
        fork = captured.fork(option_plan(option, num_layers, num_heads, seq_len, layout, captured.stats, captured.windows))
        for l in range(num_layers):
            out = _head_outputs(fork.head_states(l, torch.float32), recorder.layers[l], recorder.scaling)
            distortion[l, :, o] = measure(l, out[:, :, rows], reference[l])
    stats = captured.stats
    return RequestLabels(request.key, request.task, request.protocol, seq_len, stats.features.clone(),
                         stats.feature_names, distortion)


def _relative_error(layer_idx: int, out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||o' - o||^2 / ||o||^2 per KV head (outputs (H_kv, G, Q, D))."""
    return (out - reference).pow(2).sum((1, 2, 3)) / reference.pow(2).sum((1, 2, 3)).clamp_min(1e-12)


def _residual_error(model, reference: list[torch.Tensor]):
    """||W_h (o'_h - o_h)||^2 / ||W o||^2 per KV head, W = the layer's output projection (||W o||^2 of
    each layer's `reference` outputs computed once, not per option)."""
    try:
        weights = [layer.self_attn.o_proj.weight for layer in model.model.layers]
    except AttributeError:
        raise ValueError("label error 'residual' needs model.model.layers[i].self_attn.o_proj (Llama-style); "
                         "use 'relative' for this model") from None

    def project(layer_idx: int, out: torch.Tensor) -> torch.Tensor:
        # GQA groups are contiguous: KV head h owns query heads h*G .. h*G+G-1, i.e. a block of o_proj's columns
        heads, group, queries, dim = out.shape
        w = weights[layer_idx].float().view(-1, heads, group * dim)  # (hidden, H_kv, G*D)
        return torch.einsum("hqk,nhk->hqn", out.permute(0, 2, 1, 3).reshape(heads, queries, group * dim), w)

    norms = [project(l, ref).sum(0).pow(2).sum().clamp_min(1e-12) for l, ref in enumerate(reference)]

    def error(layer_idx: int, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return project(layer_idx, out - ref).pow(2).sum((1, 2)) / norms[layer_idx]

    return error


def _head_outputs(states: list[tuple[torch.Tensor, torch.Tensor]], recorded, scaling: float) -> torch.Tensor:
    """Outputs (H_kv, G, Q, D) over each head's own keys/values (N_h, D): one batched call when the
    heads hold equal counts (every uniform option), else head by head."""
    if len({k.shape[0] for k, _ in states}) == 1:
        return _outputs((torch.stack([k for k, _ in states]), torch.stack([v for _, v in states])), recorded, scaling)
    query, new_keys, new_values = recorded
    group = query.shape[0] // len(states)
    return torch.cat([attend(query[h * group : (h + 1) * group], k[None], v[None], new_keys[h : h + 1],
                             new_values[h : h + 1], scaling) for h, (k, v) in enumerate(states)])


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

    from adaptive_kv.training import atomic

    path = Path(path)
    tensors = {"features": torch.stack([x.features for x in labels]).contiguous(),
               "distortion": torch.stack([x.distortion for x in labels]).contiguous()}
    atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp)))  # a killed run leaves no truncated file
    meta = [{"key": x.key, "task": x.task, "protocol": x.protocol, "seq_len": x.seq_len} for x in labels]
    atomic.write_text(path.with_suffix(".json"), json.dumps({"feature_names": list(labels[0].feature_names),
                                                             "requests": meta}))


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
