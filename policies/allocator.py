"""Multiple-choice knapsack: one option per head, least total cost within a byte limit.

Lagrangian relaxation (each head minimises cost + lambda x bytes; bisection on lambda finds the
cheapest lambda that fits), then the bytes left over are spent greedily on the upgrades with the
best cost saved per byte. Optimal for the relaxed problem and within a sliver of the integral
optimum when costs are convex in bytes; small cases are checked against brute force and dynamic
programming in the tests. NumPy, not torch: a decision is a few hundred tiny array operations,
where torch's per-op overhead alone would exceed the 1 ms target.
"""

from __future__ import annotations

import numpy as np

BISECTION_STEPS = 48


def _pick(cost: np.ndarray, nbytes: np.ndarray, lam: float) -> np.ndarray:
    """Per-head argmin of cost + lam x bytes; ties go to fewer bytes. Returns (N,) option indices."""
    score = cost + lam * nbytes
    best = score.min(-1, keepdims=True)
    tied = score <= best + 1e-12 * np.maximum(np.abs(best), 1.0)
    return np.where(tied, nbytes, np.inf).argmin(-1)


def allocate(cost, nbytes, limit: float) -> np.ndarray:
    """Option per head (N,) minimising sum cost[n, choice] with sum nbytes[n, choice] <= limit.

    cost, nbytes: (N, O) arrays (NumPy or torch). Raises ValueError when even the smallest options do not fit.
    """
    cost, nbytes = np.asarray(cost, dtype=np.float64), np.asarray(nbytes, dtype=np.float64)
    rows = np.arange(cost.shape[0])
    smallest = nbytes.min(-1).sum()
    if smallest > limit:
        raise ValueError(f"the smallest options need {int(smallest)} bytes, over the limit of {int(limit)}")
    choice = _pick(cost, nbytes, 0.0)
    if nbytes[rows, choice].sum() > limit:
        low, high = 0.0, 1.0
        while nbytes[rows, _pick(cost, nbytes, high)].sum() > limit and high < 1e30:
            high *= 4
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


def _spend_leftover(cost: np.ndarray, nbytes: np.ndarray, choice: np.ndarray, limit: float) -> np.ndarray:
    """Greedy upgrades (largest cost saved per extra byte) while they fit."""
    rows = np.arange(cost.shape[0])
    choice = choice.copy()
    while True:
        left = limit - nbytes[rows, choice].sum()
        extra = nbytes - nbytes[rows, choice][:, None]  # (N, O)
        saved = cost[rows, choice][:, None] - cost
        ok = (saved > 0) & (extra <= left)
        if not ok.any():
            return choice
        ratio = np.where(ok, saved / np.maximum(extra, 1.0), -1.0)
        head, option = np.unravel_index(int(ratio.argmax()), ratio.shape)
        choice[head] = option
