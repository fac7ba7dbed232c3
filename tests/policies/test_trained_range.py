"""The range a controller was trained on: recorded in its notes, and which requests fall outside it."""

import pytest

from adaptive_kv.policies.controller.trained_range import LENGTH_REACH, TrainedRange


def test_range_spans_the_training_requests_and_round_trips_through_notes():
    trained = TrainedRange.of([1030, 1024, 1100], [0.25, 0.0625, 0.125])
    assert trained == TrainedRange(1024, 1100, 0.0625, 0.25)
    assert TrainedRange.from_notes({"trained_range": trained.to_notes()}) == trained
    assert TrainedRange.from_notes({"reconstruction": "exact"}) is None  # older files record none


@pytest.mark.parametrize("seq_len, budget, inside", [
    (1024, 0.125, True), (2200, 0.0625, True), (512, 0.25, True), (1024, 0.5, True),  # above max budget: more room
    (2201, 0.125, False), (511, 0.125, False), (1024, 0.03125, False), (4096, 0.125, False),
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
