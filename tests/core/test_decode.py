"""The decode loop (tier 1): its stop rules on a scripted model, and generate() against transformers' generate."""

from types import SimpleNamespace

import pytest
import torch

from adaptive_kv import CompressedCache, Plan, generate
from adaptive_kv.decode import decode, end_tokens

VOCAB = 10


class Counting:
    """A model whose next token is the last token + 1 (mod VOCAB); counts its forwards."""

    def __init__(self) -> None:
        self.forwards = 0

    def __call__(self, ids: torch.Tensor, cache=None) -> SimpleNamespace:
        self.forwards += 1
        logits = torch.zeros(1, ids.shape[1], VOCAB)
        logits[0, -1, (int(ids[0, -1]) + 1) % VOCAB] = 1.0
        return SimpleNamespace(logits=logits)


def _first(token: int) -> torch.Tensor:
    logits = torch.zeros(1, VOCAB)
    logits[0, token] = 1.0
    return logits


def test_length_runs_no_forward_after_the_last_token():
    model = Counting()
    out = decode(model, None, _first(3), 4)
    assert (out.tokens, out.finish, model.forwards) == ([3, 4, 5, 6], "length", 3)


def test_an_end_token_is_kept_and_stops():
    model = Counting()
    out = decode(model, None, _first(3), 10, eos={5})
    assert (out.tokens, out.finish, model.forwards) == ([3, 4, 5], "stop", 2)


def test_on_token_sees_every_token_but_end_tokens_and_may_stop():
    seen = []

    def watch(tokens: list[int]) -> bool:
        seen.append(list(tokens))
        return tokens[-1] == 7

    out = decode(Counting(), None, _first(5), 10, on_token=watch)
    assert (out.tokens, out.finish) == ([5, 6, 7], "stop") and seen == [[5], [5, 6], [5, 6, 7]]
    seen.clear()
    assert decode(Counting(), None, _first(8), 10, eos={9}, on_token=watch).tokens == [8, 9] and seen == [[8]]


def test_a_caller_gone_cancels_before_the_next_token():
    calls = iter([True, True, False])
    out = decode(Counting(), None, _first(1), 10, live=lambda: next(calls))
    assert (out.tokens, out.finish) == ([1, 2], "cancelled")


def test_pick_chooses_the_token():
    out = decode(Counting(), None, _first(1), 3, pick=lambda logits: 0)
    assert out.tokens == [0, 0, 0]


@pytest.mark.parametrize("plan_kind", ["identity", "evicting"])
def test_generate_gives_the_tokens_of_transformers_generate(llama_gqa, tiny_tokenizer, plan_kind):
    ids = list(range(5, 125))
    layout = dict(sink_tokens=4, recent_window=16, group_size=16)
    plan = Plan.full(2, 2, **layout) if plan_kind == "identity" else Plan.uniform(2, 2, keep=60, key_bits=4, **layout)
    result = generate(llama_gqa, tiny_tokenizer, ids, plan=plan, max_new_tokens=40)
    with torch.inference_mode():
        ref = llama_gqa.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 cache=CompressedCache(llama_gqa, plan=plan), max_new_tokens=40, do_sample=False,
                                 pad_token_id=tiny_tokenizer.eos_token_id)
    assert result.token_ids == ref[0, len(ids):].tolist()


def test_end_tokens_come_from_the_generation_config_and_the_tokenizer():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7]))
    assert end_tokens(model) == {2, 7}
    assert end_tokens(model, SimpleNamespace(eos_token_id=9)) == {2, 7, 9}
    assert end_tokens(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), None) == set()
