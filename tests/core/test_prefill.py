"""The prefill entry (tier 1): what a capture reads for the given policies, and that it equals a hand-built one."""

import torch

from adaptive_kv import CompressedCache
from adaptive_kv.policies import get_policy
from adaptive_kv.prefill import cache_inputs, capture, needs_of
from adaptive_kv.reconstruction import ReconstructionRequest
from adaptive_kv.stats import StatsConfig

IDS = tuple(range(5, 205))


def test_one_policy_needs_its_own_statistics():
    policy = get_policy("snapkv", sink_tokens=8, group_size=16)
    assert needs_of([policy]) == policy.stats_config() == StatsConfig(sink_tokens=8, group_size=16)


def test_policies_share_one_layout_else_the_default_and_reconstruction_if_any_reads_it():
    shared = [get_policy("snapkv", group_size=16), get_policy("kivi", group_size=16)]
    assert needs_of(shared) == StatsConfig(group_size=16)
    assert needs_of([get_policy("snapkv", group_size=16), get_policy("full")]) == StatsConfig()
    assert needs_of([get_policy("full"), get_policy("kvzip")]) == StatsConfig(reconstruction=True)


def test_cache_inputs_ask_for_reconstruction_only_when_needed(tiny_tokenizer):
    plain = cache_inputs(tiny_tokenizer, IDS, StatsConfig())
    assert plain == {"stats_config": StatsConfig(), "reconstruction": None}
    recon = cache_inputs(tiny_tokenizer, IDS, StatsConfig(reconstruction=True))
    assert recon["reconstruction"] == ReconstructionRequest.for_prompt(tiny_tokenizer, IDS)


def test_capture_equals_a_hand_built_capturing_prefill(llama_gqa, tiny_tokenizer):
    needs = needs_of([get_policy("full"), get_policy("kvzip")])
    captured = capture(llama_gqa, tiny_tokenizer, IDS, needs)
    request = ReconstructionRequest.for_prompt(tiny_tokenizer, IDS)
    cache = CompressedCache(llama_gqa, capture=True, stats_config=needs, reconstruction=request)
    with torch.inference_mode():
        logits = llama_gqa(torch.tensor([list(IDS)]), cache=cache).logits[:, -1]
    assert captured.cache.is_captured and captured.cache.stats.has_reconstruction
    torch.testing.assert_close(captured.last_logits, logits, rtol=1e-5, atol=1e-5)
    # one row of logits is held, not a view into the whole context's (length x vocabulary)
    assert captured.last_logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()
    torch.testing.assert_close(captured.cache.stats.features, cache.stats.features, rtol=0, atol=0)
    assert captured.cache.stats.token_scores.keys() == cache.stats.token_scores.keys()
    assert captured.seconds >= captured.cache.reconstruction_seconds > 0
    assert not capture(llama_gqa, tiny_tokenizer, IDS).cache.stats.has_reconstruction


def test_the_prefill_entry_is_public():
    import adaptive_kv
    from adaptive_kv import errors, plan, prefill

    assert adaptive_kv.capture is prefill.capture and adaptive_kv.Captured is prefill.Captured
    assert adaptive_kv.InfeasibleBudget is errors.InfeasibleBudget and adaptive_kv.Layout is plan.Layout
