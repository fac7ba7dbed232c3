"""Fitting the controller: a plain torch loop over (request, layer, head) rows, split by request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from adaptive_kv.policies.controller.files import ControllerConfig
from adaptive_kv.policies.controller.net import ControllerNet
from adaptive_kv.training.labels import RequestLabels

DISTORTION_FLOOR = 1e-6  # log(distortion + floor): identity options (0) stay finite
LOSSES = ("mse", "huber")


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings (searched by Optuna)."""

    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    loss: str = "huber"
    seed: int = 0
    # a request of n tokens weighs (n / shortest)^length_weight in the loss: > 0 favours long requests
    length_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def rows(labels: list[RequestLabels], feature_names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, F), head ids (N,), log-distortion targets (N, O)) over every request's heads."""
    feats, heads, targets = [], [], []
    for item in labels:
        idx = [item.feature_names.index(f) for f in feature_names]
        num_layers, num_heads, _ = item.features.shape
        feats.append(item.features[..., idx].reshape(num_layers * num_heads, -1))
        heads.append(torch.arange(num_layers * num_heads))
        targets.append((item.distortion + DISTORTION_FLOOR).log().reshape(num_layers * num_heads, -1))
    return torch.cat(feats).float(), torch.cat(heads), torch.cat(targets).float()


def length_weights(labels: list[RequestLabels], exponent: float) -> torch.Tensor:
    """Per row of `rows(labels)`: (seq_len / shortest seq_len)^exponent, scaled to mean 1."""
    shortest = min(item.seq_len for item in labels)
    per_row = [torch.full((item.features.shape[0] * item.features.shape[1],), (item.seq_len / shortest) ** exponent)
               for item in labels]
    weights = torch.cat(per_row)
    return weights / weights.mean()


def fit(config: ControllerConfig, fit_config: FitConfig, train: list[RequestLabels], valid: list[RequestLabels],
        on_epoch: Callable[[int, float, float], None] | None = None) -> tuple[ControllerNet, dict[str, float]]:
    """Train a fresh network on `train`; report per-epoch train/valid loss. Returns (net, final metrics)."""
    torch.manual_seed(fit_config.seed)
    x, h, y = rows(train, config.feature_names)
    w = length_weights(train, fit_config.length_weight)
    net = config.build()
    net.feature_mean.copy_(x.mean(0))
    net.feature_std.copy_(x.std(0).clamp_min(1e-4))  # constant features (one context length) stay finite
    optimiser = torch.optim.AdamW(net.parameters(), lr=fit_config.lr, weight_decay=fit_config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, fit_config.epochs)
    loss_fn = torch.nn.HuberLoss() if fit_config.loss == "huber" else torch.nn.MSELoss()
    row_loss = type(loss_fn)(reduction="none")
    valid_rows = rows(valid, config.feature_names) if valid else None
    metrics: dict[str, float] = {}
    for epoch in range(fit_config.epochs):
        net.train()
        order = torch.randperm(x.shape[0])
        total = 0.0
        for start in range(0, x.shape[0], fit_config.batch_size):
            batch = order[start : start + fit_config.batch_size]
            loss = (row_loss(net(x[batch], h[batch]), y[batch]).mean(1) * w[batch]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * batch.numel()
        schedule.step()
        metrics = {"train_loss": total / x.shape[0], "valid_loss": _evaluate(net, valid_rows, loss_fn)}
        if on_epoch is not None:
            on_epoch(epoch, metrics["train_loss"], metrics["valid_loss"])
    return net.eval(), metrics


@torch.no_grad()
def _evaluate(net: ControllerNet, data, loss_fn) -> float:
    if data is None:
        return math.nan
    net.eval()
    x, h, y = data
    return loss_fn(net(x, h), y).item()
