"""The assembled decode path (CPU fast path) against the reference decode (tier 1, tiny models).

`assembled=False` dequantises the packed store and runs `reference.decode_attention` at every
step: the specification. The assembled path must give the same logits, the same H2O scores and
the same bytes over prefill + decode with flushes, evictions and a multi-token chunk.
"""

from __future__ import annotations

import pytest
import torch

from adaptive_kv import CompressedCache, HeadBudget, Plan
from adaptive_kv import cache_layer as cache_module
from adaptive_kv.assembled import HEADROOM, AssembledView
from adaptive_kv.kernels import reference
from adaptive_kv.store import Residual
from conftest import build_tiny_model

LAYOUT = dict(sink_tokens=4, recent_window=8, group_size=16)
ATOL = 2e-5  # fp32; the two paths sum the same terms in a different order


def _plans(num_layers: int, num_heads: int) -> dict[str, Plan]:
    """Every bit-width, keep-all and evicting heads, per-head and shared selection."""
    mixed = [HeadBudget(None, 16, 16), HeadBudget(60, 2, 8), HeadBudget(None, 4, 4), HeadBudget(45, 8, 2)]
    rows = tuple(tuple(mixed[(layer + head) % len(mixed)] for head in range(num_heads)) for layer in range(num_layers))
    return {
        "identity": Plan.full(num_layers, num_heads, **LAYOUT),
        "mixed_per_head": Plan(rows, scorer="window", selection="per_head", **LAYOUT),
        "mixed_shared": Plan(rows, scorer="window", selection="shared", **LAYOUT),
        "keep_all_2bit": Plan.uniform(num_layers, num_heads, key_bits=2, value_bits=2, **LAYOUT),
    }


def _run(model, plan: Plan, assembled: bool, working_dtype: str = "model") -> tuple[torch.Tensor, CompressedCache]:
    """Prefill 97 tokens, 30 decode steps, a 5-token chunk, 10 more steps: every step's last logits."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 1000, (1, 97), generator=gen)
    follow = torch.randint(0, 1000, (1, 45), generator=gen)
    cache = CompressedCache(model, plan=plan, assembled=assembled, working_dtype=working_dtype)
    logits = []
    with torch.no_grad():
        logits.append(model(prompt, cache=cache).logits[0, -1])
        for i in range(30):
            logits.append(model(follow[:, i : i + 1], cache=cache).logits[0, -1])
        logits.append(model(follow[:, 30:35], cache=cache).logits[0, -1])  # the view is dropped, then rebuilt
        for i in range(35, 45):
            logits.append(model(follow[:, i : i + 1], cache=cache).logits[0, -1])
    return torch.stack(logits), cache


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "llama_hd64"])
@pytest.mark.parametrize("plan_name", ["identity", "mixed_per_head", "mixed_shared", "keep_all_2bit"])
def test_assembled_matches_reference(kind, plan_name):
    model = build_tiny_model(kind)
    config = model.config
    plan = _plans(config.num_hidden_layers, config.num_key_value_heads)[plan_name]
    want, ref_cache = _run(model, plan, assembled=False)
    got, cache = _run(model, plan, assembled=True)
    cache.sync()  # the views hold the latest H2O scores until the store needs them
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert cache.nbytes() == ref_cache.nbytes()
    assert cache.working_nbytes() > 0 and ref_cache.working_nbytes() == 0
    for mine, theirs in zip(cache.layers, ref_cache.layers):  # same tokens kept, same H2O scores
        assert torch.equal(mine.head_tokens(), theirs.head_tokens())
        # scores that decide evictions: evicting heads', or every head's when the layer ranks together
        read = [plan.selection == "shared" or b.keep is not None for b in theirs.budgets]
        for bits, bucket in theirs.buckets.items():
            if bucket.scores is not None:
                rows = torch.tensor(read)[bucket.token_heads()]
                torch.testing.assert_close(mine.buckets[bits].scores[rows], bucket.scores[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan_name", ["mixed_per_head", "mixed_shared", "keep_all_2bit"])
def test_view_updated_in_place_equals_a_rebuilt_one(plan_name):
    """Flushes write only the flushed tokens, evictions compact the rows: over 70 steps (4 flushes,
    evictions) the logits equal those of a cache whose views are rebuilt from the store every step,
    and at the end each layer's view holds what a view built afresh holds."""
    model = build_tiny_model("llama_gqa")
    config = model.config
    plan = _plans(config.num_hidden_layers, config.num_key_value_heads)[plan_name]
    ids = torch.randint(0, 1000, (1, 167), generator=torch.Generator().manual_seed(5))
    kept = CompressedCache(model, plan=plan, working_dtype="model")
    rebuilt = CompressedCache(model, plan=plan, working_dtype="model")
    with torch.no_grad():
        model(ids[:, :97], cache=kept)
        model(ids[:, :97], cache=rebuilt)
        for i in range(97, 167):
            for layer in rebuilt.layers:
                layer.sync_scores()
                layer.view = None
            want = model(ids[:, i : i + 1], cache=rebuilt).logits
            got = model(ids[:, i : i + 1], cache=kept).logits
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    kept.sync()
    for layer in kept.layers:
        view = layer.view
        fresh = AssembledView.build(layer.sinks, list(layer.buckets.values()), layer.residual, reference, torch.float32)
        assert view.head_lengths == fresh.head_lengths
        assert torch.equal(view.residual_start, fresh.residual_start)
        for head, length in enumerate(view.head_lengths):
            assert torch.equal(view.keys[head, :length], fresh.keys[head, :length])
            assert torch.equal(view.values[head, :length], fresh.values[head, :length])
        # every stored token listed at its (head, slot), in store order
        slots = lambda v: torch.stack([v.fixed_slots // v.capacity, v.fixed_slots % v.capacity])  # noqa: E731
        assert torch.equal(slots(view), slots(fresh))
        if fresh.scores is not None:  # the store's scores (sinks carry none)
            sinks = layer.sinks[0].shape[0] * layer.sinks[0].shape[1]
            torch.testing.assert_close(view.store_scores(sinks), fresh.store_scores(sinks), atol=1e-5, rtol=1e-5)
    assert any(b.keep is not None for layer in kept.layers for b in layer.budgets) == (plan_name != "keep_all_2bit")


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_bf16_working_copy_for_quantised_sides(kind, monkeypatch):
    """working_dtype="auto": a side whose every head is quantised is held in bf16, 16-bit sides
    exactly; logits stay within bf16 rounding of the reference; "model" keeps everything fp32."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16: auto keeps the model's dtype")
    model = build_tiny_model(kind)
    config = model.config
    _, cache = _run(model, _plans(config.num_hidden_layers, config.num_key_value_heads)["keep_all_2bit"],
                    assembled=True, working_dtype="auto")
    assert all(layer.view.keys.dtype == torch.float32 for layer in cache.layers)  # 142 tokens < BF16_MIN_TOKENS
    monkeypatch.setattr(cache_module, "BF16_MIN_TOKENS", 0)
    config = model.config
    plans = _plans(config.num_hidden_layers, config.num_key_value_heads)
    want, _ = _run(model, plans["keep_all_2bit"], assembled=False)
    got, cache = _run(model, plans["keep_all_2bit"], assembled=True, working_dtype="auto")
    assert all(layer.view.keys.dtype == layer.view.values.dtype == torch.bfloat16 for layer in cache.layers)
    # the rounding to bf16 must be small next to the 2-bit quantisation it rides on
    exact, identity = _run(model, plans["identity"], assembled=True, working_dtype="auto")
    rounding, quantisation = (got - want).abs(), (want - exact).abs()
    assert 0 < rounding.mean() < 0.1 * quantisation.mean()
    assert rounding.max() < 0.5 * quantisation.max()
    assert all(layer.view.keys.dtype == torch.float32 for layer in identity.layers)
    _, mixed = _run(model, plans["mixed_per_head"], assembled=True, working_dtype="auto")
    for layer in mixed.layers:
        want_k = torch.bfloat16 if all(b.key_bits < 16 for b in layer.budgets) else torch.float32
        want_v = torch.bfloat16 if all(b.value_bits < 16 for b in layer.budgets) else torch.float32
        assert (layer.view.keys.dtype, layer.view.values.dtype) == (want_k, want_v)


def test_view_grows_and_keeps_mass_order():
    """More appends than the headroom between rebuilds: the view grows; output and scores follow the reference."""
    torch.manual_seed(0)
    heads, dim = 2, 16
    sinks = (torch.randn(heads, 4, dim), torch.randn(heads, 4, dim))
    residual = Residual(torch.randn(7, dim), torch.randn(7, dim), torch.tensor([3, 4]), torch.rand(7))
    view = AssembledView.build(sinks, [], residual, reference, torch.float32)
    capacity = view.capacity
    for step in range(HEADROOM + 5):
        k, v = torch.randn(heads, 1, dim), torch.randn(heads, 1, dim)
        residual = residual.append(k, v, 100 + step)
        view.append(k, v)
    assert view.capacity > capacity
    query = torch.randn(2 * heads, 1, dim)
    want_out, want_mass = reference.decode_attention(query, sinks, [], residual, heads, 0.25, need_mass=True)
    before = view.store_scores(2 * 4)
    torch.testing.assert_close(before, residual.scores)  # prefill scores kept, new tokens at 0
    out = view.attend(query, 0.25, mass_heads=(0, 1))
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(view.store_scores(8) - before, want_mass[8:], atol=1e-6, rtol=0)
    before = view.store_scores(8)
    out = view.attend(query, 0.25, mass_heads=(1,))  # the mass of head 1 only
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=0)
    head_of = residual.token_heads()
    torch.testing.assert_close(view.store_scores(8) - before, torch.where(head_of == 1, want_mass[8:], 0.0),
                               atol=1e-6, rtol=0)


def test_assembled_option_is_validated():
    with pytest.raises(ValueError, match="assembled must be"):
        CompressedCache(build_tiny_model("llama_gqa"), plan=Plan.full(2, 2), assembled="yes")
    with pytest.raises(ValueError, match="working_dtype must be one of"):
        CompressedCache(build_tiny_model("llama_gqa"), plan=Plan.full(2, 2), working_dtype="fp8")
