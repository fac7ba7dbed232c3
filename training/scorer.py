"""Fitting a reconstruction predictor: exact reconstruction scores as targets, attention inputs as features.

One example is one prefill of a calibration context: the hidden states entering every layer's
attention (what the predictor will read inside a prefill), where the tokens sit in the context, and
the exact reconstruction scores of the same tokens (`adaptive_kv.reconstruction`, the second pass
the predictor replaces), as logs.
Fits are plain torch: ridge regression in closed form (linear) or Adam (a two-layer MLP), every
layer at once. Held-out metrics per layer: Spearman correlation of predicted and exact scores per
(request, KV head), and the recall of the exact top 5 / 10 / 25 % of tokens in the predicted top.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from adaptive_kv.attention import attention_modules
from adaptive_kv.predicted_reconstruction import (KINDS, LOG_FLOOR, POSITION_FEATURES, PredictorShape,
                                                  ReconstructionPredictor, checked_position_features,
                                                  position_features)
from adaptive_kv.prefill import capture
from adaptive_kv.stats import StatsConfig

TOP_FRACTIONS = (0.05, 0.10, 0.25)
SKIP_TOKENS = 4  # attention sinks: always kept, and their scores (~1) would dominate a regression


@dataclass(frozen=True)
class ScorerExample:
    """One request's data: attention inputs (L, N, hidden) in fp16, the tokens' positions (N,) in the
    `seq_len`-token context, and log exact scores (L, H_kv, N)."""

    key: str
    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    seq_len: int

    def __post_init__(self) -> None:
        if self.positions.shape != (self.inputs.shape[1],):
            raise ValueError(f"example {self.key}: positions must have one entry per token ({self.inputs.shape[1]}), "
                             f"got {tuple(self.positions.shape)}")

    @property
    def tokens(self) -> int:
        """Tokens per layer."""
        return self.inputs.shape[1]


@contextlib.contextmanager
def recorded_attention_inputs(model) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: hidden states (T, hidden)} of the forwards that run with a cache while inside (the prefill,
    not the reconstruction pass, which runs without one); the last such forward wins."""
    seen: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[module.layer_idx] = hidden[0].detach()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def collect_example(model, tokenizer, ids: Sequence[int], key: str, *, sample_tokens: int | None = None,
                    seed: int = 0) -> ScorerExample:
    """The example of one context: every token after the sinks, or `sample_tokens` of them drawn at random."""
    with recorded_attention_inputs(model) as seen:
        captured = capture(model, tokenizer, ids, StatsConfig(reconstruction=True))
    scores = captured.cache.stats.token_scores["reconstruction"]  # (L, H, T)
    seq_len = scores.shape[-1]
    if seq_len <= SKIP_TOKENS:
        raise ValueError(f"a scorer example needs more than {SKIP_TOKENS} tokens, got {seq_len}")
    positions = torch.arange(SKIP_TOKENS, seq_len)
    if sample_tokens is not None and sample_tokens < positions.numel():
        pick = torch.randperm(positions.numel(), generator=torch.Generator().manual_seed(seed))[:sample_tokens]
        positions = positions[pick.sort().values]
    inputs = torch.stack([seen[layer][positions] for layer in range(len(seen))]).half()
    targets = scores[:, :, positions].float().clamp_min(math.exp(LOG_FLOOR)).log()
    return ScorerExample(key, inputs.cpu(), targets.cpu(), positions, seq_len)


# ---------------------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class FitOptions:
    """How a predictor is fitted: the position features it reads besides the hidden state (none:
    hidden states only); `ridge` for the linear kind; width, steps, lr, batch for the MLP."""

    position_features: tuple[str, ...] = POSITION_FEATURES
    ridge: float = 1.0
    width: int = 64
    steps: int = 400
    lr: float = 3e-3
    batch: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        for name in ("width", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        checked_position_features(self.position_features)


def example_inputs(example: ScorerExample, names: tuple[str, ...]) -> torch.Tensor:
    """A predictor's inputs (L, N, hidden + len(names)) of one example: hidden states, then position features."""
    features = position_features(example.positions, example.seq_len, names)
    layers = example.inputs.shape[0]
    return torch.cat([example.inputs.float(), features[None].expand(layers, -1, -1)], dim=-1)


def _stacked(examples: Sequence[ScorerExample], names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (L, N, D) fp32 and targets (L, N, H) over every example."""
    if not examples:
        raise ValueError("fitting a scorer needs at least one example")
    x = torch.cat([example_inputs(e, names) for e in examples], dim=1)
    y = torch.cat([e.targets.transpose(1, 2) for e in examples], dim=1)
    return x, y


def fit_predictor(examples: Sequence[ScorerExample], kind: str, shape: PredictorShape,
                  options: FitOptions = FitOptions()) -> ReconstructionPredictor:
    """Fit a `kind` predictor (KINDS) for a model of `shape` on `examples`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = tuple(options.position_features)
    hidden = examples[0].inputs.shape[-1] if examples else 0
    x, y = _stacked(examples, names)
    if x.shape[0] != shape.num_layers or y.shape[-1] != shape.num_kv_heads or hidden != shape.hidden_size:
        raise ValueError(f"examples have {x.shape[0]} layers x {y.shape[-1]} heads x {hidden} hidden, "
                         f"the model {shape}")
    mean, std = x.mean(1), x.std(1).clamp_min(1e-4)
    xs = (x - mean[:, None]) / std[:, None]
    w, b = _ridge(xs, y, options.ridge)
    weights = {"mean": mean, "std": std}
    if kind == "linear":
        return ReconstructionPredictor(kind, shape, {**weights, "w": w, "b": b}, position_features=names)
    return ReconstructionPredictor(kind, shape, {**weights, **_mlp(xs, y, options)}, position_features=names)


def _ridge(xs: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression per layer on standardised inputs: w (L, D, H), b (L, H)."""
    num_layers, count, dim = xs.shape
    x1 = torch.cat([xs, torch.ones(num_layers, count, 1)], dim=-1).double()
    gram = x1.transpose(1, 2) @ x1
    penalty = torch.eye(dim + 1, dtype=torch.float64) * ridge
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + penalty, x1.transpose(1, 2) @ y.double()).float()
    return solution[:, :dim].contiguous(), solution[:, dim].contiguous()


def _mlp(xs: torch.Tensor, y: torch.Tensor, options: FitOptions) -> dict[str, torch.Tensor]:
    """A two-layer SiLU MLP per layer, fitted with Adam on minibatches (all layers in one batched step)."""
    gen = torch.Generator().manual_seed(options.seed)
    num_layers, count, dim = xs.shape
    heads = y.shape[-1]
    scale = lambda fan_in: 1.0 / math.sqrt(fan_in)  # noqa: E731
    params = {
        "w1": (torch.randn(num_layers, dim, options.width, generator=gen) * scale(dim)).requires_grad_(),
        "b1": torch.zeros(num_layers, options.width, requires_grad=True),
        "w2": (torch.randn(num_layers, options.width, heads, generator=gen) * scale(options.width)).requires_grad_(),
        "b2": y.mean(1).clone().requires_grad_(),
    }
    optimiser = torch.optim.Adam(params.values(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, options.steps)
    batch = min(options.batch, count)
    with torch.enable_grad():
        for _ in range(options.steps):
            rows = torch.randint(0, count, (batch,), generator=gen)
            hidden = torch.nn.functional.silu(xs[:, rows] @ params["w1"] + params["b1"][:, None])
            loss = ((hidden @ params["w2"] + params["b2"][:, None] - y[:, rows]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return {k: v.detach().contiguous() for k, v in params.items()}


# ---------------------------------------------------------------------------------------- metrics
def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension (ties broken by position)."""
    return x.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).float()


def spearman(predicted: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last dimension."""
    a, b = _ranks(predicted), _ranks(exact)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def top_recall(predicted: torch.Tensor, exact: torch.Tensor, fraction: float) -> torch.Tensor:
    """Share of the exact top `fraction` of tokens that are in the predicted top `fraction`, along the last dim."""
    k = max(1, math.ceil(fraction * exact.shape[-1]))
    want = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, exact.topk(k, dim=-1).indices, True)
    got = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, predicted.topk(k, dim=-1).indices, True)
    return (want & got).sum(-1).float() / k


def predicted_log_scores(predictor: ReconstructionPredictor, example: ScorerExample) -> torch.Tensor:
    """The predictor's log scores (L, H, N) of an example's tokens."""
    return torch.stack([predictor.log_scores(layer, example.inputs[layer].float(), example.positions, example.seq_len)
                        for layer in range(example.inputs.shape[0])])


@torch.inference_mode()
def heldout_metrics(predictor: ReconstructionPredictor, examples: Sequence[ScorerExample]) -> dict[str, list[float]]:
    """Per layer, over every (example, KV head): mean Spearman and top-5/10/25 % recall.

    Returns {"spearman": [L floats], "recall_top5": [...], ...}.
    """
    if not examples:
        raise ValueError("held-out metrics need at least one example")
    per: dict[str, list[torch.Tensor]] = {}
    for example in examples:
        predicted = predicted_log_scores(predictor, example)
        per.setdefault("spearman", []).append(spearman(predicted, example.targets))
        for fraction in TOP_FRACTIONS:
            per.setdefault(f"recall_top{round(fraction * 100)}", []).append(top_recall(predicted, example.targets, fraction))
    return {name: torch.stack(values).mean((0, 2)).tolist() for name, values in per.items()}
