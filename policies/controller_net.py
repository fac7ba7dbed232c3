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

    def num_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters())
