"""Compressed contexts stored and reused by the engine (in-process, tiny model): a question over a stored
context decodes as a fresh query-agnostic run, concurrent questions over one context stay apart, the next
turn starts from the finished one, eviction frees real bytes, and another tenant never hits."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from adaptive_kv.cache import CompressedCache
from adaptive_kv.decode import decode
from adaptive_kv.policies import get_policy
from adaptive_kv.prefill import cache_inputs, needs_of
from adaptive_kv.services.engine import Engine, EngineConfig, GenerationOutput, GenerationRequest
from adaptive_kv.services.policy_source import PolicySpec
from conftest import build_tiny_model
from service_helpers import PROMPT

POLICY, BUDGET, MAX_TOKENS = "hybrid", 0.25, 16


def _engine(tokenizer, **config) -> Engine:
    model = build_tiny_model("llama_gqa")
    engine = Engine(EngineConfig(model="tiny", policy=PolicySpec(name=POLICY), budget=BUDGET, request_timeout=120,
                                 max_tokens_cap=4000, threads=1, reuse_contexts=True, **config),
                    loader=lambda name: (model, tokenizer))
    engine.start()
    return engine


@pytest.fixture
def engine(tiny_tokenizer):
    engine = _engine(tiny_tokenizer)
    yield engine
    engine.close()


def _split(engine: Engine) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """A 200-token context and three questions of different lengths."""
    ids = engine.encode_text(PROMPT)
    assert len(ids) >= 240
    return ids[:200], [ids[205:212], ids[215:226], ids[230:234]]


@torch.inference_mode()
def _fresh_tokens(engine: Engine, context: tuple[int, ...], fed: list[tuple[int, ...]] = ()) -> list[int]:
    """Independent of the engine: the tokens (end tokens dropped) greedy decoding picks through the library
    after `context` is compressed alone by the policy and each of `fed` is run as one step after it (no
    `fed`: a plain request of `context`, its plan seeing the whole prompt)."""
    policy, model = get_policy(POLICY), engine.model
    cache = CompressedCache(model, plan_provider=lambda stats: policy.plan(stats, BUDGET),
                            **cache_inputs(engine.tokenizer, context, needs_of([policy])))
    logits = model(torch.tensor([list(context)]), cache=cache).logits[:, -1]
    for part in fed:
        logits = model(torch.tensor([list(part)]), cache=cache).logits[:, -1]
    return [t for t in decode(model, cache, logits, MAX_TOKENS, eos=engine.eos).tokens if t not in engine.eos]


def _fresh_text(engine: Engine, context: tuple[int, ...], fed: list[tuple[int, ...]]) -> str:
    return engine.tokenizer.decode(_fresh_tokens(engine, context, fed), skip_special_tokens=True)


def _ask(engine: Engine, context, question, tenant: str = "a", context_tokens: int | None = None) -> GenerationOutput:
    ids = tuple(context) + tuple(question)
    request = GenerationRequest(ids, MAX_TOKENS, tenant=tenant,
                                context_tokens=len(context) if context_tokens is None else context_tokens)
    return asyncio.run(engine.complete(request))


def _metric(engine: Engine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(name) or 0.0


def test_questions_over_a_stored_context_equal_fresh_query_agnostic_runs(engine, tiny_tokenizer):
    context, questions = _split(engine)
    first = _ask(engine, context, questions[0])  # compresses the context alone and stores it
    assert first.text == _fresh_text(engine, context, [questions[0]])
    assert (first.kv["reused_tokens"], first.kv["prefilled_tokens"]) == (0, len(context) + len(questions[0]))
    assert len(engine.contexts) >= 1

    async def together() -> list[GenerationOutput]:
        return await asyncio.gather(*(asyncio.to_thread(_ask, engine, context, q) for q in questions[1:]))

    outs = asyncio.run(together())  # decoding together, each over its own copy of the one context
    for question, out in zip(questions[1:], outs):
        assert out.text == _fresh_text(engine, context, [question])
        assert (out.kv["reused_tokens"], out.kv["prefilled_tokens"]) == (len(context), len(question))
        assert out.kv["policy"] == POLICY and out.kv["bytes"] < out.kv["full_bytes"]
    assert _metric(engine, "adaptive_kv_context_hits_total") >= 2
    assert _metric(engine, "adaptive_kv_reused_prompt_tokens_total") >= 2 * len(context)
    # the stored context itself never moved: asked again, the first question answers as before
    assert _ask(engine, context, questions[0]).text == first.text


def test_the_next_turn_starts_from_the_finished_request(engine, tiny_tokenizer):
    context, questions = _split(engine)
    first = _ask(engine, context, questions[0], context_tokens=0)  # no context boundary: a plain request
    assert first.kv["reused_tokens"] == 0
    reply = tuple(_fresh_tokens(engine, context + questions[0]))
    assert tiny_tokenizer.decode(reply, skip_special_tokens=True) == first.text
    fed = reply[:-1] if first.finish_reason == "length" else reply  # the last token picked is never run
    nxt = _ask(engine, context + questions[0] + fed, questions[1], context_tokens=0)
    assert nxt.kv["reused_tokens"] == len(context) + len(questions[0]) + len(fed)
    assert nxt.kv["prefilled_tokens"] == len(questions[1])


def test_another_tenant_never_reuses_a_stored_context(engine, tiny_tokenizer):
    context, questions = _split(engine)
    _ask(engine, context, questions[0], tenant="a")
    other = _ask(engine, context, questions[1], tenant="b")
    assert other.kv["reused_tokens"] == 0  # stored its own copy instead
    assert _ask(engine, context, questions[2], tenant="b").kv["reused_tokens"] == len(context)
    assert _ask(engine, context, questions[2], tenant="a").kv["reused_tokens"] == len(context)
    # nor a request of the same tenant at another budget or policy: the stored plan was made for neither
    for budget, policy in ((0.5, None), (None, "snapkv")):
        request = GenerationRequest(context + questions[2], MAX_TOKENS, budget=budget, policy=policy, tenant="a",
                                    context_tokens=len(context))
        assert asyncio.run(engine.complete(request)).kv["reused_tokens"] == 0


def test_stored_contexts_give_way_to_requests_and_their_bytes_are_freed(tiny_tokenizer):
    probe = _engine(tiny_tokenizer, kv_memory=10**9)
    context, questions = _split(probe)
    bound = probe._request_nbytes(len(context) + len(questions[0]), MAX_TOKENS)
    probe.close()
    engine = _engine(tiny_tokenizer, kv_memory=int(1.2 * bound))  # one request, plus a little
    try:
        _ask(engine, context, questions[0])
        stored = list(engine.contexts._entries.values())
        assert stored and engine.contexts.nbytes > 0
        assert engine._scheduler.ledger.reserved == engine.contexts.nbytes  # they hold their bytes on the ledger
        tensors = [weakref.ref(layer.residual.keys) for entry in stored for layer in entry.cache.layers]
        del stored
        other = tuple(t % 1000 + 1 for t in context)  # another context: nothing to reuse, and no room beside them
        _ask(engine, other, questions[1])
        assert _metric(engine, "adaptive_kv_context_evictions_total") >= 1
        gc.collect()
        assert all(ref() is None for ref in tensors)  # the evicted contexts' tensors are gone, not just uncounted
        assert engine._scheduler.ledger.reserved == engine.contexts.nbytes <= engine.kv_limit
    finally:
        engine.close()


def test_a_context_too_short_for_the_budget_is_planned_with_its_question(engine, tiny_tokenizer):
    context, questions = _split(engine)
    prompt = context + questions[0]
    for budget in (None, BUDGET):  # the server's default (which may fall back to full) and one the client asked
        short = asyncio.run(engine.complete(GenerationRequest(prompt, MAX_TOKENS, budget=budget, context_tokens=12)))
        assert (short.kv["reused_tokens"], short.kv["prefilled_tokens"]) == (0, len(prompt))
        assert short.kv["policy"] == POLICY and short.kv["bytes"] < short.kv["full_bytes"]  # not a full cache
    assert short.text == tiny_tokenizer.decode(_fresh_tokens(engine, prompt), skip_special_tokens=True)
    assert len(engine.contexts) == 1  # only the finished request, not a 12-token context


def test_bad_context_boundary_is_refused():
    with pytest.raises(ValueError, match=r"context_tokens must be in \[0, 2\]"):
        GenerationRequest((1, 2, 3), 4, context_tokens=3)


# ---------------------------------------------------------------------------- over HTTP, two API keys
def test_chat_reuses_the_earlier_messages_per_api_key(tmp_path, tiny_tokenizer):
    import httpx

    from service_helpers import save_tiny_model, start_server

    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer)
    keys = {"ADAPTIVE_KV_TEST_KEYS": "key-a,key-b"}
    server = start_server(tmp_path, ["--model", str(model_dir), "--reuse-contexts", "--api-key-env",
                                     "ADAPTIVE_KV_TEST_KEYS"], env=keys)
    document = PROMPT[:900]

    def ask(key: str, question: str) -> dict:
        body = {"model": "model", "messages": [{"role": "system", "content": document},
                                               {"role": "user", "content": question}],
                "max_tokens": 4, "kv_budget": BUDGET}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        return response.json()["kv_cache"]

    try:
        first = ask("key-a", "What does assert do?")
        assert first["reused_tokens"] == 0
        again = ask("key-a", "When is it removed?")
        assert again["reused_tokens"] > 100  # the system message, compressed once
        assert again["prefilled_tokens"] < 30  # only the question and the generation prompt
        assert ask("key-b", "When is it removed?")["reused_tokens"] == 0  # never another key's context
        assert httpx.post(f"{server.url}/v1/chat/completions", json={"model": "model", "messages": []},
                          headers={"Authorization": "Bearer key-c"}).status_code == 401
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer key-a"}).text
        assert "adaptive_kv_context_hits_total 1.0" in metrics
    finally:
        server.stop()
