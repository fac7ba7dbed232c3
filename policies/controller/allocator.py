"""Multiple-choice knapsack: one option per head, least total cost within a byte limit.

Each head's options are reduced to the lower convex hull of (bytes, cost); the hull's upgrades
(cost saved per extra byte, falling along each head's hull) are taken globally in order of that
ratio while they fit: the integral part of the LP relaxation's optimum (the greedy for the
multiple-choice knapsack, Sinha and Zoltners 1979). Bytes still left then go to the best upgrades
that fit, hull or not. Small cases are checked against brute force and dynamic programming in the
tests.

`allocate` runs the Numba-compiled walk (`allocator_numba`); `allocate_reference` is the same greedy in
NumPy, kept beside it as the readable reference the compiled one is tested against (a decision for
90 heads must take well under 1 ms, and NumPy's per-call overhead alone is over half of that).
"""

from __future__ import annotations

import functools

import numpy as np

from adaptive_kv.policies.controller.allocator_numba import allocate_numba


def _hull_steps(cost: np.ndarray, nbytes: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, ...]:
    """Upgrades along every head's lower convex hull from `start`: (ratio, head, from, to, extra) arrays.

    Gift wrapping, all heads at once: from its current option a head moves to the option with the
    largest cost saved per extra byte, until none saves cost; finished heads drop out.
    """
    heads, cur, parts = np.arange(cost.shape[0]), start, []
    while heads.size:
        c, b, at = cost[heads], nbytes[heads], np.arange(heads.size)
        extra = b - b[at, cur][:, None]
        saved = c[at, cur][:, None] - c
        ratio = np.divide(saved, extra, out=np.full(extra.shape, -np.inf), where=(extra > 0) & (saved > 0))
        nxt = ratio.argmax(-1)
        best = ratio[at, nxt]
        moving = best > -np.inf
        heads, cur, nxt, best = heads[moving], cur[moving], nxt[moving], best[moving]
        parts.append((best, heads, cur, nxt, nbytes[heads, nxt] - nbytes[heads, cur]))
        cur = nxt
    return tuple(np.concatenate(p) for p in zip(*parts))


def _checked(cost, nbytes, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Both tables as float64 (N, O) arrays; ValueError when even the smallest options do not fit."""
    cost, nbytes = np.ascontiguousarray(cost, dtype=np.float64), np.ascontiguousarray(nbytes, dtype=np.float64)
    smallest = nbytes.min(-1).sum()
    if smallest > limit:
        raise ValueError(f"the smallest options need {int(smallest)} bytes, over the limit of {int(limit)}")
    return cost, nbytes


def allocate(cost, nbytes, limit: float) -> np.ndarray:
    """Option per head (N,) minimising sum cost[n, choice] with sum nbytes[n, choice] <= limit.

    cost, nbytes: (N, O) arrays (NumPy or torch). Raises ValueError when even the smallest options do not fit.
    """
    cost, nbytes = _checked(cost, nbytes, limit)
    return allocate_numba(cost, nbytes, float(limit))


@functools.cache
def warm_up() -> None:
    """Compile (or load from Numba's cache) the allocator once, so no request pays for it."""
    allocate(np.zeros((1, 2)), np.array([[1.0, 2.0]]), 2.0)


def allocate_reference(cost, nbytes, limit: float) -> np.ndarray:
    """`allocate` in NumPy: the reference the compiled walk must equal."""
    cost, nbytes = _checked(cost, nbytes, limit)
    rows = np.arange(cost.shape[0])
    # start from each head's smallest option, the cheapest of equal size
    choice = np.where(nbytes == nbytes.min(-1, keepdims=True), cost, np.inf).argmin(-1)
    ratio, head, src, dst, extra = _hull_steps(cost, nbytes, choice)
    order = np.argsort(-ratio, kind="stable")  # a head's own steps keep their (falling) order
    left = limit - nbytes[rows, choice].sum()
    taken = int(np.searchsorted(np.cumsum(extra[order]), left, side="right"))
    prefix = order[:taken]
    # a head's steps come in walk order, so its last step in the prefix is where it ends
    last = prefix.size - 1 - np.unique(head[prefix][::-1], return_index=True)[1]
    choice[head[prefix][last]] = dst[prefix][last]
    left -= extra[prefix].sum()
    # past the first upgrade that does not fit, later ones of other heads may: a step applies only
    # if its head stands where the step starts (an untaken step blocks the rest of its head's walk)
    rest = order[taken:]
    for i in rest[extra[rest] <= left].tolist():
        h = head[i]
        if choice[h] == src[i] and extra[i] <= left:
            choice[h], left = dst[i], left - extra[i]
    return _spend_leftover(cost, nbytes, choice, limit)


def _spend_leftover(cost: np.ndarray, nbytes: np.ndarray, choice: np.ndarray, limit: float) -> np.ndarray:
    """Greedy upgrades (largest cost saved per extra byte) while they fit, off the hull too."""
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
