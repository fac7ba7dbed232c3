"""Decoding requests together (one forward per step) gives each the tokens it gets alone."""

import pytest
import torch

from adaptive_kv import CompressedCache, HeadBudget, Plan
from adaptive_kv.batch import BatchCache
from adaptive_kv.decode import RunningBatch, decode

LAYOUT = dict(sink_tokens=4, recent_window=8, group_size=16)
# fp32 on CPU: a batched matmul may sum in another order than a single row's; measured on the tiny
# model the logits of a request agree to ~1e-6 whether it runs alone or in a batch
LOGIT_ATOL = 1e-4


def _plans() -> list[Plan]:
    """Plans of different keeps and bits: H2O eviction at 2/8 and 8/2 bits, keep-all 4-bit, keep-all mixed."""
    return [
        Plan(((HeadBudget(40, 2, 8), HeadBudget(60, 4, 4)), (HeadBudget(48, 8, 2), HeadBudget(None, 16, 16))), **LAYOUT),
        Plan.uniform(2, 2, keep=None, key_bits=4, **LAYOUT),
        Plan(((HeadBudget(None, 2, 2), HeadBudget(None, 16, 16)),) * 2, **LAYOUT),
    ]


def _prefill(model, plan: Plan, ids: torch.Tensor) -> tuple[CompressedCache, torch.Tensor]:
    cache = CompressedCache(model, plan=plan)
    with torch.no_grad():
        logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits


class _Recorder:
    """A greedy picker that keeps the logits it picked from."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> int:
        self.logits.append(logits.clone())
        return int(logits.argmax(-1))


def _prompts(model) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, model.config.vocab_size, (1, n), generator=gen) for n in (97, 130, 75)]


def test_batch_gives_each_request_its_alone_tokens(llama_gqa):
    model = llama_gqa
    prompts, plans, lengths = _prompts(model), _plans(), (20, 9, 14)
    alone = []
    for ids, plan, n in zip(prompts, plans, lengths):
        recorder = _Recorder()
        cache, first = _prefill(model, plan, ids)
        alone.append((decode(model, cache, first, n, pick=recorder).tokens, recorder.logits))
    batch, recorders, joined = RunningBatch(model), [_Recorder() for _ in prompts], []
    forwards = []
    original = BatchCache.update

    def counting(self, *args, **kwargs):
        forwards.append(len(self.caches))
        return original(self, *args, **kwargs)

    BatchCache.update = counting
    try:
        # the third request joins after three steps; the others leave at different lengths
        for i in (0, 1):
            joined.append(batch.join(*_prefill(model, plans[i], prompts[i]), lengths[i], pick=recorders[i]))
        for _ in range(3):
            batch.step()
        joined.append(batch.join(*_prefill(model, plans[2], prompts[2]), lengths[2], pick=recorders[2]))
        batch.run()
    finally:
        BatchCache.update = original
    assert max(forwards) == 3  # every running request in one forward
    for seq, recorder, (tokens, logits) in zip(joined, recorders, alone):
        assert seq.result.tokens == tokens
        assert seq.result.finish == "length"
        for got, want in zip(recorder.logits, logits):
            torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


def test_cancelled_request_leaves_and_others_go_on(llama_gqa):
    model = llama_gqa
    prompts, plans = _prompts(model), _plans()
    cancelled = {"now": False}
    batch = RunningBatch(model)
    stays = batch.join(*_prefill(model, plans[1], prompts[1]), 8)
    leaves = batch.join(*_prefill(model, plans[0], prompts[0]), 8, live=lambda: not cancelled["now"])
    batch.step()
    batch.step()
    cancelled["now"] = True
    finished = batch.step()
    assert finished == [leaves] and leaves.result.finish == "cancelled" and len(leaves.result.tokens) == 2
    assert batch.running == [stays]
    batch.run()
    alone_cache, alone_first = _prefill(model, plans[1], prompts[1])
    assert stays.result.tokens == decode(model, alone_cache, alone_first, 8).tokens


def test_a_batch_only_decodes(llama_gqa):
    # a request still in its prefill cannot join a batched forward
    model = llama_gqa
    fresh = [CompressedCache(model, plan=plan) for plan in _plans()[:2]]
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="prefill each request alone"), torch.no_grad():
        model(ids, cache=BatchCache(fresh))
    with pytest.raises(ValueError, match="max_new_tokens"):
        RunningBatch(model).join(fresh[0], torch.zeros(1, 4), 0)
