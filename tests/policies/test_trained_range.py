"""The range a controller was trained on: recorded in its notes, and which requests fall outside it."""

import pytest

from adaptive_kv.policies.controller.trained_range import LENGTH_REACH, TrainedRange


def test_range_spans_the_training_requests_and_round_trips_through_notes():
    trained = TrainedRange.of([1030, 1024, 1100], [0.25, 0.0625, 0.125])
    assert trained == TrainedRange(1024, 1100, 0.0625, 0.25)
    assert TrainedRange.from_notes({"trained_range": trained.to_notes()}) == trained
    assert TrainedRange.from_notes({"reconstruction": "exact"}) is None  # older files record none


@pytest.mark.parametrize("seq_len, budget, inside", [
    (1024, 0.125, True), (1210, 0.0625, True), (931, 0.25, True), (1024, 0.5, True),  # above max budget: more room
    (1211, 0.125, False), (930, 0.125, False), (1024, 0.03125, False), (2048, 0.125, False),
])
def test_outside_names_what_is_out_of_range(seq_len, budget, inside):
    trained = TrainedRange(1024, 1100, 0.0625, 0.25)
    reason = trained.outside(seq_len, budget)
    assert (reason is None) == inside
    if seq_len > 1100 * LENGTH_REACH:
        assert f"{seq_len} tokens" in reason and "1024-1100" in reason
    elif budget < 0.0625:
        assert "below the lowest the controller was trained on (0.0625)" in reason


@pytest.mark.parametrize("notes, match", [
    ({"trained_range": {"min_length": 10}}, "must be an object with"),
    ({"trained_range": {"min_length": 100, "max_length": 10, "min_budget": 0.1, "max_budget": 0.2}}, "min_length <= max_length"),
    ({"trained_range": {"min_length": 1, "max_length": 10, "min_budget": 0.5, "max_budget": 0.2}}, "min_budget <= max_budget"),
])
def test_bad_notes_are_refused(notes, match):
    with pytest.raises(ValueError, match=match):
        TrainedRange.from_notes(notes)


# ---------------------------------------------------------------------------- the learned policy
def _learned(trained_range: dict | None):
    import dataclasses

    import torch

    from adaptive_kv.plan import Layout
    from adaptive_kv.policies.controller.files import ControllerConfig
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.policies.learned import Learned
    from adaptive_kv.stats import FEATURE_NAMES

    torch.manual_seed(0)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES, grid=option_grid(),
        layout=Layout(sink_tokens=4, recent_window=8, group_size=16, scorer="snapkv", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1,
    )
    if trained_range is not None:
        config = dataclasses.replace(config, notes={"trained_range": trained_range})
    return Learned.from_parts(config, config.build())


@pytest.mark.parametrize("seq_len, budget", [(2000, 0.25), (400, 0.05)])
def test_outside_its_range_the_controller_plans_as_kvzip_and_says_so(seq_len, budget):
    import torch

    from adaptive_kv.policies import get_policy
    from conftest import hand_made_stats

    policy = _learned({"min_length": 300, "max_length": 400, "min_budget": 0.0625, "max_budget": 0.25})
    stats = hand_made_stats(2, 2, seq_len, features=torch.rand(2, 2, len(policy.feature_names)))
    plan = policy.plan(stats, budget)
    kvzip = get_policy("kvzip", scorer="snapkv", sink_tokens=4, recent_window=8, group_size=16).plan(stats, budget)
    assert plan.heads == kvzip.heads and plan.layout() == kvzip.layout()
    assert "outside" in plan.note or "below the lowest" in plan.note
    assert "kvzip" in plan.note and plan.summary()["note"] == plan.note


def test_inside_its_range_or_without_one_the_controller_decides():
    import torch

    from conftest import hand_made_stats

    stats = hand_made_stats(2, 2, 350, features=torch.rand(2, 2, len(_learned(None).feature_names),
                                                          generator=torch.Generator().manual_seed(3)))
    ranged = _learned({"min_length": 300, "max_length": 400, "min_budget": 0.0625, "max_budget": 0.25})
    plain = _learned(None)
    assert ranged.plan(stats, 0.125).note is None
    assert ranged.plan(stats, 0.125) == plain.plan(stats, 0.125)
    assert plain.plan(hand_made_stats(2, 2, 5000), 0.05).note is None  # files without a range: nothing checked


def test_where_kvzip_cannot_reach_the_budget_the_controller_still_plans():
    import torch

    from adaptive_kv.errors import InfeasibleBudget
    from conftest import hand_made_stats

    policy = _learned({"min_length": 300, "max_length": 400, "min_budget": 0.0625, "max_budget": 0.25})
    stats = hand_made_stats(2, 2, 2000, features=torch.rand(2, 2, len(policy.feature_names)))

    class Unreachable:
        def plan(self, stats, budget):
            raise InfeasibleBudget(budget, 0.5, stats.seq_len, "sliding layers")

    policy.__dict__["_fallback"] = Unreachable()  # as kvzip on a model whose sliding layers raise its floor
    plan = policy.plan(stats, 0.25)
    assert plan.heads == policy._decide(stats, 0, 0.25).heads
    assert "kvzip's allocation cannot reach it, so the controller planned" in plan.note
