"""benchmarks/scorer_allocation.py: crossing a scorer's allocation and ranking with the exact scores'."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "scorer_allocation", Path(__file__).resolve().parents[2] / "benchmarks" / "scorer_allocation.py")
scorer_allocation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scorer_allocation)


def _exact() -> torch.Tensor:
    # two layers x two heads x 8 tokens; head (0, 0) holds most of the mass, head (1, 1) almost none
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([[8.0, 2.0], [1.0, 0.25]])[..., None]
    return torch.rand(2, 2, 8, generator=gen) * scale


def test_a_perfect_scorer_keeps_what_the_exact_scores_keep_in_every_crossing():
    exact = _exact()
    masses = scorer_allocation.crossed(exact, exact.clone(), 0.25)
    assert len({round(m[0], 6) for m in masses.values()}) == 1


def test_a_scorer_right_within_heads_but_off_in_scale_loses_only_through_its_counts():
    exact = _exact()
    # the same order in every head, but every head scored on one scale: the counts go wrong, the ranking not
    predicted = exact / exact.amax(-1, keepdim=True)
    masses = scorer_allocation.crossed(exact, predicted, 0.25)
    assert masses["exact counts, predicted tokens"] == pytest.approx(masses["exact"])
    assert masses["predicted"][0] < masses["exact"][0] - 0.05
    assert masses["predicted counts, exact tokens"] == pytest.approx(masses["predicted"])


def test_a_scorer_with_each_heads_scores_on_the_wrong_tokens_loses_only_within_heads():
    exact = _exact()
    # each head's scores reversed along the tokens: the per-head value sets (so the counts) are the exact ones
    predicted = exact.flip(-1)
    masses = scorer_allocation.crossed(exact, predicted, 0.25)
    assert masses["predicted counts, exact tokens"] == pytest.approx(masses["exact"])
    assert masses["predicted"][0] < masses["exact"][0] - 0.05
    # by hand: keep 8 of 32 globally, the kept count of each head taken from its best tokens
    count = 8
    flat = exact.flatten()
    owners = flat.argsort(descending=True)[:count] // 8
    counts = torch.bincount(owners, minlength=4).view(2, 2)
    kept = sum(exact[l, h].sort(descending=True).values[: counts[l, h]].sum() for l in range(2) for h in range(2))
    assert masses["exact"][0] == pytest.approx((kept / exact.sum()).item())
