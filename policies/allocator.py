"""Multiple-choice knapsack: one option per head, least total cost within a byte limit.

Lagrangian relaxation (each head minimises cost + lambda x bytes; bisection on lambda finds the
cheapest lambda that fits), then the bytes left over are spent greedily on the upgrades with the
best cost saved per byte. Exact on the convex hull of each head's options, and near-optimal
otherwise; small cases are checked against brute force in the tests.
"""

from __future__ import annotations

import torch

BISECTION_STEPS = 60


def _pick(cost: torch.Tensor, nbytes: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-head argmin of cost + lam x bytes; ties go to fewer bytes. Returns (N,) option indices."""
    score = cost + lam * nbytes
    best = score.min(-1, keepdim=True).values
    tied = score <= best + 1e-12 * best.abs().clamp_min(1.0)
    return torch.where(tied, nbytes, torch.full_like(nbytes, float("inf"))).argmin(-1)


def allocate(cost: torch.Tensor, nbytes: torch.Tensor, limit: float) -> torch.Tensor:
    """Option per head (N,) minimising sum cost[n, choice] with sum nbytes[n, choice] <= limit.

    cost, nbytes: (N, O) float64. Raises ValueError when even the smallest options do not fit.
    """
    cost, nbytes = cost.double(), nbytes.double()
    rows = torch.arange(cost.shape[0])
    smallest = nbytes.min(-1).values.sum().item()
    if smallest > limit:
        raise ValueError(f"the smallest options need {int(smallest)} bytes, over the limit of {int(limit)}")
    choice = _pick(cost, nbytes, 0.0)
    if nbytes[rows, choice].sum() > limit:
        low, high = 0.0, 1.0
        while nbytes[rows, _pick(cost, nbytes, high)].sum() > limit:
            high *= 2
            if high > 1e30:
                break
        for _ in range(BISECTION_STEPS):
            mid = (low + high) / 2
            if nbytes[rows, _pick(cost, nbytes, mid)].sum() > limit:
                low = mid
            else:
                high = mid
        choice = _pick(cost, nbytes, high)
        if nbytes[rows, choice].sum() > limit:  # only ties left: fall back to the smallest options
            choice = nbytes.argmin(-1)
    return _spend_leftover(cost, nbytes, choice, limit)


def _spend_leftover(cost: torch.Tensor, nbytes: torch.Tensor, choice: torch.Tensor, limit: float) -> torch.Tensor:
    """Greedy upgrades (largest cost saved per extra byte) while they fit."""
    rows = torch.arange(cost.shape[0])
    choice = choice.clone()
    while True:
        left = limit - nbytes[rows, choice].sum().item()
        extra = nbytes - nbytes[rows, choice][:, None]  # (N, O)
        saved = cost[rows, choice][:, None] - cost
        ok = (saved > 0) & (extra <= left)
        if not ok.any():
            return choice
        ratio = torch.where(ok, saved / extra.clamp_min(1.0), torch.full_like(saved, -1.0))
        flat = int(ratio.argmax())
        choice[flat // cost.shape[1]] = flat % cost.shape[1]
