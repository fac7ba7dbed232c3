"""Errors of the planning contract that callers branch on by type."""

from __future__ import annotations


class InfeasibleBudget(ValueError):
    """A budget below the least a policy can reach for one request.

    `minimum` is that least budget (a fraction of the full-precision bytes), so a caller can
    report it or retry at it without reading the message.
    """

    def __init__(self, budget: float, minimum: float, seq_len: int, why: str) -> None:
        super().__init__(f"budget {budget} is below the minimum feasible {minimum:.4f} for seq_len={seq_len} ({why})")
        self.budget, self.minimum, self.seq_len, self.why = budget, minimum, seq_len, why

    def __reduce__(self):
        # the default rebuilds from the message alone; workers (ray) pickle errors across processes
        return type(self), (self.budget, self.minimum, self.seq_len, self.why)
