"""The context lengths and budgets a controller was trained on, and where its decisions are trusted.

Training records the range in `controller.json`'s notes (`trained_range`). Within it (lengths up to
LENGTH_REACH times beyond the trained ones, budgets down to the lowest trained one) the controller
decides; outside it the `learned` policy plans with kvzip's global allocation of the same
reconstruction scores and says so in the plan's note, so a request outside the range is never
silently planned by a network that never saw its like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# How far past the trained lengths (each way) the controller's own choices are trusted: requests
# aimed at one length vary by about 6 % (966-1024 tokens at 1024). Further out they lose fidelity
# that kvzip's allocation of the same scores keeps: a controller trained at 1k reads 85.2 against
# 89.8 at 1280 tokens and 1/16, 94.1 against 96.8 at 2048 and 1/8 (20 samples, intervals apart).
LENGTH_REACH = 1.1


@dataclass(frozen=True)
class TrainedRange:
    """Context lengths (tokens) and budgets (fractions of the full cache) seen in training."""

    min_length: int
    max_length: int
    min_budget: float
    max_budget: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"trained_range lengths must satisfy 1 <= min_length <= max_length, "
                             f"got {self.min_length}, {self.max_length}")
        if not 0 < self.min_budget <= self.max_budget <= 1:
            raise ValueError(f"trained_range budgets must satisfy 0 < min_budget <= max_budget <= 1, "
                             f"got {self.min_budget}, {self.max_budget}")

    @classmethod
    def of(cls, lengths: Iterable[int], budgets: Iterable[float]) -> "TrainedRange":
        """The range spanned by the training requests' lengths and the trained budgets."""
        lengths, budgets = list(lengths), list(budgets)
        if not lengths or not budgets:
            raise ValueError("trained_range needs at least one request length and one budget")
        return cls(min(lengths), max(lengths), min(budgets), max(budgets))

    @classmethod
    def from_notes(cls, notes: dict[str, Any]) -> "TrainedRange | None":
        """The range a controller's notes record (None: the files predate it, nothing is checked)."""
        data = notes.get("trained_range")
        if data is None:
            return None
        fields = ("min_length", "max_length", "min_budget", "max_budget")
        if not isinstance(data, dict) or set(data) != set(fields):
            raise ValueError(f"controller notes.trained_range must be an object with {list(fields)}, got {data!r}")
        return cls(int(data["min_length"]), int(data["max_length"]), float(data["min_budget"]),
                   float(data["max_budget"]))

    def to_notes(self) -> dict[str, Any]:
        """The JSON object `from_notes` reads."""
        return {"min_length": self.min_length, "max_length": self.max_length, "min_budget": self.min_budget,
                "max_budget": self.max_budget}

    def outside(self, seq_len: int, budget: float) -> str | None:
        """Why a request of `seq_len` tokens at `budget` lies outside the trusted range; None inside it."""
        low, high = self.min_length / LENGTH_REACH, self.max_length * LENGTH_REACH
        if not low <= seq_len <= high:
            return (f"{seq_len} tokens is outside the controller's range: trained on {self.min_length}-"
                    f"{self.max_length} tokens, trusted from {low:g} to {high:g}")
        if budget < self.min_budget:
            return f"budget {budget:g} is below the lowest the controller was trained on ({self.min_budget:g})"
        return None
