"""The family matrix (tier 1): every architecture a user may bring, as a tiny random model built in code.

Llama (GQA, MHA), Qwen2 (also with its upper layers sliding), Qwen3 (q/k norms), Mistral (every layer
slides), Gemma-3 (sliding and global layers) and Phi-3 (fused projections). The context (64 tokens) and the decode (24 more) run past the
sliding window (FAMILY_WINDOW = 24), so a layer that ignored its window would attend to tokens
transformers' own cache no longer holds.
"""

import functools

import pytest
import torch
from transformers import DynamicCache

from adaptive_kv import CompressedCache, HeadBudget, Plan
from adaptive_kv.cache import sliding_windows
from adaptive_kv.policies import available_policies, get_policy
from adaptive_kv.reconstruction import ReconstructionRequest
from conftest import FAMILIES, FAMILY_WINDOW, build_family_model, scorer_folder

CONTEXT, DECODE = 64, 24
LAYOUT = dict(sink_tokens=4, recent_window=8, group_size=8)  # the floor (12) fits in a window's 23 tokens
# a sliding group holds 23 tokens: its floor (12 tokens plus their scores and positions) costs ~0.55 of them;
# KIVI keeps its recent window and the ungrouped rest in full precision: 0.72 at 2 bits on 23 tokens
BUDGET = 0.6
BUDGETS = {"full": 1.0, "kivi": 0.8}
NEEDS_TRAINED_CONTROLLER = ("learned",)  # trained for the embedded model's shape, refused for any other
POLICIES = tuple(p for p in available_policies() if p not in NEEDS_TRAINED_CONTROLLER)


@functools.lru_cache(maxsize=None)
def _model(family: str) -> torch.nn.Module:
    return build_family_model(family)


def _context() -> torch.Tensor:
    return torch.randint(5, 4000, (1, CONTEXT), generator=torch.Generator().manual_seed(1))


def _greedy(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False, **kwargs)


def test_matrix_has_sliding_and_global_layers():
    assert sliding_windows(_model("mistral").config) == (FAMILY_WINDOW,) * 3
    assert sliding_windows(_model("gemma3").config) == (FAMILY_WINDOW, None, FAMILY_WINDOW)
    assert sliding_windows(_model("qwen2_sliding").config) == (None, FAMILY_WINDOW, FAMILY_WINDOW)
    assert all(sliding_windows(_model(f).config) is None for f in ("llama_gqa", "llama_mha", "qwen2", "qwen3", "phi3"))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_equals_plain_greedy(family):
    model = _model(family)
    ids = _context()
    reference = _greedy(model, ids)  # transformers' own cache: DynamicCache(config=model.config)
    windows = sliding_windows(model.config)
    plan = Plan.full(model.config.num_hidden_layers, model.config.num_key_value_heads, windows=windows, **LAYOUT)
    cache = CompressedCache(model, plan=plan)
    assert torch.equal(_greedy(model, ids, cache=cache), reference)


@pytest.mark.parametrize("name", ["full", "snapkv", "hybrid"])
def test_packed_store_decode_slides_too(name):
    """Decoding straight from the packed store (the kernels' path, no dequantised working copy) drops
    what leaves the window as well: the identity plan still equals plain greedy on Gemma-3, and an
    evicting or quantising plan decodes past the window with its sinks gone."""
    model = _model("gemma3")
    ids = _context()
    policy = get_policy(name, **LAYOUT)
    cache = CompressedCache(model, plan_provider=lambda stats: policy.plan(stats, BUDGETS.get(name, BUDGET)),
                            stats_config=policy.stats_config(), assembled=False)
    out = _greedy(model, ids, cache=cache)
    if name == "full":
        assert torch.equal(out, _greedy(model, ids))
    assert cache.layers[0].sinks[0].shape[1] == 0 and cache.layers[1].sinks[0].shape[1] == LAYOUT["sink_tokens"]


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_layer_holds_its_window_and_full_bytes_are_transformers_cache(family):
    model = _model(family)
    ids = _context()
    plan = Plan.full(model.config.num_hidden_layers, model.config.num_key_value_heads,
                     windows=sliding_windows(model.config), **LAYOUT)
    ours, theirs = CompressedCache(model, plan=plan), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=ours)
        model(ids, cache=theirs)
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in theirs.layers)
        every_token = 2 * plan.num_layers * plan.num_kv_heads * CONTEXT * 16 * 4
        assert ours.full_nbytes() == held == plan.full_nbytes(CONTEXT, 16, 4) < every_token
        assert ours.nbytes() == plan.nbytes(CONTEXT, 16, 4)  # the prefill kept only each sliding layer's window
        assert [int(layer.head_tokens().max()) for layer in ours.layers] == [
            CONTEXT if w is None else w - 1 for w in plan.windows]
        for token in range(DECODE):  # one step at a time, past the window
            model(torch.tensor([[7 + token]]), cache=ours)
            model(torch.tensor([[7 + token]]), cache=theirs)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in theirs.layers)
    assert ours.full_nbytes() == held
    for layer, window in zip(ours.layers, plan.windows):
        if window is not None:  # the window's tokens: the newest one joins before the next step drops the oldest
            assert int(layer.head_tokens().max()) <= window


def _cache_for(model, policy, ids, budget: float) -> CompressedCache:
    request = None
    if policy.stats_config().reconstruction:
        request = ReconstructionRequest(tuple(ids[0].tolist()), (5, 6, 7), (8, 9))
    return CompressedCache(model, plan_provider=lambda stats: policy.plan(stats, budget),
                           stats_config=policy.stats_config(), reconstruction=request)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_meets_its_budget_with_real_bytes(family, name):
    model = _model(family)
    ids = _context()
    # kvzap's shipped scorer is for the embedded model: each family gets a random one of its shape
    policy = get_policy(name, **LAYOUT, **({"path": scorer_folder(model)} if name == "kvzap" else {}))
    budget = BUDGETS.get(name, BUDGET)
    cache = _cache_for(model, policy, ids, budget)
    with torch.no_grad():
        model(ids, cache=cache)
    assert cache.nbytes() == cache.predicted_nbytes()  # real bytes, not a prediction
    assert cache.nbytes() <= budget * cache.full_nbytes() or name == "full"
    assert cache.plan.windows == sliding_windows(model.config)
    for layer_idx, window in enumerate(cache.plan.windows or ()):
        if window is not None:  # a sliding layer's plan keeps at most the tokens it can hold
            assert all(b.keep is None or b.keep <= window - 1 for b in cache.plan.heads[layer_idx])
    if name == "kvzip":
        assert cache.reconstruction_seconds > 0  # the reconstruction pass ran
    with torch.no_grad():  # and decoding over the compressed store runs past the window
        for token in range(FAMILY_WINDOW + 2):
            model(torch.tensor([[7 + token]]), cache=cache)


def _allocated(cache: CompressedCache) -> int:
    """Bytes of the distinct storages behind every tensor the cache holds (what the allocator holds)."""
    tensors = []
    for layer in cache.layers:
        tensors += [*(layer.sinks or ()), *(t for part in (*layer.buckets.values(), layer.residual)
                                            for t in vars(part).values() if isinstance(t, torch.Tensor))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("name", ["full", "snapkv", "hybrid"])
def test_what_leaves_the_window_is_freed(name):
    model = _model("gemma3")
    policy = get_policy(name, **LAYOUT)
    cache = _cache_for(model, policy, _context(), BUDGETS.get(name, BUDGET))
    with torch.no_grad():
        model(_context(), cache=cache)
        for token in range(FAMILY_WINDOW + 2):  # every prefill token of a sliding layer, sinks included, leaves
            model(torch.tensor([[7 + token]]), cache=cache)
    assert cache.nbytes() == _allocated(cache)
    assert cache.layers[0].first_position == CONTEXT + FAMILY_WINDOW + 1 - (FAMILY_WINDOW - 1)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_bounded_prefill_plans_sliding_layers_over_their_window(family):
    model = _model(family)
    policy = get_policy("snapkv", **LAYOUT)
    layers = model.config.num_hidden_layers
    cache = CompressedCache(model, layer_plan_provider=lambda stats, i: policy.plan_layer(stats, i, layers, BUDGET),
                            stats_config=policy.stats_config())
    with torch.no_grad():
        model(_context(), cache=cache)
    assert cache.plan.windows == sliding_windows(model.config)
    assert cache.nbytes() == cache.predicted_nbytes() <= BUDGET * cache.full_nbytes()


def test_layer_types_the_cache_cannot_hold_are_refused():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match=r"layer_types\[0\] is 'chunked_attention'; CompressedCache supports"):
        sliding_windows(LlamaConfig(num_hidden_layers=2, attention_chunk_size=8))


def test_plan_without_the_models_windows_is_refused():
    model = _model("gemma3")
    with pytest.raises(ValueError, match=r"plan.windows must be the model's sliding windows \(24, None, 24\)"):
        CompressedCache(model, plan=Plan.full(3, 2, **LAYOUT))


def test_sliding_plan_bytes_count_only_the_window():
    windows = (FAMILY_WINDOW, None)
    plan = Plan.full(2, 1, windows=windows, **LAYOUT)
    assert plan.full_nbytes(100, 16, 4) == 2 * (FAMILY_WINDOW - 1 + 100) * 16 * 4
    assert plan.kept_tokens(0, 0, 100) == FAMILY_WINDOW - 1 and plan.kept_tokens(1, 0, 100) == 100
    with pytest.raises(ValueError, match=r"heads\[0\]\[0\].keep must be <= windows\[0\] - 1 = 23"):
        Plan(((HeadBudget(30),), (HeadBudget(30),)), windows=windows, **LAYOUT)
    with pytest.raises(ValueError, match=r"windows\[1\] must be an integer >= 2"):
        Plan.full(2, 1, windows=(FAMILY_WINDOW, 1))
    with pytest.raises(ValueError, match="windows must be None or one entry per layer"):
        Plan.full(2, 1, windows=(FAMILY_WINDOW,))
    assert Plan.from_json(plan.to_json()) == plan
    uniform = Plan.uniform(2, 1, keep=40, **LAYOUT).fitted_to(windows, 100)  # a uniform keep on a sliding model
    assert [row[0].keep for row in uniform.heads] == [None, 40] and uniform.windows == windows
    assert "windows" not in Plan.full(2, 1).to_dict()  # plans of models without sliding layers read as before


def test_fused_triton_decode_slides_too():
    """The fused triton decode (interpreted on CPU) reads whatever the sliding layer stores: with
    groups of 16 a sliding layer packs a group, decode slides tokens out of it and its sinks, and the
    identity plan still equals plain greedy."""
    pytest.importorskip("triton")
    model = _model("gemma3")
    ids = _context()
    layout = dict(sink_tokens=2, recent_window=2, group_size=16)  # a tile-sized group: the fused path, not its fallback
    plan = Plan.full(3, 2, windows=sliding_windows(model.config), **layout)
    cache = CompressedCache(model, plan=plan, backend="triton", assembled=False)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, cache=cache)
        want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert cache.layers[0].sinks[0].shape[1] == 0 and cache.layers[0].buckets


def test_budget_below_a_sliding_layers_positions_names_them():
    from adaptive_kv.errors import InfeasibleBudget

    model = _model("mistral")
    cache = CompressedCache(model, capture=True)
    with torch.no_grad():
        model(_context(), cache=cache)
    with pytest.raises(InfeasibleBudget, match=r"budget 0.02 is below the minimum feasible 0.0\d+ for seq_len=23 "
                                               r"\(a sliding-window layer stores every token's position\)"):
        get_policy("snapkv", **LAYOUT).plan(cache.stats, 0.02)
    with pytest.raises(InfeasibleBudget, match=r"budget 0.5 is below the minimum feasible 1.0\d+ for seq_len=23 "
                                               r"\(sink_tokens \+ recent_window stay in full precision; "
                                               r"layers \[0, 1, 2\] hold 23 tokens\)"):
        get_policy("snapkv").plan(cache.stats, 0.5)  # the default floor (36 tokens) exceeds the window


@pytest.mark.parametrize("name", ["snapkv", "hybrid", "kivi", "kvzip", "kvzap"])
def test_bounded_prefill_meets_the_budget_of_every_sliding_layer(name):
    model = _model("gemma3")
    policy = get_policy(name, **LAYOUT, **({"path": scorer_folder(model)} if name == "kvzap" else {}))
    if policy.stats_config().reconstruction:
        pytest.skip("reconstruction scores need every layer's prefill: kvzip plans with plan_provider=")
    layers, budget = model.config.num_hidden_layers, BUDGETS.get(name, BUDGET)
    cache = CompressedCache(model, layer_plan_provider=lambda stats, i: policy.plan_layer(stats, i, layers, budget),
                            stats_config=policy.stats_config())
    with torch.no_grad():
        model(_context(), cache=cache)
    for layer in cache.layers:  # a sliding layer's positions count too (kivi at 0.8 misses by them if not)
        full = 2 * 2 * (CONTEXT if layer.window is None else layer.window - 1) * 16 * 4
        assert layer.nbytes() <= budget * full


def test_pyramid_refuses_to_plan_sliding_layers_one_by_one():
    model = _model("gemma3")
    policy = get_policy("pyramidkv", **LAYOUT)
    cache = CompressedCache(model, layer_plan_provider=lambda stats, i: policy.plan_layer(stats, i, 3, BUDGET),
                            stats_config=policy.stats_config())
    with pytest.raises(ValueError, match="pyramidkv plans layer by layer only for models without sliding-window"):
        with torch.no_grad():
            model(_context(), cache=cache)
