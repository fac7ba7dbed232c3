"""Continuous batching in the engine (in-process, tiny models): batch equals alone, admission by KV
memory never exceeds its limit, a cancelled stream frees its slot, prefill turns keep streams moving."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaptive_kv.memory import KvShape
from adaptive_kv.services.engine import Engine, EngineConfig, EngineError, GenerationOutput, GenerationRequest, TextDelta
from adaptive_kv.services.layer_turns import Cancelled, turns
from conftest import TINY_VOCAB, build_tiny_model
from service_helpers import PROMPT

# (policy, budget) per request: different keeps and bits in one batch
MIXED = [("hybrid", 0.25), ("full", 1.0), ("kivi", 0.5), ("snapkv", 0.3), ("h2o", 0.4), ("hybrid", 0.5)]


def _engine(tokenizer, model=None, **config) -> Engine:
    model = model or build_tiny_model("llama_gqa")
    engine = Engine(EngineConfig(model="tiny", request_timeout=120, max_tokens_cap=4000, threads=1, **config),
                    loader=lambda name: (model, tokenizer))
    engine.start()
    return engine


def _deep_model(layers: int = 8) -> torch.nn.Module:
    """A tiny Llama with more layers, so a prefill has more turns to hand out."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
    return LlamaForCausalLM(config).eval()


def _prompts(engine: Engine) -> list[tuple[int, ...]]:
    ids = engine.encode_text(PROMPT)
    return [ids[: len(ids) - 13 * i] for i in range(len(MIXED))]  # different lengths too


# ---------------------------------------------------------------------------- layer turns
def test_turns_run_between_every_decoder_layer_and_leave_the_result_unchanged():
    model = _deep_model(4)
    ids = torch.randint(0, TINY_VOCAB, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(ids).logits
        calls = []

        def between() -> None:  # a whole other forward between layers (the worker's decode step)
            calls.append(len(calls))
            assert torch.equal(model(ids).logits, plain)

        with turns(model, between):
            assert torch.equal(model(ids).logits, plain)
        assert calls == [0, 1, 2, 3]  # before each of the 4 decoder layers; the nested forwards add none
        model(ids)  # outside the block nothing is called
    assert len(calls) == 4


def test_cancelled_prefill_stops_before_its_next_layer_and_the_model_stays_usable():
    model = _deep_model(4)
    ids = torch.randint(0, TINY_VOCAB, (1, 50), generator=torch.Generator().manual_seed(2))
    layers: list[int] = []

    def between() -> None:
        layers.append(1)
        if len(layers) == 2:
            raise Cancelled()

    with torch.inference_mode():
        with pytest.raises(Cancelled), turns(model, between):
            model(ids)
        assert len(layers) == 2
        assert model(ids).logits.shape == (1, 50, TINY_VOCAB)


def test_model_without_decoder_layer_names_prefills_in_one_turn():
    model = _deep_model(2)
    model._no_split_modules = None  # a model class that does not name its decoder layers
    ids = torch.randint(0, TINY_VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    calls = []
    with torch.inference_mode(), turns(model, lambda: calls.append(1)):
        assert model(ids).logits.shape == (1, 20, TINY_VOCAB)
    assert calls == []


# ---------------------------------------------------------------------------- batch equals alone
def test_concurrent_requests_with_mixed_plans_get_their_alone_tokens(tiny_tokenizer):
    engine = _engine(tiny_tokenizer)
    try:
        requests = [GenerationRequest(ids, 24, budget, name) for ids, (name, budget) in zip(_prompts(engine), MIXED)]
        alone = [asyncio.run(engine.complete(r)) for r in requests]  # one after another: each decodes alone
        assert engine._scheduler.peak_batch == 1

        async def together() -> list[GenerationOutput]:
            return await asyncio.gather(*(engine.complete(r) for r in requests))

        batched = asyncio.run(together())
        assert engine._scheduler.peak_batch >= 3  # they really decoded together
        for one, many, (name, budget) in zip(alone, batched, MIXED):
            assert many.text == one.text and many.finish_reason == one.finish_reason, name
            assert many.kv["bytes"] == one.kv["bytes"] and many.kv["policy"] == name
    finally:
        engine.close()


# ---------------------------------------------------------------------------- admission by KV memory
def _fill(tokenizer, policy: str, budget: float, limit_requests: float, total: int = 8) -> tuple[Engine, list, int]:
    """`total` concurrent requests under a limit of `limit_requests` full-cache request bounds."""
    model = build_tiny_model("llama_gqa")
    probe = _engine(tokenizer, model=model, kv_memory=10**9)
    ids = probe.encode_text(PROMPT)
    probe.close()
    limit = int(limit_requests * KvShape.of(model).request_bound_nbytes(len(ids), 40))
    engine = _engine(tokenizer, model=model, kv_memory=limit, policy=_spec(policy), budget=budget)
    seen: list[int] = []
    publish = engine._scheduler._publish

    def checked() -> None:  # after every decode step and prefill turn
        seen.append(engine._scheduler.in_use_nbytes())
        publish()

    engine._scheduler._publish = checked

    async def burst() -> list:
        return await asyncio.gather(*(engine.complete(GenerationRequest(ids, 40)) for _ in range(total)))

    try:
        outputs = asyncio.run(burst())
    finally:
        engine.close()
    assert all(o.completion_tokens == 40 for o in outputs)
    assert seen and max(seen) <= limit, (max(seen), limit)
    return engine, seen, limit


def _spec(name: str):
    from adaptive_kv.services.policy_source import PolicySpec

    return PolicySpec(name=name)


def test_admission_never_exceeds_the_limit_and_compression_admits_more(tiny_tokenizer):
    full, _, _ = _fill(tiny_tokenizer, "full", 1.0, 3.5)
    assert full._scheduler.peak_batch == 3  # 3.5 full-cache bounds hold three requests at once
    compressed, seen, limit = _fill(tiny_tokenizer, "hybrid", 0.25, 3.5)
    # once a plan lands its reservation shrinks to what the plan keeps: more requests fit in the same bytes
    assert compressed._scheduler.peak_batch >= 4, compressed._scheduler.peak_batch
    assert max(seen) > 0.3 * limit  # the limit was really filled, not trivially met


def test_prompt_that_cannot_fit_the_kv_memory_is_refused_naming_it(tiny_tokenizer):
    engine = _engine(tiny_tokenizer, kv_memory=200_000)
    try:
        ids = engine.encode_text(PROMPT)
        with pytest.raises(EngineError, match="more than this server's KV memory of 195.3 KiB") as info:
            asyncio.run(engine.complete(GenerationRequest(ids, 40)))
        assert info.value.code == "kv_memory_exceeded" and info.value.param == "prompt"
        assert asyncio.run(engine.complete(GenerationRequest(ids[:20], 3))).completion_tokens == 3
    finally:
        engine.close()


def test_cancelled_stream_frees_its_slot_at_the_next_step(tiny_tokenizer):
    model = build_tiny_model("llama_gqa")
    shape = KvShape.of(model)
    probe = _engine(tiny_tokenizer, model=model, kv_memory=10**9)
    ids = probe.encode_text(PROMPT)
    probe.close()
    long_reserve, short_reserve = shape.request_bound_nbytes(len(ids), 3000), shape.request_bound_nbytes(len(ids), 3)
    # the full cache keeps about all of its reservation: the short request cannot start while the long one runs
    engine = _engine(tiny_tokenizer, model=model, kv_memory=long_reserve + short_reserve // 2, policy=_spec("full"),
                     budget=1.0)

    async def scenario() -> tuple[float, GenerationOutput]:
        stream = engine.generate(GenerationRequest(ids, 3000))
        await anext(stream)  # the long request is decoding
        short = asyncio.create_task(engine.complete(GenerationRequest(ids, 3)))
        await asyncio.sleep(0.3)
        assert not short.done()  # waits for room
        assert engine.metrics.queue_depth._value.get() == 1
        gone = time.monotonic()
        await stream.aclose()  # the client leaves
        out = await short
        return time.monotonic() - gone, out

    try:
        waited, out = asyncio.run(scenario())
    finally:
        engine.close()
    assert out.completion_tokens == 3
    assert waited < 2.0, waited  # the long request had ~3000 tokens to go


def test_running_streams_keep_moving_while_a_long_prompt_prefills(tiny_tokenizer):
    engine = _engine(tiny_tokenizer, model=_deep_model(8), kv_memory=10**9)
    ids = engine.encode_text(PROMPT)
    long_ids = tuple((ids * 20)[:6000])

    async def scenario() -> tuple[int, float]:
        times: list[float] = []

        async def running() -> None:
            async for event in engine.generate(GenerationRequest(ids, 3000)):
                if isinstance(event, TextDelta):
                    times.append(time.monotonic())
                if len(times) > 10 and submitted and first_long:
                    return

        submitted: list[float] = []
        first_long: list[float] = []
        task = asyncio.create_task(running())
        while len(times) < 3:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        submitted.append(time.monotonic())
        out = await engine.complete(GenerationRequest(long_ids, 1))
        first_long.append(time.monotonic())
        await task
        during = sum(submitted[0] <= t <= first_long[0] for t in times)
        return during, out.prefill_s

    try:
        during, prefill_s = asyncio.run(scenario())
    finally:
        engine.close()
    # a decode step may run before each of the 8 decoder layers of the long prompt's prefill
    assert during >= 6, (during, prefill_s)
