"""Bounded prefill: plans applied layer by layer as each layer's forward ends (tier 1, tiny models)."""

from __future__ import annotations

import pytest
import torch

from adaptive_kv import CompressedCache, Plan
from adaptive_kv.plan import Layout
from adaptive_kv.policies import get_policy
from adaptive_kv.reconstruction import ReconstructionRequest
from conftest import build_tiny_model

HEAD_DIM, DTYPE_BYTES = 16, 4  # llama_gqa: head_dim 16, fp32
PROMPT = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
POLICIES = ["snapkv", "tova", "h2o", "kivi", "pyramidkv", "ada_kv", "hybrid", "streaming_llm"]


def _layer_provider(policy, budget, num_layers, plans):
    def provider(stats, layer_idx):
        plans.append(policy.plan_layer(stats, layer_idx, num_layers, budget))
        return plans[-1]
    return provider


def _decode(model, cache, steps=20):
    logits = []
    with torch.no_grad():
        logits.append(model(PROMPT, cache=cache).logits[0, -1])
        for token in range(steps):  # flushes and H2O evictions
            logits.append(model(torch.tensor([[7 + token]]), cache=cache).logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("name", POLICIES)
def test_per_layer_mode_equals_end_of_prefill_with_the_same_plan(name):
    model = build_tiny_model("llama_gqa")
    policy, budget, plans = get_policy(name), 0.3, []
    cache = CompressedCache(model, layer_plan_provider=_layer_provider(policy, budget, 2, plans),
                            stats_config=policy.stats_config())
    got = _decode(model, cache)
    assert len(plans) == 2 and cache.plan == Plan.stack(plans)
    # the same plan through the end-of-prefill path: identical cache, identical logits
    reference = CompressedCache(model, plan_provider=lambda stats: policy.plan_per_layer(
        stats, budget), stats_config=policy.stats_config())
    want = _decode(model, reference)
    assert reference.plan == cache.plan
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert cache.nbytes() == reference.nbytes()


@pytest.mark.parametrize("name", POLICIES)
def test_per_layer_mode_meets_the_budget_by_real_bytes(name):
    model = build_tiny_model("llama_gqa")
    policy, budget = get_policy(name), 0.3
    cache = CompressedCache(model, layer_plan_provider=_layer_provider(policy, budget, 2, []),
                            stats_config=policy.stats_config())
    with torch.no_grad():
        model(PROMPT, cache=cache)
    assert cache.nbytes() == cache.predicted_nbytes() <= budget * cache.full_nbytes()


def test_per_layer_peak_stays_below_the_full_cache():
    model = build_tiny_model("llama_gqa")  # 2 layers: the peak is one full layer plus the other compressed
    policy = get_policy("snapkv")
    bounded = CompressedCache(model, layer_plan_provider=_layer_provider(policy, 0.25, 2, []))
    end = CompressedCache(model, plan_provider=lambda s: policy.plan(s, 0.25))
    for cache in (bounded, end):
        with torch.no_grad():
            model(PROMPT, cache=cache)
    full = end.full_nbytes()
    assert end.prefill_peak_nbytes == full  # every layer at full precision until the last one ran
    one_layer = full // 2
    assert bounded.prefill_peak_nbytes == one_layer + bounded.layers[0].nbytes()
    assert bounded.prefill_peak_nbytes < 0.7 * full


def test_learned_plans_within_each_layer(tmp_path):
    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.stats import FEATURE_NAMES

    torch.manual_seed(0)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=HEAD_DIM), feature_names=FEATURE_NAMES,
        grid=option_grid(), layout=Layout(sink_tokens=4, recent_window=32, group_size=32, scorer="snapkv",
                                        selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1,
    )
    policy = get_policy("learned", path=str(save_controller(tmp_path, config, config.build())))
    model = build_tiny_model("llama_gqa")
    plans = []
    cache = CompressedCache(model, layer_plan_provider=_layer_provider(policy, 0.25, 2, plans),
                            stats_config=policy.stats_config())
    with torch.no_grad():
        model(PROMPT, cache=cache)
    for plan in plans:  # each layer within its own share of the budget
        assert plan.nbytes(300, HEAD_DIM, DTYPE_BYTES) <= 0.25 * plan.full_nbytes(300, HEAD_DIM, DTYPE_BYTES)
    assert cache.nbytes() == cache.predicted_nbytes()
    # the head identities are the model's: layer 1's decision reads the embedding of heads 2 and 3
    stats = cache.stats
    torch.testing.assert_close(policy.predict(stats.layer(1), first_layer=1), policy.predict(stats)[1:], atol=1e-5, rtol=0)


def test_reconstruction_needs_the_whole_prefill():
    model = build_tiny_model("llama_gqa")
    policy = get_policy("kvzip")
    request = ReconstructionRequest(tuple(PROMPT[0].tolist()), (5, 6, 7), (8, 9))
    with pytest.raises(ValueError, match="reconstruction scores need every layer"):
        CompressedCache(model, layer_plan_provider=_layer_provider(policy, 0.25, 2, []),
                        stats_config=policy.stats_config(), reconstruction=request)


def test_layer_plan_provider_must_return_one_layer_plans():
    model = build_tiny_model("llama_gqa")
    cache = CompressedCache(model, layer_plan_provider=lambda stats, idx: Plan.full(2, 2))
    with pytest.raises(ValueError, match="one-layer Plan"), torch.no_grad():
        model(PROMPT, cache=cache)


@pytest.mark.parametrize("name", ["snapkv", "tova", "kivi", "pyramidkv", "ada_kv"])
def test_layer_independent_policies_plan_the_same_per_layer(name):
    # these decide each layer on its own (PyramidKV's schedule needs no statistics), so the plan made
    # layer by layer must equal the whole-request plan: an independent check of plan_layer
    model = build_tiny_model("llama_gqa")
    policy = get_policy(name)
    cache = CompressedCache(model, capture=True, stats_config=policy.stats_config())
    with torch.no_grad():
        model(PROMPT, cache=cache)
    whole = policy.plan(cache.stats, 0.3)
    assert policy.plan_per_layer(cache.stats, 0.3) == whole
