"""benchmarks/replace_policy_rows.py: a retrained policy's rows replace the old ones only on the same samples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "replace_policy_rows", Path(__file__).resolve().parents[2] / "benchmarks" / "replace_policy_rows.py")
replace_policy_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replace_policy_rows)


def _results(learned: float, full: float = 60.0, seed: int = 0) -> dict:
    rows = [{"policy": "full", "budget": 1.0, "task": "niah_single", "score": full},
            {"policy": "kvzip", "budget": 0.125, "task": "niah_single", "score": 30.0},
            {"policy": "learned", "budget": 0.125, "task": "niah_single", "score": learned}]
    return {"model": "m", "context_length": 1024, "protocol": "query_aware", "seed": seed, "samples_per_task": 10,
            "max_new_tokens_cap": 12, "wall_time_s": 1.0, "records": rows}


def test_rows_are_replaced_and_the_old_ones_kept():
    out = replace_policy_rows.replace_rows(_results(20.0), _results(50.0), "learned", "before")
    scores = {(r["policy"], r["budget"]): r["score"] for r in out["records"]}
    assert scores == {("full", 1.0): 60.0, ("kvzip", 0.125): 30.0, ("learned", 0.125): 50.0}
    assert [r["score"] for r in out["previous_rows"]["before"]] == [20.0]


@pytest.mark.parametrize("fresh, message", [(_results(50.0, seed=1), "seed differs"),
                                            (_results(50.0, full=70.0), "full cache scores differ")])
def test_other_samples_are_refused(fresh, message):
    with pytest.raises(ValueError, match=message):
        replace_policy_rows.replace_rows(_results(20.0), fresh, "learned", "before")


def test_every_policy_is_replaced_with_star():
    committed, fresh = _results(20.0), _results(50.0)
    fresh["records"][1] = {**fresh["records"][1], "score": 40.0}
    out = replace_policy_rows.replace_rows(committed, fresh, "*", "old_cache")
    scores = {(r["policy"], r["budget"]): r["score"] for r in out["records"]}
    assert scores == {("full", 1.0): 60.0, ("kvzip", 0.125): 40.0, ("learned", 0.125): 50.0}
    assert sorted(r["score"] for r in out["previous_rows"]["old_cache"]) == [20.0, 30.0]


def test_two_policies_replaced_under_one_label_keep_both_old_rows():
    committed, fresh = _results(20.0), _results(50.0)
    fresh["records"][1] = {**fresh["records"][1], "score": 40.0}
    once = replace_policy_rows.replace_rows(committed, fresh, "learned", "new scorer")
    twice = replace_policy_rows.replace_rows(once, fresh, "kvzip", "new scorer")
    kept = {(r["policy"], r["score"]) for r in twice["previous_rows"]["new scorer"]}
    assert kept == {("learned", 20.0), ("kvzip", 30.0)}
    assert {(r["policy"], r["score"]) for r in twice["records"]} == {("full", 60.0), ("kvzip", 40.0), ("learned", 50.0)}
