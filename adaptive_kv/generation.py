"""One-call generation with a CompressedCache: prompt in, text and KV report out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adaptive_kv.cache import CompressedCache, PlanProvider
from adaptive_kv.decode import decode, end_tokens
from adaptive_kv.plan import Plan
from adaptive_kv.prefill import cache_inputs


@dataclass(frozen=True)
class GenerationResult:
    """Generated text, its token ids, the prompt length and the KV report of the cache."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kv: dict[str, Any]


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of `prompt`, wrapped in the chat template when the tokenizer has one (or `chat`)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str | list[int],
    *,
    plan: Plan | None = None,
    plan_provider: PlanProvider | None = None,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    **cache_options: Any,
) -> GenerationResult:
    """Greedy generation of `prompt` with a CompressedCache executing `plan` or `plan_provider`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 8192:
        raise ValueError(f"max_new_tokens must be an integer in [1, 8192], got {max_new_tokens!r}")
    ids = list(prompt) if isinstance(prompt, list) else encode_prompt(tokenizer, prompt, chat)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}"
        )
    if "stats_config" in cache_options and "reconstruction" not in cache_options:
        cache_options = {**cache_inputs(tokenizer, ids, cache_options["stats_config"]), **cache_options}
    cache = CompressedCache(model, plan=plan, plan_provider=plan_provider, **cache_options)
    # the last position's logits only, as transformers' generate computes them: a long prompt's full
    # logits would be its length x the vocabulary
    first = model(torch.tensor([ids], device=model.device), cache=cache, logits_to_keep=1).logits[:, -1]
    new_ids = decode(model, cache, first, max_new_tokens, eos=end_tokens(model)).tokens
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=new_ids, prompt_tokens=len(ids), kv=cache.report())
