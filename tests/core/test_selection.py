"""Shared token selection (Plan.selection): one ranking per layer, nested kept sets (tier 1)."""

import pytest
import torch
from transformers import DynamicCache

from adaptive_kv import CompressedCache, HeadBudget, Plan

LAYOUT = dict(sink_tokens=4, recent_window=8, group_size=16)
SEQ_LEN = 160


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


def _positions(layer) -> list[list[int]]:
    """Original positions each head holds (sinks, packed groups, residual), sorted."""
    heads = layer.residual.lengths.numel()
    held = [list(range(layer.sinks[0].shape[1])) for _ in range(heads)]
    parts = [(b.token_heads(), b.positions) for b in layer.buckets.values()]
    parts.append((layer.residual.token_heads(), layer.residual.positions))
    for token_heads, positions in parts:
        for h, p in zip(token_heads.tolist(), positions.tolist()):
            held[h].append(p)
    return [sorted(x) for x in held]


def _capture(model, ids):
    cache = CompressedCache(model, capture=True)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


def _shared_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Independent spec of the middle's shared score: min-shift, divide by the sum, mean over heads."""
    middle = scores[:, LAYOUT["sink_tokens"] : SEQ_LEN - LAYOUT["recent_window"]].double()
    middle = middle - middle.min(dim=1, keepdim=True).values
    return (middle / middle.sum(dim=1, keepdim=True)).mean(0)


def _assert_top_k(ranking: torch.Tensor, held_middle: list[int], k: int) -> None:
    """`held_middle` (positions) is a top-k of `ranking` (ties, e.g. of max-pooled scores, may go either way)."""
    idx = torch.tensor(held_middle) - LAYOUT["sink_tokens"]
    assert len(held_middle) == k
    rest = torch.ones(ranking.numel(), dtype=torch.bool)
    rest[idx] = False
    assert ranking[idx].min() >= ranking[rest].max() - 1e-6


@pytest.mark.parametrize("scorer", ["snapkv", "key_norm"])
def test_shared_heads_hold_the_top_of_one_ranking(llama_gqa, scorer):
    captured = _capture(llama_gqa, _ids(SEQ_LEN))
    plan = Plan.uniform(2, 2, keep=60, key_bits=4, scorer=scorer, selection="shared", **LAYOUT)
    cache = captured.fork(plan)
    for layer_idx, layer in enumerate(cache.layers):
        held = _positions(layer)
        sinks, window = LAYOUT["sink_tokens"], LAYOUT["recent_window"]
        assert held[0] == held[1]
        assert held[0][:sinks] == list(range(sinks)) and held[0][-window:] == list(range(SEQ_LEN - window, SEQ_LEN))
        ranking = _shared_ranking(captured.stats.token_scores[scorer][layer_idx])
        _assert_top_k(ranking, held[0][sinks:-window], 60 - sinks - window)
    assert cache.nbytes() == cache.predicted_nbytes()


def test_per_head_selection_differs_on_the_same_prefill(llama_gqa):
    """Guards the test above: with per-head ranking the two heads do not pick the same tokens."""
    captured = _capture(llama_gqa, _ids(SEQ_LEN))
    scores = captured.stats.token_scores["snapkv"][0]
    middle = slice(LAYOUT["sink_tokens"], SEQ_LEN - LAYOUT["recent_window"])
    k = 60 - LAYOUT["sink_tokens"] - LAYOUT["recent_window"]
    tops = [set(scores[h, middle].topk(k).indices.tolist()) for h in range(2)]
    assert tops[0] != tops[1]


def test_unequal_keeps_nest(llama_gqa):
    captured = _capture(llama_gqa, _ids(SEQ_LEN))
    row = (HeadBudget(44, 16, 16), HeadBudget(92, 2, 4))
    cache = captured.fork(Plan((row, row), scorer="snapkv", selection="shared", **LAYOUT))
    for layer in cache.layers:
        small, large = _positions(layer)
        assert len(small) == 44 and len(large) == 92 and set(small) < set(large)
    assert cache.nbytes() == cache.predicted_nbytes()


def test_decode_eviction_keeps_shared_heads_identical(llama_gqa):
    plan = Plan.uniform(2, 2, keep=40, key_bits=8, scorer="snapkv", selection="shared", **LAYOUT)
    cache = CompressedCache(llama_gqa, plan=plan, eviction_slack=0)
    with torch.no_grad():
        llama_gqa(_ids(SEQ_LEN), cache=cache)
        for token in _ids(50, seed=3)[0].tolist():  # > recent window + group: flushes, then evicts
            llama_gqa(torch.tensor([[token]]), cache=cache)
    for layer in cache.layers:
        held = _positions(layer)
        assert held[0] == held[1]
        assert len(held[0]) <= 40 + LAYOUT["recent_window"] + LAYOUT["group_size"]
        assert max(held[0]) == SEQ_LEN + 49  # the newest token is always held
        assert any(p >= SEQ_LEN for p in held[0][: -LAYOUT["recent_window"]])  # decode tokens were packed


def test_shared_identity_plan_equals_dynamic_cache(llama_gqa):
    ids = _ids(97)
    greedy = dict(max_new_tokens=10, do_sample=False)
    ref = llama_gqa.generate(ids, cache=DynamicCache(config=llama_gqa.config), **greedy)
    plan = Plan.full(2, 2, selection="shared", **LAYOUT)
    assert plan.nbytes(97, 16, 4) == Plan.full(2, 2, **LAYOUT).nbytes(97, 16, 4)
    assert torch.equal(llama_gqa.generate(ids, cache=CompressedCache(llama_gqa, plan=plan), **greedy), ref)


def test_selection_is_validated_and_serialised():
    with pytest.raises(ValueError, match=r"selection must be one of \('per_head', 'shared'\)"):
        Plan.full(1, 1, selection="mean")
    plan = Plan.uniform(1, 2, keep=50, selection="shared", **LAYOUT)
    assert Plan.from_json(plan.to_json()) == plan and plan.summary()["selection"] == "shared"
    # positions cost 4 bytes per evictable token, and only when tokens can be evicted
    per_head = Plan.uniform(1, 2, keep=50, **LAYOUT)
    assert plan.nbytes(200, 16, 4) - per_head.nbytes(200, 16, 4) == 2 * (50 - 4) * 4
