"""Argument types shared by every `adaptive-kv` subcommand (the core's, training's and the service's flags).

Each turns one flag's text into its value or raises argparse.ArgumentTypeError, which argparse
reports as a one-line usage error.
"""

from __future__ import annotations

import argparse


def fraction(text: str) -> float:
    """A number in (0, 1] (a budget, a keep fraction)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def positive(text: str) -> int:
    """An integer >= 1 (a count, a length)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def csv(text: str) -> tuple[str, ...]:
    """A non-empty comma-separated list of names (blank items dropped)."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("must be a comma-separated list")
    return items


def budgets(text: str) -> tuple[float, ...]:
    """A comma-separated list of fractions in (0, 1]."""
    return tuple(fraction(x) for x in csv(text))


def csv_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= 1."""
    return tuple(positive(x) for x in csv(text))
