"""The controller network: one head's statistics in, predicted distortion of every option out.

Shared by all heads of a model: the input is the head's AttentionStats features (normalised with
statistics stored beside the weights, so depth and log context length come with them) and a
learned embedding of the head's identity, since much of a head's sensitivity is a fixed property
of the model (retrieval vs streaming heads). The output is log-distortion per option.
"""

from __future__ import annotations

import torch
from torch import nn


class ControllerNet(nn.Module):
    """MLP over [normalised features, head embedding] -> (num_options,) predicted log-distortion."""

    def __init__(self, num_features: int, num_heads_total: int, num_options: int, hidden: int = 64,
                 layers: int = 2, embedding: int = 8) -> None:
        super().__init__()
        self.head_embedding = nn.Embedding(num_heads_total, embedding)
        blocks: list[nn.Module] = []
        width = num_features + embedding
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        blocks.append(nn.Linear(width, num_options))
        self.mlp = nn.Sequential(*blocks)
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))

    def forward(self, features: torch.Tensor, head_ids: torch.Tensor) -> torch.Tensor:
        """features (N, F) raw, head_ids (N,) in [0, L*H) -> (N, O) predicted log-distortion."""
        x = (features - self.feature_mean) / self.feature_std
        return self.mlp(torch.cat([x, self.head_embedding(head_ids)], dim=-1))

    @torch.no_grad()
    def folded(self) -> "FoldedNet":
        """The same function for inference, with the normalisation and the head embedding folded into
        the first layer (a per-head bias): one matrix product instead of five small operations."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        first, features = linears[0], self.feature_mean.numel()
        weight = first.weight[:, :features] / self.feature_std
        bias = first.bias + self.head_embedding.weight @ first.weight[:, features:].T - weight @ self.feature_mean
        return FoldedNet(weight.T.contiguous(), bias.contiguous(),
                         tuple((m.weight.detach().T.contiguous(), m.bias.detach()) for m in linears[1:]))

    def num_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters())


class FoldedNet:
    """`ControllerNet.folded()`: heads are a contiguous run of identities [first, first + N)."""

    def __init__(self, weight: torch.Tensor, head_bias: torch.Tensor, rest: tuple) -> None:
        self.weight, self.head_bias, self.rest = weight, head_bias, rest

    def __call__(self, features: torch.Tensor, first: int) -> torch.Tensor:
        """features (N, F) raw -> (N, O) predicted log-distortion of heads first .. first + N - 1."""
        x = torch.addmm(self.head_bias[first : first + features.shape[0]], features, self.weight)
        for weight, bias in self.rest:
            x = torch.addmm(bias, torch.nn.functional.gelu(x), weight)
        return x
