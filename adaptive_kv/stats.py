"""Cheap attention statistics of one request, read during prefill.

Only the last W queries (the observation window, SnapKV arXiv:2404.14469) are scored against all
keys, so the cost is W x T per head instead of T x T (`kernels.*.window_attention_scores`; the
Triton backend never holds the W x T probabilities). Query heads of a GQA group are averaged
into their KV head. The result feeds the policies (features) and the eviction (token scores).
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from adaptive_kv.kernels import reference as ref
from adaptive_kv.plan import value_group_size, window_tokens

TOP_MASS_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.10, 0.25, 0.50)
QUANT_BITS: tuple[int, ...] = (2, 4, 8)
FEATURE_NAMES: tuple[str, ...] = (
    "entropy",
    *(f"top{int(f * 100)}_mass" for f in TOP_MASS_FRACTIONS),
    "sink_mass",
    "recent_mass",
    "key_outlier_ratio",
    *(f"key_qerr_{b}" for b in QUANT_BITS),
    *(f"value_qerr_{b}" for b in QUANT_BITS),
    "log_seq_len",
    "depth",
)
# SnapKV's pooling (its max-pool option, kernel 7): a strong token lends its score to its
# neighbours, so multi-token facts (a 5-digit key is 5 tokens here) are kept whole. Average
# pooling lost the last digit of a passkey at keep 0.5 where max pooling kept it.
SNAPKV_POOL = 7
QERR_SAMPLE_TOKENS = 256
RECON_TOP_MASS: tuple[str, ...] = tuple(f"recon_top{int(f * 100)}_mass" for f in TOP_MASS_FRACTIONS[:4])
# the share of a head's tokens among the top q of every (layer, head, token) reconstruction score:
# what a global allocation (KVzip) would give the head, on the cross-head scale the per-head
# top-mass curve normalises away; retrieval heads stand out here at small budgets
GLOBAL_SHARE_FRACTIONS = (0.4, 0.2, 0.1, 0.05)
RECON_GLOBAL_SHARE: tuple[str, ...] = tuple(f"recon_global_top{int(f * 100)}" for f in GLOBAL_SHARE_FRACTIONS)
RECONSTRUCTION_FEATURES: tuple[str, ...] = RECON_TOP_MASS + RECON_GLOBAL_SHARE
# the same features read from predicted reconstruction scores (`adaptive_kv.predicted_reconstruction`)
PREDICTED_FEATURES: tuple[str, ...] = tuple(f"predicted_{name}" for name in RECONSTRUCTION_FEATURES)
PREDICTED_TWIN: dict[str, str] = dict(zip(RECONSTRUCTION_FEATURES, PREDICTED_FEATURES))  # exact name -> predicted
# the features each reconstruction scorer's scores give
SCORE_FEATURES: dict[str, tuple[str, ...]] = {
    "reconstruction": RECONSTRUCTION_FEATURES,
    "predicted_reconstruction": PREDICTED_FEATURES,
}


@dataclass(frozen=True)
class StatsConfig:
    """How the statistics are read: observation window, sink count, quantisation group."""

    window: int = 32
    sink_tokens: int = 4
    group_size: int = 32
    # read context-reconstruction scores too (a second pass over ~the context; adaptive_kv.reconstruction)
    reconstruction: bool = False
    # predict them inside the prefill with this ReconstructionPredictor (no second pass)
    predictor: Any = None
    # the files the policies plan from, each trained for one model (`model_identity.TrainedFor`): the
    # cache refuses to be built on a model they were not trained for
    trained_for: tuple = ()

    def __post_init__(self) -> None:
        for name in ("window", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")


@dataclass(frozen=True)
class LayerObservation:
    """One layer's features (H_kv, F) and per-token scores {scorer: (H_kv, T)}."""

    features: torch.Tensor
    token_scores: dict[str, torch.Tensor]


@dataclass(frozen=True)
class AttentionStats:
    """Statistics of one request: features (L, H_kv, F) and token scores {scorer: (L, H_kv, T)}.

    The KV shape travels with them (layers and KV heads from the features, `head_dim` and
    `dtype_bytes` of the cached states, each layer's sliding window `windows`), so a policy sizes its
    plan in bytes from the statistics alone. A sliding-window layer is observed over the tokens it
    holds (`plan.window_tokens`); its token scores are zero before them.
    """

    features: torch.Tensor
    token_scores: dict[str, torch.Tensor]
    seq_len: int
    feature_names: tuple[str, ...] = field(default=FEATURE_NAMES)
    _: KW_ONLY
    head_dim: int
    dtype_bytes: int
    windows: tuple[int | None, ...] | None = None

    def layer_tokens(self, layer_idx: int) -> int:
        """Tokens a full cache holds for this layer (`plan.window_tokens`)."""
        return window_tokens(self.seq_len, None if self.windows is None else self.windows[layer_idx])

    def window_groups(self) -> dict[int, tuple[int, ...]]:
        """Layers by the tokens a full cache holds for them: {tokens: layer indices}, one group when no layer slides."""
        groups: dict[int, list[int]] = {}
        for layer in range(self.num_layers):
            groups.setdefault(self.layer_tokens(layer), []).append(layer)
        return {tokens: tuple(layers) for tokens, layers in groups.items()}

    def held_request(self, layers: tuple[int, ...], tokens: int) -> "AttentionStats":
        """These layers' statistics as a request of the `tokens` newest tokens, every layer seeing all of
        them: what a policy plans a group of `window_groups` from."""
        pick = torch.tensor(layers)
        return AttentionStats(
            features=self.features[pick],
            token_scores={k: v[pick.to(v.device), :, self.seq_len - tokens:] for k, v in self.token_scores.items()},
            seq_len=tokens,
            feature_names=self.feature_names,
            head_dim=self.head_dim,
            dtype_bytes=self.dtype_bytes,
        )

    @property
    def num_layers(self) -> int:
        """Number of layers observed."""
        return self.features.shape[0]

    @property
    def num_kv_heads(self) -> int:
        """Number of KV heads per layer."""
        return self.features.shape[1]

    def feature(self, name: str) -> torch.Tensor:
        """One named feature, shape (L, H_kv)."""
        if name not in self.feature_names:
            raise ValueError(f"feature must be one of {self.feature_names}, got {name!r}")
        return self.features[..., self.feature_names.index(name)]

    @property
    def has_reconstruction(self) -> bool:
        """True when the context-reconstruction scores and features were read."""
        return "reconstruction" in self.token_scores

    def with_reconstruction(self, scores: torch.Tensor, scorer: str = "reconstruction") -> "AttentionStats":
        """These stats plus reconstruction scores (L, H_kv, T) under `scorer` (exact or predicted), their
        per-head top-mass curve and each head's share of the global top scores (`global_shares`),
        named `SCORE_FEATURES[scorer]`."""
        if scorer not in SCORE_FEATURES:
            raise ValueError(f"scorer must be one of {tuple(SCORE_FEATURES)}, got {scorer!r}")
        share = scores.float() / scores.float().sum(-1, keepdim=True).clamp_min(1e-12)
        curve = torch.stack([_top_mass(layer) for layer in share])[..., : len(RECON_TOP_MASS)]
        return AttentionStats(
            features=torch.cat([self.features, curve.cpu(), self._global_shares(scores).cpu()], dim=-1),
            token_scores={**self.token_scores, scorer: scores},
            seq_len=self.seq_len,
            feature_names=self.feature_names + SCORE_FEATURES[scorer],
            head_dim=self.head_dim,
            dtype_bytes=self.dtype_bytes,
            windows=self.windows,
        )

    def _global_shares(self, scores: torch.Tensor) -> torch.Tensor:
        """`global_shares` of scores (L, H_kv, T) ranked within each group of layers that hold the same tokens
        (`window_groups`), over those tokens: a head's share times the tokens its layer holds is its count
        among its group's top, as a policy plans a group (`Policy.plan`; the learned policy's global options)."""
        if self.windows is None:
            return global_shares(scores)
        out = scores.new_zeros(*scores.shape[:2], len(GLOBAL_SHARE_FRACTIONS), dtype=torch.float32)
        for tokens, layers in self.window_groups().items():
            pick = torch.tensor(layers, device=scores.device)
            out[pick] = global_shares(scores[pick, :, self.seq_len - tokens:])
        return out

    def predicted_as_exact(self) -> "AttentionStats":
        """These stats with the predicted reconstruction scores and features under the exact ones' names,
        so a controller trained on predicted scores is trained and validated by the code that reads exact ones."""
        if "predicted_reconstruction" not in self.token_scores or self.has_reconstruction:
            raise ValueError("predicted_as_exact needs predicted reconstruction scores and no exact ones")
        twin = {predicted: exact for exact, predicted in PREDICTED_TWIN.items()}
        scores = {("reconstruction" if k == "predicted_reconstruction" else k): v for k, v in self.token_scores.items()}
        return replace(self, token_scores=scores, feature_names=tuple(twin.get(f, f) for f in self.feature_names))

    def layer(self, layer_idx: int) -> "AttentionStats":
        """The statistics of one layer, as a one-layer request (what bounded prefill plans from)."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers - 1}], got {layer_idx}")
        pick = slice(layer_idx, layer_idx + 1)
        windows = None if self.windows is None else self.windows[pick]
        return replace(self, features=self.features[pick],
                       token_scores={k: v[pick] for k, v in self.token_scores.items()}, windows=windows)

    @classmethod
    def stack(cls, layers: list[LayerObservation], seq_len: int, *, head_dim: int, dtype_bytes: int,
              windows: tuple[int | None, ...] | None = None) -> "AttentionStats":
        """Assemble per-layer observations (in layer order) of states with `head_dim` channels of
        `dtype_bytes` each; a sliding layer's scores (over the tokens it holds) are zero-padded in front."""
        features = torch.stack([obs.features for obs in layers])
        padded = lambda t: F.pad(t, (seq_len - t.shape[-1], 0))  # noqa: E731
        scores = {name: torch.stack([padded(obs.token_scores[name]) for obs in layers]) for name in layers[0].token_scores}
        if windows is not None and all(w is None for w in windows):
            windows = None
        return cls(features=features, token_scores=scores, seq_len=seq_len, head_dim=head_dim, dtype_bytes=dtype_bytes,
                   windows=None if windows is None else tuple(windows))


def _entropy(row_entropy: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mean normalised entropy of the window rows (H_kv, W) -> (H_kv,). 1 = uniform, 0 = one token."""
    w = row_entropy.shape[-1]
    visible = torch.arange(seq_len - w + 1, seq_len + 1, device=row_entropy.device).float()
    norm = visible.log().clamp_min(1e-6)  # a single visible token has zero entropy by definition
    return (row_entropy / norm).mean(-1)


def global_shares(scores: torch.Tensor) -> torch.Tensor:
    """Share of each head's tokens among the top q of all scores (L, H, T), per GLOBAL_SHARE_FRACTIONS: (L, H, Q).

    Ranked as `global_allocation.global_keeps` ranks (stable: among equal scores the earlier entry wins).
    """
    num_layers, num_heads, seq_len = scores.shape
    owner = scores.float().flatten().argsort(descending=True, stable=True) // seq_len
    shares = []
    for q in GLOBAL_SHARE_FRACTIONS:
        top = owner[: max(1, math.ceil(q * owner.numel()))]
        shares.append(torch.bincount(top, minlength=num_layers * num_heads).float() / seq_len)
    return torch.stack(shares, dim=-1).view(num_layers, num_heads, len(GLOBAL_SHARE_FRACTIONS))


def _top_mass(mass: torch.Tensor) -> torch.Tensor:
    """Attention mass held by the top 1/5/10/25/50 % of tokens: (H_kv, 5)."""
    seq_len = mass.shape[-1]
    cumulative = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    idx = [max(1, math.ceil(f * seq_len)) - 1 for f in TOP_MASS_FRACTIONS]
    return cumulative[:, idx]


def _quant_errors(keys: torch.Tensor, values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Relative round-trip error of K and V at 2/4/8 bits on a strided token subsample: (H_kv, 6)."""
    num_kv, seq_len, head_dim = keys.shape
    groups = max(1, min(seq_len, QERR_SAMPLE_TOKENS) // group_size)
    if seq_len < group_size:
        return torch.zeros(num_kv, 2 * len(QUANT_BITS), device=keys.device)
    starts = torch.linspace(0, seq_len - group_size, groups, device=keys.device).long()
    idx = (starts[:, None] + torch.arange(group_size, device=keys.device)).flatten()
    k = keys[:, idx].float().reshape(num_kv * groups, group_size, head_dim)
    v = values[:, idx].float().reshape(-1, head_dim)
    cg = value_group_size(group_size, head_dim)
    lengths = torch.full((num_kv * groups,), group_size, device=keys.device)
    out = []
    for bits in QUANT_BITS:
        k_hat = ref.dequantize_keys(*ref.quantize_keys(k, bits), lengths, bits, torch.float32)
        out.append(_rel_err(k.reshape(-1, head_dim), k_hat, num_kv))
    for bits in QUANT_BITS:
        v_hat = ref.dequantize_values(*ref.quantize_values(v, bits, cg), bits, torch.float32)
        out.append(_rel_err(v, v_hat, num_kv))
    return torch.stack(out, dim=-1)


def _rel_err(x: torch.Tensor, x_hat: torch.Tensor, num_kv: int) -> torch.Tensor:
    x, x_hat = x.view(num_kv, -1), x_hat.view(num_kv, -1)
    return (x - x_hat).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)


def token_scores(window_sum: torch.Tensor, last_query: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token importance (higher = keep) for every scorer: {name: (H_kv, T)}.

    window_sum and last_query (H_kv, T) come from `window_attention_scores`; keys (H_kv, T, D).
    """
    pooled = F.max_pool1d(window_sum.unsqueeze(1), SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2).squeeze(1)
    return {
        "snapkv": pooled,  # SnapKV: pooled observation-window attention
        "window": window_sum,  # H2O-style accumulated attention, restricted to the window
        "last_query": last_query,  # TOVA arXiv:2401.06104: the newest query's attention
        "key_norm": -keys.float().norm(dim=-1),  # KNorm arXiv:2406.11430: low key norm, high attention
    }


def observe_layer(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    layer_idx: int,
    num_layers: int,
    config: StatsConfig,
    kernels=None,
) -> LayerObservation:
    """Features and token scores of one layer; query (H_q, T, D), keys/values (H_kv, T, D).

    `kernels` (a backend from `adaptive_kv.kernels.get_backend`, default the torch reference)
    computes the window attention's aggregates without keeping (H_kv, W, T).
    """
    seq_len = keys.shape[1]
    window = (kernels or ref).window_attention_scores(query, keys, scaling, config.window)
    mass = window["window_sum"] / min(config.window, seq_len)  # (H_kv, T), sums to 1
    channel_max = keys.float().abs().amax(dim=1)  # (H_kv, D)
    outlier = channel_max.amax(-1) / channel_max.median(-1).values.clamp_min(1e-6)
    num_kv = keys.shape[0]
    scalar = lambda v: torch.full((num_kv, 1), float(v), device=keys.device)  # noqa: E731
    features = torch.cat(
        [
            _entropy(window["row_entropy"], seq_len).unsqueeze(-1),
            _top_mass(mass),
            mass[:, : config.sink_tokens].sum(-1, keepdim=True),
            mass[:, -config.window :].sum(-1, keepdim=True),
            outlier.unsqueeze(-1),
            _quant_errors(keys, values, config.group_size),
            scalar(math.log(seq_len)),
            scalar(layer_idx / max(1, num_layers - 1)),
        ],
        dim=-1,
    ).cpu()
    return LayerObservation(features=features, token_scores=token_scores(window["window_sum"], window["last_query"], keys))
