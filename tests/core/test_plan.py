"""Plan: validation, serialisation and byte prediction."""

import dataclasses
import math

import pytest

from adaptive_kv.plan import HeadBudget, Layout, Plan


def test_full_plan_is_identity_and_predicts_dynamic_cache_bytes():
    plan = Plan.full(3, 2, group_size=16, recent_window=8)
    assert plan.is_identity and not plan.tracks_scores
    full = plan.full_nbytes(100, 64, 4)
    assert full == 2 * 3 * 2 * 100 * 64 * 4
    # only the per-group index (4 bytes a group) comes on top of the raw tensors
    assert 0 <= plan.nbytes(100, 64, 4) - full < 0.001 * full


def test_json_round_trip():
    plan = Plan(
        ((HeadBudget(64, 4, 2), HeadBudget(None, 16, 16)), (HeadBudget(128, 8, 8), HeadBudget(40, 2, 2))),
        sink_tokens=4, recent_window=32, group_size=32, scorer="key_norm",
    )
    assert Plan.from_json(plan.to_json()) == plan
    noted = dataclasses.replace(plan, note="outside the trained range")
    assert Plan.from_json(noted.to_json()) == noted and noted.summary()["note"] == "outside the trained range"
    assert "note" not in plan.to_dict() and "note" not in plan.summary()
    with pytest.raises(ValueError, match="note must be None or a string, got int"):
        dataclasses.replace(plan, note=3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(key_bits=3), "key_bits"),
        (dict(value_bits=1), "value_bits"),
        (dict(keep=-1), "keep"),
        (dict(keep=float("nan")), "keep"),
        (dict(keep=10), "keep must be >= sink_tokens \\+ recent_window"),
    ],
)
def test_bad_head_budgets_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Plan.uniform(2, 2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(group_size=24), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(scorer="random"), "scorer"),
    ],
)
def test_bad_layout_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Plan.full(2, 2, **kwargs)


def test_ragged_tables_and_fractions_rejected():
    with pytest.raises(ValueError, match=r"heads\[1\]"):
        Plan(((HeadBudget(),), (HeadBudget(), HeadBudget())))
    with pytest.raises(ValueError, match="keep_fraction"):
        Plan.uniform_fraction(2, 2, 100, keep_fraction=1.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        Plan.uniform_fraction(2, 2, 100, keep_fraction=math.nan)
    with pytest.raises(ValueError, match="unknown plan fields"):
        Plan.from_dict({"heads": [[{}]], "bits": 4})


def test_prediction_scales_with_bits():
    sizes = [Plan.uniform(4, 2, keep=None, key_bits=b).nbytes(1024, 64, 2) for b in (16, 8, 4, 2)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[3] < 0.25 * sizes[0]


def test_layout_is_a_frozen_validated_value_that_plans_round_trip():
    layout = Layout(sink_tokens=2, recent_window=6, group_size=8, scorer="key_norm", selection="shared")
    assert layout.floor == 8 and Plan.full(2, 3, **layout.keywords()).layout() == layout
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.sink_tokens = 3
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        Layout(group_size=24)
