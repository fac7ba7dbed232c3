"""Decode-time eviction under predicted reconstruction scores ranks new tokens by the same measure."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from adaptive_kv import CompressedCache, HeadBudget, Plan
from adaptive_kv.attention import attention_modules
from adaptive_kv.decode import RunningBatch, decode
from adaptive_kv.predicted_reconstruction import POSITION_FEATURES, PREDICTED_SCORER
from adaptive_kv.stats import StatsConfig
from conftest import build_tiny_model, random_predictor

# every head evicts (finite keeps), two bit-widths, so buckets and the residual both hold scores
PLAN = Plan(((HeadBudget(40, 4, 4), HeadBudget(56, 8, 2)), (HeadBudget(48, 2, 2), HeadBudget(44, 4, 4))),
            sink_tokens=4, recent_window=8, group_size=16, scorer=PREDICTED_SCORER)
STEPS = 40


def _prompt(model, length: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def _independent_scores(predictor, layer_idx: int, hidden: torch.Tensor, position: int) -> torch.Tensor:
    """The linear predictor's formula on the hidden state (1, hidden) of the newest token, at `position`
    (0-based, so the context has position + 1 tokens): (H_kv, 1), written out from its weights."""
    w = predictor.weights
    if predictor.position_features:  # all of them, in order: (relative, log position, log distance, ...)
        t, n = position, position + 1
        where = [t / n, math.log(1 + t), 0.0, (t / n) ** 2, 1.0, math.exp(-t / 64), math.log(n)]
        hidden = torch.cat([hidden, torch.tensor([where])], dim=-1)
    x = (hidden - w["mean"][layer_idx]) / w["std"][layer_idx]
    return (x @ w["w"][layer_idx] + w["b"][layer_idx]).T.clamp(max=0.0).exp().clamp_min(1e-6)


def _stored_scores(cache: CompressedCache, layer_idx: int, head: int) -> tuple[list[float], list[float]]:
    """Scores of the tokens one head holds in packed buckets and in the residual (sinks carry none)."""
    layer = cache.layers[layer_idx]
    buckets = [float(x) for b in layer.buckets.values() for x in b.scores[b.token_heads() == head]]
    residual = [float(x) for x in layer.residual.scores[layer.residual.token_heads() == head]]
    return buckets, residual


@pytest.mark.parametrize("positions", [(), POSITION_FEATURES])
@pytest.mark.parametrize("assembled", [True, False])
def test_new_tokens_get_predicted_scores_and_the_lowest_are_evicted(assembled, positions):
    model = build_tiny_model("llama_gqa")
    predictor = random_predictor(model, position_features=positions)
    cache = CompressedCache(model, plan=PLAN, stats_config=StatsConfig(predictor=predictor), eviction_slack=0,
                            assembled=assembled)
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.__setitem__(mod.layer_idx, kwargs["hidden_states"][0].detach().clone()),
        with_kwargs=True) for m in attention_modules(model)]
    try:
        with torch.no_grad():
            logits = model(_prompt(model), cache=cache, logits_to_keep=1).logits[:, -1]
            evictions = 0
            for step in range(STEPS):
                before = {(l, h): _stored_scores(cache, l, h) for l in range(2) for h in range(2)}
                token = logits.argmax(-1, keepdim=True)
                logits = model(token, cache=cache, logits_to_keep=1).logits[:, -1]
                for layer_idx in range(2):
                    expected = _independent_scores(predictor, layer_idx, seen[layer_idx], 120 + step)[:, 0]
                    for head in range(2):
                        packed, residual = _stored_scores(cache, layer_idx, head)
                        # the new token carries its predicted score
                        new = min(range(len(residual)), key=lambda i: abs(residual[i] - float(expected[head])))
                        assert abs(residual.pop(new) - float(expected[head])) < 1e-5
                        # no old score changed (no attention mass is added); the dropped ones were the
                        # lowest of the packed tokens, the ones eviction ranks
                        old = Counter(sum(before[(layer_idx, head)], []))
                        now = Counter(packed + residual)
                        assert not now - old
                        dropped = list((old - now).elements())
                        assert not dropped or not packed or max(dropped) <= min(packed)
                        assert max(packed + residual) <= 1.0  # no token is protected: all compete by score
                        evictions += len(dropped)
    finally:
        for hook in hooks:
            hook.remove()
    assert evictions > 0


def test_a_batch_scores_each_request_as_alone(llama_gqa):
    # row b of the batched hidden states must reach request b's predictor
    model = llama_gqa
    predictor = random_predictor(model)
    # the predicted-score request is row 1: a batch handing every cache row 0 would score it wrongly
    plans = (Plan(((HeadBudget(40, 2, 8), HeadBudget(60, 4, 4)), (HeadBudget(48, 8, 2), HeadBudget(None, 16, 16))),
                  sink_tokens=4, recent_window=8, group_size=16), PLAN)
    prompts = (_prompt(model, 90, 2), _prompt(model, 120, 1))

    def prefill(plan, ids):
        cache = CompressedCache(model, plan=plan, stats_config=StatsConfig(predictor=predictor), eviction_slack=0)
        with torch.no_grad():
            return cache, model(ids, cache=cache, logits_to_keep=1).logits[:, -1]

    alone = []
    for plan, ids in zip(plans, prompts):
        cache, first = prefill(plan, ids)
        alone.append((decode(model, cache, first, 24).tokens, cache))
    batch = RunningBatch(model)
    joined = [batch.join(*prefill(plan, ids), 24) for plan, ids in zip(plans, prompts)]
    batch.run()
    for seq, (tokens, alone_cache) in zip(joined, alone):
        assert seq.result.tokens == tokens
    for layer_idx in range(2):
        for head in range(2):
            for got, want in zip(_stored_scores(joined[1].cache, layer_idx, head),
                                 _stored_scores(alone[1][1], layer_idx, head)):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_a_layer_evicting_by_predicted_scores_refuses_a_step_without_them():
    model = build_tiny_model("llama_gqa")
    cache = CompressedCache(model, plan=PLAN, stats_config=StatsConfig(predictor=random_predictor(model)))
    with torch.no_grad():
        model(_prompt(model), cache=cache)
    layer = cache.layers[0]
    states = torch.zeros(2, 1, model.config.head_dim)
    with pytest.raises(ValueError, match="layer 0 evicts by predicted scores: each decode step needs the new tokens"):
        layer.append(states, states, cache._kernels(states.device))
