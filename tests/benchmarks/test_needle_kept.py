"""benchmarks/needle_kept.py: which heads keep a needle under a plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from adaptive_kv.plan import HeadBudget, Plan

_spec = importlib.util.spec_from_file_location(
    "needle_kept", Path(__file__).resolve().parents[2] / "benchmarks" / "needle_kept.py")
needle_kept = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(needle_kept)


def _plan(keeps, selection="per_head") -> Plan:
    return Plan(heads=(tuple(HeadBudget(keep=k) for k in keeps),), sink_tokens=2, recent_window=3,
                scorer="reconstruction", selection=selection)


def test_each_head_keeps_its_sinks_window_and_its_own_top_middle_tokens():
    # 20 tokens: sinks 0-1, window 17-19, middle 2-16; head 0 keeps 8 (3 middle), head 1 keeps 5 (none)
    scores = torch.zeros(2, 20)
    scores[0, [9, 4, 12, 6]] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    scores[1, 9] = 9.0
    kept = needle_kept.kept_positions(_plan([8, 5]), scores, 0, 20)
    assert sorted(kept[0].tolist()) == [0, 1, 4, 9, 12, 17, 18, 19]
    assert sorted(kept[1].tolist()) == [0, 1, 17, 18, 19]
    share = needle_kept.needle_share([kept], [9, 10])
    assert share.tolist() == [[0.5, 0.0]]


def test_shared_selection_ranks_every_head_by_the_layers_mean():
    scores = torch.zeros(2, 20)
    # each head's scores count as a distribution: token 7 holds half of head 0's and all of head 1's
    scores[0, 5], scores[0, 7], scores[1, 7] = 1.0, 1.0, 3.0
    kept = needle_kept.kept_positions(_plan([6, 6], selection="shared"), scores, 0, 20)
    assert 7 in kept[0].tolist() and 5 not in kept[0].tolist() and torch.equal(kept[0], kept[1])


def test_needle_percentile_is_its_rank_among_the_middle_tokens():
    scores = torch.arange(20.0).expand(1, 2, 20)  # later tokens score higher in both heads
    # middle 2..16 (15 tokens): token 16 ranks last-highest (1.0), token 2 lowest (0.0)
    assert needle_kept.percentile_within_heads(scores, [16], 2, 17) == pytest.approx(1.0)
    assert needle_kept.percentile_within_heads(scores, [2, 16], 2, 17) == pytest.approx(0.5)


def test_sliding_layers_are_refused():
    plan = _plan([None, None]).with_windows((4,))
    with pytest.raises(ValueError, match="sliding-window layer"):
        needle_kept.kept_positions(plan, torch.zeros(2, 20), 0, 20)


class _DigitTokenizer:
    def decode(self, ids):
        return "".join(str(i) if i < 10 else "x" for i in ids)


def test_the_needle_is_the_digit_tokens_and_optionally_their_neighbours():
    ids = [11, 12, 3, 4, 13, 14, 15, 7, 16]
    assert needle_kept.digit_positions(_DigitTokenizer(), ids) == [2, 3, 7]
    assert needle_kept.digit_positions(_DigitTokenizer(), ids, around=1) == [1, 2, 3, 4, 6, 7, 8]


def test_bad_indices_are_refused_naming_the_field(capsys):
    with pytest.raises(SystemExit):
        needle_kept.main(["--indices", "2,x", "--output", "unused"])
    assert "--indices: must be comma-separated sample indices, got '2,x'" in capsys.readouterr().err
