"""Which tokens a head keeps: the one token-selection rule shared by the cache and the labels.

A head keeps its sinks, its recent window and the top-ranked tokens of the middle. The ranking is
the head's own scores (`per_head`) or one ranking shared by the layer's heads (`shared`): the
mean of the heads' scores, each first turned into a distribution over the middle so no head
dominates by scale. Shared rankings make kept sets nest: a head keeping k tokens holds the top k
of the same list as every other head of its layer (kvpress's TOVA, and TOVA's paper, average
over heads too).
"""

from __future__ import annotations

import torch


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Each row (…, N) shifted to a minimum of 0 and scaled to sum 1 (uniform if constant)."""
    shifted = scores.float() - scores.float().amin(-1, keepdim=True)
    total = shifted.sum(-1, keepdim=True)
    uniform = torch.full_like(shifted, 1.0 / max(1, shifted.shape[-1]))
    return torch.where(total > 0, shifted / total.clamp_min(1e-30), uniform)


def layer_ranking(scores: torch.Tensor, selection: str, sinks: int, recent_start: int) -> torch.Tensor:
    """Scores (H, T) each head ranks its middle tokens [sinks, recent_start) by: (H, T)."""
    if selection == "per_head":
        return scores
    ranking = torch.zeros(scores.shape[-1], dtype=torch.float32, device=scores.device)
    if recent_start > sinks:  # only the evictable middle competes; sinks and window are always kept
        ranking[sinks:recent_start] = normalise(scores[:, sinks:recent_start]).mean(0)
    return ranking.expand(scores.shape[0], -1)


def kept_middle(ranking: torch.Tensor, sinks: int, recent_start: int, wanted: int) -> torch.Tensor:
    """Sorted positions of the `wanted` best middle tokens of one head; ranking (T,)."""
    middle = torch.arange(sinks, recent_start, device=ranking.device)
    if wanted < middle.numel():
        # a stable sort breaks ties by position, the same on every device (topk's order differs
        # between CPU and CUDA, and pooled SnapKV scores tie often: measured on an H200)
        top = torch.sort(ranking[middle], descending=True, stable=True).indices[: max(wanted, 0)]
        middle = middle[top.sort().values]
    return middle
