"""The bytes a request's cache can reach stay under the bound admission control reserves for it."""

import pytest
import torch

from adaptive_kv import CompressedCache
from adaptive_kv.decode import decode
from adaptive_kv.memory import KvShape, in_use_nbytes
from adaptive_kv.policies import get_policy
from adaptive_kv.prefill import cache_inputs, needs_of

PROMPT_TOKENS, NEW_TOKENS = 300, 90  # 90 new tokens: the working copy grows past its first headroom


def _tensor_bytes(cache: CompressedCache) -> int:
    """Bytes of every distinct tensor storage reachable from the cache's layers (independent of nbytes())."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
            if key not in seen and obj.numel():
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif depth < 4 and hasattr(obj, "__dict__") and type(obj).__module__.startswith("adaptive_kv"):
            for item in vars(obj).values():
                visit(item, depth + 1)

    for layer in cache.layers:
        for name in ("prefill", "sinks", "buckets", "residual", "view"):
            visit(getattr(layer, name, None))
    return total


@pytest.mark.parametrize("name,budget", [("full", 1.0), ("hybrid", 0.25), ("kivi", 0.5), ("h2o", 0.3),
                                         ("snapkv", 0.25), ("kvzip", 0.25), ("streaming_llm", 0.3)])
@pytest.mark.parametrize("assembled", [None, False])
def test_cache_stays_under_its_request_bound(llama_gqa, tiny_tokenizer, name, budget, assembled):
    model, policy = llama_gqa, get_policy(name)
    shape = KvShape.of(model)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(5))
    cache = CompressedCache(model, plan_provider=lambda stats: policy.plan(stats, budget), assembled=assembled,
                            **cache_inputs(tiny_tokenizer, ids[0].tolist(), needs_of([policy])))
    with torch.inference_mode():
        logits = model(ids, cache=cache).logits[:, -1]
    bound = shape.request_bound_nbytes(PROMPT_TOKENS, NEW_TOKENS)
    after_plan = shape.decoding_bound_nbytes(cache, NEW_TOKENS)
    assert after_plan <= bound  # what the request keeps reserved once its plan landed
    seen = [in_use_nbytes(cache)]

    def record(tokens: list[int]) -> bool:
        seen.append(in_use_nbytes(cache))
        assert seen[-1] <= after_plan, (len(tokens), seen[-1], after_plan)
        return False

    decode(model, cache, logits, NEW_TOKENS, on_token=record)
    assert len(seen) == NEW_TOKENS + 1  # after the plan, then after each token
    assert max(seen) <= bound
    # in_use_nbytes counts what is really allocated: every tensor storage the cache's layers hold
    assert in_use_nbytes(cache) == pytest.approx(_tensor_bytes(cache), rel=0.02)


def test_bound_is_tight_for_the_full_plan(llama_gqa, tiny_tokenizer):
    """The full plan holds every token twice (store and working copy): its bytes come close to the bound."""
    model, policy = llama_gqa, get_policy("full")
    shape = KvShape.of(model)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(6))
    cache = CompressedCache(model, plan_provider=lambda stats: policy.plan(stats, 1.0),
                            **cache_inputs(tiny_tokenizer, ids[0].tolist(), needs_of([policy])))
    with torch.inference_mode():
        logits = model(ids, cache=cache).logits[:, -1]
    decode(model, cache, logits, 2)  # the working copy is built by the first decode step
    assert in_use_nbytes(cache) >= 0.75 * shape.request_bound_nbytes(PROMPT_TOKENS, 1)
    with pytest.raises(ValueError, match="prompt_tokens must be >= 1"):
        shape.request_bound_nbytes(0, 1)
    with pytest.raises(ValueError, match="new_tokens must be >= 0"):
        shape.request_bound_nbytes(1, -1)
