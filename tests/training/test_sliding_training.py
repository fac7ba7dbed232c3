"""Training and the learned policy on models with sliding-window layers (issue 25): the label plans carry the
model's windows and price a sliding layer's options over the tokens it holds, and the learned policy plans
every layer at its own index, one knapsack over the real full-cache bytes (a sliding layer: its window), so
its plans land in the cache with real bytes equal to the prediction. Tiny random Gemma-3 (sliding and global
layers), Mistral (every layer slides) and Qwen2 (upper layers slide) from tests/conftest.py; no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAMILY_WINDOW, build_family_model

# one trial layout of the smoke search space: floor 12 fits a 24-token window, so sliding layers evict too
TRIAL = dict(recent_window=8, group_size=16, grid="global")
SLIDING = ("gemma3", "mistral", "qwen2_sliding")
CONTEXT = 150  # past every window: a sliding layer holds FAMILY_WINDOW - 1 = 23 tokens, a global one 150


@pytest.fixture(scope="module")
def models():
    return {family: build_family_model(family) for family in SLIDING}


def _ids(tokenizer, count: int = CONTEXT) -> list[int]:
    ids = tokenizer("The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 20).input_ids
    return ids[:count]


def _trial():
    from adaptive_kv.training.objective import TrialConfig

    return TrialConfig(**TRIAL)


def _captured(model, tokenizer):
    from adaptive_kv.prefill import capture

    return capture(model, tokenizer, _ids(tokenizer), _trial().stats_config()).cache


@pytest.mark.parametrize("family", SLIDING)
def test_label_option_plans_carry_the_windows_and_fractions_of_what_each_layer_holds(family, models, tiny_tokenizer):
    from adaptive_kv.policies.controller.options import HeadOption
    from adaptive_kv.training.labels import option_plan

    captured = _captured(models[family], tiny_tokenizer)
    trial, windows = _trial(), captured.windows
    assert windows is not None and FAMILY_WINDOW in windows
    layout, grid = trial.layout(), trial.options()
    held = [CONTEXT if w is None else FAMILY_WINDOW - 1 for w in windows]
    half = option_plan(HeadOption(0.5, 16, 16), captured.num_layers, captured.num_kv_heads, CONTEXT, layout, windows=windows)
    assert half.windows == windows
    assert [row[0].keep for row in half.heads] == [max(layout.floor, round(0.5 * n)) for n in held]
    for option in grid:
        plan = option_plan(option, captured.num_layers, captured.num_kv_heads, CONTEXT, layout, captured.stats, windows)
        fork = captured.fork(plan)  # the cache refuses a plan without the model's windows
        assert fork.nbytes() == plan.nbytes(CONTEXT, captured.head_dim, 4)
        for layer, row in enumerate(plan.heads):
            assert all(b.keep is None or layout.floor <= b.keep < held[layer] for b in row), (option, layer, row)


@pytest.mark.parametrize("family", SLIDING)
def test_global_shares_rank_each_group_of_layers_over_the_tokens_it_holds(family, models, tiny_tokenizer):
    """A head's share of the global top (the global options' keeps) is ranked among the layers that hold the
    same tokens, over those tokens, as a policy plans them: share x held tokens is its count in that top."""
    from adaptive_kv.stats import GLOBAL_SHARE_FRACTIONS, RECON_GLOBAL_SHARE

    stats = _captured(models[family], tiny_tokenizer).stats
    groups = stats.window_groups()
    assert len(groups) == (1 if family == "mistral" else 2)
    for tokens, layers in groups.items():
        for fraction, name in zip(GLOBAL_SHARE_FRACTIONS, RECON_GLOBAL_SHARE):
            counts = stats.feature(name)[list(layers)] * tokens
            torch.testing.assert_close(counts, counts.round(), atol=1e-3, rtol=0)
            entries = len(layers) * stats.num_kv_heads * tokens
            assert round(counts.sum().item()) == max(1, math.ceil(fraction * entries)), (tokens, name)
            assert counts.max() <= tokens


@pytest.mark.parametrize("family", SLIDING)
def test_label_plans_are_the_plans_the_learned_policy_makes_from_each_option(family, models, tiny_tokenizer):
    """A label measures the plan the policy executes when it picks that option: the same keep on every head,
    a global option's from the head's share of what its own layer holds."""
    from adaptive_kv.policies.learned import Learned
    from adaptive_kv.training.labels import option_plan
    from adaptive_kv.training.objective import controller_config

    model = models[family]
    captured = _captured(model, tiny_tokenizer)
    config = controller_config(_trial(), model, "tiny")
    policy = Learned.from_parts(config, config.build())
    _, _, keeps = policy.option_tables(captured.stats, 0)  # the global options' keeps (N, G), N = layer * H + head
    layout, heads, windows = config.layout, captured.num_kv_heads, captured.windows
    glob = [o for o in config.grid if o.allocation == "global"]
    assert glob and keeps.shape[1] == len(glob)
    counted = 0
    for g, option in enumerate(glob):
        plan = option_plan(option, captured.num_layers, heads, CONTEXT, layout, captured.stats, windows)
        for layer, row in enumerate(plan.heads):
            held = captured.stats.layer_tokens(layer)
            for h, budget in enumerate(row):
                keep = int(keeps[layer * heads + h, g])
                assert budget.keep == (None if keep >= held else keep), (option, layer, h)
                share = captured.stats.feature(option.share_feature)[layer, h].item()
                counted += windows[layer] is not None and share > 0
    assert counted  # some sliding head has tokens among its group's global top: its keep comes from them


@pytest.mark.parametrize("family", ("gemma3", "mistral"))
def test_labels_of_a_sliding_model(family, models, tiny_tokenizer):
    from adaptive_kv.training.calibration import CalibrationRequest
    from adaptive_kv.training.labels import collect_labels

    ids = _ids(tiny_tokenizer, CONTEXT + 12)
    request = CalibrationRequest("passkey", "query_agnostic", tuple(ids[:CONTEXT]), tuple(ids[CONTEXT:]), 4, 0, 0, CONTEXT)
    trial = _trial()
    labels = collect_labels(models[family], tiny_tokenizer, request, trial.options(), trial.layout(),
                            trial.stats_config(), trial.label_target())
    assert labels.distortion.shape == (3, 2, len(trial.options()))
    assert torch.isfinite(labels.distortion).all() and (labels.distortion >= 0).all()
    assert (labels.distortion[..., 0] == 0).all()  # keep all at 16 bits: the head's own output
    assert (labels.distortion.amax(-1) > 0).all()  # every layer, sliding ones too, has options that cost


def _controller(model, expensive: set[int]):
    """A controller whose predicted distortion depends on the head's identity only: heads of `expensive` layers
    lose much under every option but keep-all at 16 bits, the other layers' heads lose nothing under any."""
    from adaptive_kv.policies.learned import Learned
    from adaptive_kv.training.objective import TrialConfig, controller_config

    config = controller_config(TrialConfig(**TRIAL, layers=1, hidden=8, embedding=8), model, "tiny")
    net = config.build()
    heads, options, features = model.config.num_key_value_heads, len(config.grid), len(config.feature_names)
    assert config.grid[0].keep_fraction is None and (config.grid[0].key_bits, config.grid[0].value_bits) == (16, 16)
    first, final = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # hidden unit n fires for head identity n (layer * heads + head) alone
        net.head_embedding.weight.copy_(torch.eye(net.head_embedding.weight.shape[0], 8))
        first.weight.zero_(), first.bias.zero_()
        first.weight[:, features:] = torch.eye(8)
        final.weight.zero_(), final.bias.fill_(math.log(1e-6))
        unit = torch.nn.functional.gelu(torch.tensor(1.0)).item()
        for layer in expensive:
            for h in range(heads):
                final.weight[1:options, layer * heads + h] = (math.log(1e3) - math.log(1e-6)) / unit
    return Learned.from_parts(config, net)


@pytest.mark.parametrize("family,expensive,budget", [
    ("gemma3", {0, 2}, 0.5),  # sliding layers kept, the global one compressed
    ("gemma3", {1}, 0.95),  # the global layer kept, the sliding ones compressed
    ("gemma3", {0}, 0.5),  # one sliding layer kept, the other compressed: each read at its own index
    ("mistral", {2}, 0.85),
    ("qwen2_sliding", {1}, 0.5),
])
def test_learned_plans_every_layer_at_its_own_index_within_the_budget(family, expensive, budget, models, tiny_tokenizer):
    model = models[family]
    policy = _controller(model, expensive)
    captured = _captured(model, tiny_tokenizer)
    stats = captured.stats
    plan = policy.plan(stats, budget)
    assert plan.windows == captured.windows
    for layer, row in enumerate(plan.heads):
        if layer in expensive:
            assert all(b.is_identity for b in row), (layer, row)
        else:  # nothing to lose: the fewest bytes
            assert all(b.keep == policy.config.layout.floor for b in row), (layer, row)
    fork = captured.fork(plan)
    predicted = plan.nbytes(stats.seq_len, stats.head_dim, stats.dtype_bytes)
    assert fork.nbytes() == predicted <= budget * fork.full_nbytes()
    assert fork.full_nbytes() == plan.full_nbytes(stats.seq_len, stats.head_dim, stats.dtype_bytes)


@pytest.mark.parametrize("family", SLIDING)
def test_learned_meets_every_budget_on_sliding_models_or_names_its_minimum(family, models, tiny_tokenizer):
    from adaptive_kv.errors import InfeasibleBudget
    from adaptive_kv.policies.learned import Learned
    from adaptive_kv.training.objective import controller_config

    model = models[family]
    config = controller_config(_trial(), model, "tiny")
    torch.manual_seed(0)
    policy = Learned.from_parts(config, config.build())
    captured = _captured(model, tiny_tokenizer)
    stats = captured.stats
    planned = 0
    for budget in (0.95, 0.8, 0.65, 0.45, 0.3, 0.2, 0.1):
        try:
            plan = policy.plan(stats, budget)
        except InfeasibleBudget as err:
            assert err.minimum > budget
            with pytest.raises(InfeasibleBudget):
                policy.plan(stats, err.minimum * 0.999)
            budget = min(1.0, err.minimum * 1.001)  # the named minimum is reachable
            plan = policy.plan(stats, budget)
        planned += 1
        fork = captured.fork(plan)  # positions a sliding layer stores count: within budget in real bytes
        assert fork.nbytes() == plan.nbytes(stats.seq_len, stats.head_dim, stats.dtype_bytes) <= budget * fork.full_nbytes()
    assert planned == 7


@pytest.mark.parametrize("family", SLIDING)
def test_learned_plans_sliding_layers_one_by_one_within_each_layers_bytes(family, models, tiny_tokenizer):
    """Bounded prefill's `plan_layer`: each layer at its own index, within budget x what that layer holds."""
    model = models[family]
    policy = _controller(model, expensive=set(range(model.config.num_hidden_layers)))  # every head wants it all
    captured = _captured(model, tiny_tokenizer)
    stats, budget = captured.stats, 0.8
    plan = policy.plan_per_layer(stats, budget)
    assert plan.windows == captured.windows
    for layer in range(stats.num_layers):
        one = policy.plan_layer(stats.layer(layer), layer, stats.num_layers, budget)
        assert one.heads[0] == plan.heads[layer]
        held = stats.layer_tokens(layer)
        torch.testing.assert_close(policy.predict(stats.layer(layer), layer), policy.predict(stats)[layer:layer + 1])
        spent = sum(plan.head_nbytes(layer, h, stats.seq_len, stats.head_dim, stats.dtype_bytes)
                    for h in range(stats.num_kv_heads))
        assert spent <= budget * 2 * stats.num_kv_heads * held * stats.head_dim * stats.dtype_bytes
    fork = captured.fork(plan)
    assert fork.nbytes() == plan.nbytes(stats.seq_len, stats.head_dim, stats.dtype_bytes) <= budget * fork.full_nbytes()
