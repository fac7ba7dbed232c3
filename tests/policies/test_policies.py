"""Policies (tier 1): one matrix of every policy x budget on a tiny model, then unit checks."""

import math
import pickle

import pytest
import torch
from transformers import DynamicCache

from adaptive_kv import CompressedCache, Plan
from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.plan import TOKEN_SCORERS, Layout
from adaptive_kv.reconstruction import ReconstructionRequest
from adaptive_kv.policies import available_policies, get_policy, register, tokens_for_budget
from adaptive_kv.policies.base import head_bytes, head_full_bytes
from adaptive_kv.policies.hybrid import Hybrid
from adaptive_kv.stats import FEATURE_NAMES, TOP_MASS_FRACTIONS, AttentionStats
from conftest import build_tiny_model, hand_made_stats, scorer_folder

BUDGETS = (1.0, 0.5, 0.25, 0.125)
# Hand-made stats use a SmolLM2-like head (64 channels, fp16).
HEAD_DIM, DTYPE_BYTES = 64, 2


@pytest.fixture(scope="module")
def tiny_controller(tmp_path_factory):
    """A randomly initialised controller for llama_gqa's shape (2 layers x 2 KV heads, head_dim 16)."""
    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid

    torch.manual_seed(0)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES, grid=option_grid(),
        layout=Layout(sink_tokens=4, recent_window=32, group_size=32, scorer="snapkv", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1,
    )
    return save_controller(tmp_path_factory.mktemp("controller"), config, config.build())


def _prompt(seq_len: int = 300) -> torch.Tensor:
    return torch.randint(0, 1000, (1, seq_len), generator=torch.Generator().manual_seed(0))


def _stats(num_layers=2, num_kv_heads=2, seq_len=1000, features=None, scores=None) -> AttentionStats:
    return hand_made_stats(num_layers, num_kv_heads, seq_len, features=features, scores=scores, head_dim=HEAD_DIM,
                           dtype_bytes=DTYPE_BYTES)


def _fraction(plan: Plan, seq_len: int, head_dim: int = HEAD_DIM, dtype_bytes: int = DTYPE_BYTES) -> float:
    return plan.nbytes(seq_len, head_dim, dtype_bytes) / plan.full_nbytes(seq_len, head_dim, dtype_bytes)


# ------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("selection", ["per_head", "shared"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", available_policies())
def test_policy_matrix(llama_gqa, tiny_controller, name, budget, selection):
    if name == "full" and budget < 1:
        pytest.skip("'full' is the uncompressed reference: it accepts budget 1.0 only")
    if name == "learned":  # the shipped controller is for the embedded model's shape: use one for this model
        if selection == "shared":
            pytest.skip("learned takes its selection from the controller file, not an option")
        policy, plans = get_policy(name, path=str(tiny_controller)), []
    elif name == "kvzap":  # the shipped scorer is for the embedded model's shape too
        policy, plans = get_policy(name, path=scorer_folder(llama_gqa), selection=selection), []
    else:
        policy, plans = get_policy(name, selection=selection), []

    def provider(stats: AttentionStats) -> Plan:
        plans.append(policy.plan(stats, budget))
        return plans[-1]

    ids = _prompt()
    request = ReconstructionRequest(tuple(ids[0].tolist()), (5, 6, 7), (8, 9)) if policy.stats_config().reconstruction else None
    cache = CompressedCache(llama_gqa, plan_provider=provider, stats_config=policy.stats_config(), reconstruction=request)
    try:
        with torch.no_grad():
            llama_gqa(ids, cache=cache)
    except ValueError as exc:
        if "minimum feasible" not in str(exc):
            raise
        pytest.skip(f"{name} cannot reach budget {budget} at 300 tokens: {exc}")
    (plan,) = plans
    assert Plan.from_json(plan.to_json()) == plan and (plan.num_layers, plan.num_kv_heads) == (2, 2)
    assert cache.nbytes() == cache.predicted_nbytes()  # real bytes, not a prediction
    assert cache.nbytes() <= budget * cache.full_nbytes() * 1.01
    with torch.no_grad():  # the plan also runs through decode (flush, H2O eviction)
        for token in (7, 8, 9):
            assert torch.isfinite(llama_gqa(torch.tensor([[token]]), cache=cache).logits).all()
    if name == "full":
        assert plan.is_identity
        greedy = dict(max_new_tokens=12, do_sample=False)
        ref = llama_gqa.generate(_prompt(), cache=DynamicCache(config=llama_gqa.config), **greedy)
        got = llama_gqa.generate(_prompt(), cache=CompressedCache(llama_gqa, plan_provider=provider), **greedy)
        assert torch.equal(got, ref)


# ------------------------------------------------------------------------------ registry and options
def test_registry_errors():
    assert {"full", "snapkv", "hybrid", "kivi", "ada_kv", "pyramidkv"} <= set(available_policies())
    with pytest.raises(ValueError, match=r"policy must be one of \(.*'snapkv'"):
        get_policy("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) \['bogus'\].*'scorer'"):
        get_policy("snapkv", bogus=1)
    with pytest.raises(ValueError, match="already registered"):
        register("snapkv")(Hybrid)


@pytest.mark.parametrize("name, options, field", [
    ("snapkv", {"sink_tokens": -1}, "sink_tokens"),
    ("streaming_llm", {"recent_window": 1.5}, "recent_window"),
    ("h2o", {"group_size": 24}, "group_size"),
    ("tova", {"scorer": "nope"}, "scorer"),
    ("ada_kv", {"scorer": "key_norm"}, "scorer"),
    ("ada_kv", {"safeguard": 1.5}, "safeguard"),
    ("pyramidkv", {"beta": 0.5}, "beta"),
    ("hybrid", {"qerr_weight": -1.0}, "qerr_weight"),
])
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(ValueError, match=field):
        get_policy(name, **options)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, math.nan, "0.5"])
def test_bad_budget_raises(budget):
    with pytest.raises(ValueError, match="budget must be a number in"):
        get_policy("snapkv").plan(_stats(), budget)


@pytest.mark.parametrize("name", ["snapkv", "streaming_llm", "pyramidkv", "ada_kv", "hybrid"])
def test_budget_below_sinks_and_window_names_minimum(name):
    with pytest.raises(ValueError, match=r"budget 0.01 is below the minimum feasible 0\.0\d+"):
        get_policy(name).plan(_stats(), 0.01)


@pytest.mark.parametrize("name, floor", [
    ("snapkv", dict(keep=36)), ("streaming_llm", dict(keep=36)), ("pyramidkv", dict(keep=36)),
    ("ada_kv", dict(keep=36)), ("kivi", dict(keep=None, key_bits=2)),
])
def test_infeasible_budget_is_typed_and_carries_the_minimum(name, floor):
    """The least plan each policy can make (sinks + window in full precision, or KIVI's 2-bit keep-all) sets the minimum."""
    stats = _stats(seq_len=1000)
    least = Plan.uniform(2, 2, **floor, **get_policy(name).layout().keywords())
    with pytest.raises(InfeasibleBudget) as caught:
        get_policy(name).plan(stats, 0.01)
    assert caught.value.minimum == pytest.approx(_fraction(least, 1000)) and caught.value.budget == 0.01
    assert pickle.loads(pickle.dumps(caught.value)).minimum == caught.value.minimum  # crosses worker processes


def test_full_rejects_compression():
    with pytest.raises(ValueError, match="compresses nothing"):
        get_policy("full").plan(_stats(), 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_carry_the_kv_shape(dtype):
    """Policies size plans from the statistics alone: the cache's states give head_dim and dtype bytes."""
    model = build_tiny_model("llama_gqa").to(dtype)
    cache = CompressedCache(model, plan_provider=lambda stats: Plan.full(stats.num_layers, stats.num_kv_heads))
    with torch.no_grad():
        model(_prompt(), cache=cache)
    cfg, itemsize = model.config, torch.empty((), dtype=dtype).element_size()
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, itemsize)
    assert (cache.stats.num_layers, cache.stats.num_kv_heads, cache.stats.head_dim, cache.stats.dtype_bytes) == shape
    one = cache.stats.layer(1)
    assert (one.num_layers, one.head_dim, one.dtype_bytes) == (1, cfg.head_dim, itemsize)


# ------------------------------------------------------------------------------ budget arithmetic
@pytest.mark.parametrize("bits", [16, 4, 2])
def test_tokens_for_budget_is_the_largest_fitting_keep(bits):
    stats, layout = _stats(seq_len=300), get_policy("snapkv").layout()
    keep = tokens_for_budget(stats, 0.3, layout, key_bits=bits, value_bits=bits)
    limit = 0.3 * head_full_bytes(300, HEAD_DIM, DTYPE_BYTES)
    cost = lambda k: head_bytes(k, layout, 300, HEAD_DIM, DTYPE_BYTES, bits, bits)  # noqa: E731
    assert cost(keep) <= limit  # quantised bytes fall when a group packs: check every larger keep
    assert all(cost(k) > limit for k in range(keep + 1, 301))


def test_pyramidkv_budgets_decrease_with_depth():
    stats = _stats(num_layers=6, seq_len=2000)
    plan = get_policy("pyramidkv").plan(stats, 0.25)
    keeps = [layer[0].keep for layer in plan.heads]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] > 2 * keeps[-1]
    uniform = get_policy("snapkv").plan(stats, 0.25)
    assert _fraction(plan, 2000) <= 0.25 and abs(sum(keeps) / 6 - uniform.heads[0][0].keep) < 0.05 * sum(keeps) / 6


def test_ada_kv_gives_spread_heads_more_tokens():
    seq_len = 1000
    peaked = torch.full((seq_len,), 1e-4)
    peaked[100:120] = 1.0  # head 0 attends to 20 tokens; head 1 to everything alike
    scores = torch.stack([peaked, torch.ones(seq_len)]).unsqueeze(0)  # (L=1, H=2, T)
    stats = _stats(num_layers=1, seq_len=seq_len, scores={"snapkv": scores})
    plan = get_policy("ada_kv").plan(stats, 0.25)
    uniform = get_policy("snapkv").plan(stats, 0.25)
    concentrated, spread = (b.keep for b in plan.heads[0])
    assert spread > uniform.heads[0][0].keep > concentrated
    assert concentrated + spread <= 2 * uniform.heads[0][0].keep and _fraction(plan, seq_len) <= 0.25


@pytest.mark.parametrize("budget, bits", [(1.0, 8), (0.6, 8), (0.4, 4), (0.25, 2)])
def test_kivi_picks_highest_bits_that_fit(budget, bits):
    stats = _stats(seq_len=1000)  # keep-all fractions at 1000 tokens: 8 bit 0.58, 4 bit 0.34, 2 bit 0.22
    plan = get_policy("kivi").plan(stats, budget)
    assert {(b.keep, b.key_bits, b.value_bits) for layer in plan.heads for b in layer} == {(None, bits, bits)}
    assert _fraction(plan, 1000) <= budget


def test_kivi_below_two_bits_names_minimum():
    with pytest.raises(ValueError, match=r"budget 0.2 is below the minimum feasible 0\.22"):
        get_policy("kivi").plan(_stats(seq_len=1000), 0.2)


def _mass_and_qerr(top_mass: dict[float, float], qerr: float) -> dict[str, float]:
    features = {f"top{int(f * 100)}_mass": top_mass[f] for f in TOP_MASS_FRACTIONS}
    return {**features, **{f"{kv}_qerr_{b}": qerr * 4 / b for kv in ("key", "value") for b in (2, 4, 8)}}


@pytest.mark.parametrize("top_mass, qerr, expect", [
    ({f: 0.97 for f in TOP_MASS_FRACTIONS}, 0.4, 16),  # a few tokens hold the mass, quantisation is noisy: evict
    ({f: f for f in TOP_MASS_FRACTIONS}, 0.02, 2),  # attention spread evenly, quantisation nearly exact: quantise
])
def test_hybrid_rule_on_hand_made_stats(top_mass, qerr, expect):
    stats = _stats(seq_len=1000, features=_mass_and_qerr(top_mass, qerr))
    plan = get_policy("hybrid").plan(stats, 0.25)
    assert {b.key_bits for layer in plan.heads for b in layer} == {expect}
    assert _fraction(plan, 1000) <= 0.25
