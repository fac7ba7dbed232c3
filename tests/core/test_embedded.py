"""The embedded SmolLM2-135M model end to end (tier 2: slow, still in CI)."""

import random

import pytest
import torch
from transformers import DynamicCache

from adaptive_kv import CompressedCache, Plan, generate

pytestmark = pytest.mark.slow

GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _passkey_prompt(key: int, copies: int, depth: float) -> str:
    """Landmark-attention passkey prompt (Mohtashami & Jaggi 2023)."""
    before = int(copies * depth)
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n"
        + GARBAGE * before
        + f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
        + GARBAGE * (copies - before)
        + "\nWhat is the pass key? The pass key is"
    )


def test_identity_plan_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer("The history of the printing press begins", add_special_tokens=True)["input_ids"]])
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    cfg = model.config
    out = model.generate(ids, cache=CompressedCache(model, plan=Plan.full(cfg.num_hidden_layers, cfg.num_key_value_heads)), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("depth", [0.25, 0.75])
def test_passkey_survives_keep_half_at_4_bits(smollm2, depth):
    model, tokenizer = smollm2
    key = random.Random(int(depth * 100)).randint(10000, 99999)
    ids = tokenizer(_passkey_prompt(key, 44, depth))["input_ids"]
    assert 1000 <= len(ids) <= 1200
    cfg = model.config

    def half_4bit(stats):
        return Plan.uniform_fraction(cfg.num_hidden_layers, cfg.num_key_value_heads, stats.seq_len,
                                     keep_fraction=0.5, key_bits=4)

    result = generate(model, tokenizer, ids, plan_provider=half_4bit, max_new_tokens=8)
    assert str(key) in result.text
    assert result.kv["ratio"] > 6  # fp32 model: keep 1/2 at 4 bits ~ 8x minus scales, window, sinks
    heads = [h for layer in result.kv["layers"] for h in layer["heads"]]
    assert all(h["key_bits"] == 4 for h in heads)
