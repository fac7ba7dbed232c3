"""Eviction against references that share no code with the cache (tier 1).

Tokens are chosen by scores injected into a captured prefill, so the kept sets are known in
advance. References: a DynamicCache decoding with a 2-D attention mask that hides the evicted
positions (when every head of every layer keeps the same positions), plain softmax attention
over each head's kept keys taken from a DynamicCache (per-head sets), and an H2O accumulator
computed here from the model's own queries and keys (decode-time eviction).
"""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from adaptive_kv import CompressedCache, HeadBudget, Plan

LAYOUT = dict(recent_window=8, group_size=16, sink_tokens=4)
SEQ_LEN = 97  # middle [4, 89): 85 evictable tokens
# Tolerances, one table for the file (fp32 tiny models, 16-bit keys and values unless noted).
# Masked DynamicCache vs evicting CompressedCache, logits over 5 decode steps: measured <= 2e-6
# (different kernels: SDPA with a mask vs the cache's varlen SDPA); the unmasked full cache
# differs by > 0.1, so the bound is far from both.
MASKED_LOGIT_ATOL = 2e-5
# One layer's attention output vs softmax over each head's kept keys: measured <= 6e-7.
LAYER_OUT_ATOL = 1e-5
# H2O scores vs the accumulator computed here: sums of <= 40 fp32 probabilities, measured <= 5e-7.
SCORE_ATOL = 1e-5


def _heads(model) -> tuple[int, int]:
    return model.config.num_hidden_layers, model.config.num_key_value_heads


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _fork_with_scores(model, ids, plan, select, window, **options) -> CompressedCache:
    """Prefill `ids` into a capturing cache, replace its token scores (L, H, T), fork it by `plan`."""
    captured = CompressedCache(model, capture=True)
    model(ids, cache=captured)
    scores = {plan.scorer: select, "window": window}
    captured.stats = dataclasses.replace(captured.stats, token_scores=scores)
    return captured.fork(plan, **options)


def _expected_kept(score_row: torch.Tensor, keep: int, seq_len: int = SEQ_LEN) -> list[int]:
    """Sinks + recent window + the highest-scored middle tokens: the rule written out again."""
    sinks, recent = LAYOUT["sink_tokens"], LAYOUT["recent_window"]
    middle = list(range(sinks, seq_len - recent))
    best = sorted(middle, key=lambda p: -float(score_row[p]))[: keep - sinks - recent]
    return sorted(list(range(sinks)) + best + list(range(seq_len - recent, seq_len)))


def _record_attention(cache: CompressedCache) -> list[tuple]:
    """Wrap `cache.attend` to record (layer_idx, query, new keys, new values, output) per call."""
    calls, attend = [], cache.attend

    def recording(step, query, scaling):
        out = attend(step, query, scaling)
        calls.append((step.layer_idx, query, step.key_states, step.value_states, out))
        return out

    cache.attend = recording
    return calls


@pytest.mark.parametrize("selection", ["per_head", "shared"])
def test_same_positions_everywhere_match_masked_dynamic_cache(tiny_model, selection):
    """Every head keeps the same positions: decode equals a DynamicCache with those positions masked."""
    num_layers, num_kv = _heads(tiny_model)
    ids, new = _ids(SEQ_LEN, 3), _ids(5, 4)
    row = torch.rand(SEQ_LEN, generator=torch.Generator().manual_seed(5))
    scores = row.expand(num_layers, num_kv, SEQ_LEN).clone()
    keep = 41  # 29 middle tokens: one packed group + 13 in the residual
    plan = Plan.uniform(num_layers, num_kv, keep=keep, selection=selection, **LAYOUT)
    cache = _fork_with_scores(tiny_model, ids, plan, scores, scores, eviction_slack=1000)
    kept = _expected_kept(row, keep)
    mask = torch.zeros(1, SEQ_LEN + new.shape[1], dtype=torch.long)
    mask[0, kept] = 1
    mask[0, SEQ_LEN:] = 1
    ref_cache, full_cache = DynamicCache(config=tiny_model.config), DynamicCache(config=tiny_model.config)
    with torch.no_grad():
        tiny_model(ids, cache=ref_cache)
        tiny_model(ids, cache=full_cache)
        for i in range(new.shape[1]):
            pos = SEQ_LEN + i
            token, position = new[:, i : i + 1], torch.tensor([[pos]])
            got = tiny_model(token, cache=cache).logits
            ref = tiny_model(token, attention_mask=mask[:, : pos + 1], position_ids=position, cache=ref_cache).logits
            full = tiny_model(token, position_ids=position, cache=full_cache).logits
            torch.testing.assert_close(got, ref, atol=MASKED_LOGIT_ATOL, rtol=0)
            assert (full - ref).abs().max() > 100 * MASKED_LOGIT_ATOL  # eviction changes the output
    assert cache.layers[0].head_tokens().tolist() == [keep + new.shape[1]] * num_kv


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_mha"])
def test_per_head_kept_sets_match_softmax_over_kept_keys(kind):
    """Each head attends to exactly its own kept positions (checked layer by layer, 3 decode steps)."""
    from conftest import build_tiny_model

    model = build_tiny_model(kind)
    num_layers, num_kv = _heads(model)
    num_q = model.config.num_attention_heads
    rep, head_dim = num_q // num_kv, model.config.head_dim
    ids, new = _ids(SEQ_LEN, 6), _ids(3, 7)
    scores = torch.rand(num_layers, num_kv, SEQ_LEN, generator=torch.Generator().manual_seed(8))
    keeps = [[41 + 16 * ((layer + head) % 3) for head in range(num_kv)] for layer in range(num_layers)]
    plan = Plan(tuple(tuple(HeadBudget(k) for k in layer) for layer in keeps), **LAYOUT)
    cache = _fork_with_scores(model, ids, plan, scores, scores, eviction_slack=1000)
    calls = _record_attention(cache)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=reference)
        for i in range(new.shape[1]):
            model(new[:, i : i + 1], cache=cache)
    new_keys = {layer: [] for layer in range(num_layers)}
    new_values = {layer: [] for layer in range(num_layers)}
    for layer, query, key_states, value_states, out in calls:  # query (1, H_q, 1, D), out (1, 1, H_q, D)
        new_keys[layer].append(key_states[0])
        new_values[layer].append(value_states[0])
        for head in range(num_kv):
            kept = _expected_kept(scores[layer, head], keeps[layer][head])
            keys = torch.cat([reference.layers[layer].keys[0, head, kept], *(k[head] for k in new_keys[layer])])
            values = torch.cat([reference.layers[layer].values[0, head, kept], *(v[head] for v in new_values[layer])])
            for q_head in range(head * rep, (head + 1) * rep):
                probs = (query[0, q_head, 0] @ keys.T * head_dim**-0.5).softmax(-1)
                torch.testing.assert_close(out[0, 0, q_head], probs @ values, atol=LAYER_OUT_ATOL, rtol=0)
    assert len(calls) == num_layers * new.shape[1]


# ------------------------------------------------------------------------------ decode-time (H2O)
def _snapshot(layer, reference_keys: torch.Tensor) -> dict[int, dict[str, dict[int, float]]]:
    """Per head: {"bucket": {position: score}, "residual": {...}}; positions found by exact key match.

    reference_keys (H, T_all, D) holds every key the layer has seen, in position order.
    """
    out = {h: {"bucket": {}, "residual": {}} for h in range(reference_keys.shape[0])}
    parts = [("bucket", b.keys, b.token_heads(), b.scores) for b in layer.buckets.values()]
    parts.append(("residual", layer.residual.keys, layer.residual.token_heads(), layer.residual.scores))
    for kind, keys, heads, scores in parts:
        for key, head, score in zip(keys, heads.tolist(), scores.tolist()):
            match = torch.nonzero((reference_keys[head] == key).all(-1)).flatten()
            assert match.numel() == 1, "a stored key must be one of the model's keys, exactly"
            out[head][kind][int(match)] = score
    return out


@pytest.mark.parametrize("scorer", ["window", "snapkv"])
def test_h2o_evicts_lowest_accumulated_attention(scorer):
    """Lowest-score tokens leave, the mass lands on the right tokens, each head stays in budget.

    Under "window" (H2O's own measure) every packed token competes; under another scorer the middle
    tokens it selected never leave and only the prefill's recent window and later tokens compete.
    """
    from conftest import build_tiny_model

    from adaptive_kv.cache_layer import PROTECTED_SCORE

    model = build_tiny_model("llama_gqa")
    num_layers, num_kv = _heads(model)
    rep, head_dim = model.config.num_attention_heads // num_kv, model.config.head_dim
    keep, slack, steps = 41, 4, 40
    ids, new = _ids(SEQ_LEN, 9), _ids(steps, 10)
    gen = torch.Generator().manual_seed(11)
    select, window = torch.rand(num_layers, num_kv, SEQ_LEN, generator=gen), torch.rand(num_layers, num_kv, SEQ_LEN, generator=gen)
    if scorer == "window":
        select = window
    # 16-bit keys (positions are recovered by exact key match), 4-bit values (a packed side)
    plan = Plan.uniform(num_layers, num_kv, keep=keep, key_bits=16, value_bits=4, scorer=scorer, **LAYOUT)
    cache = _fork_with_scores(model, ids, plan, select, window, eviction_slack=slack)
    calls = _record_attention(cache)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=reference)
    keys = [reference.layers[layer].keys[0] for layer in range(num_layers)]  # (H, T, D), grows per step
    sinks = set(range(LAYOUT["sink_tokens"]))
    recent = set(range(SEQ_LEN - LAYOUT["recent_window"], SEQ_LEN))
    acc = [[{} for _ in range(num_kv)] for _ in range(num_layers)]  # position -> H2O score, computed here
    protected = [[set() for _ in range(num_kv)] for _ in range(num_layers)]
    for layer in range(num_layers):
        for head in range(num_kv):
            for pos in set(_expected_kept(select[layer, head], keep)) - sinks:
                acc[layer][head][pos] = float(window[layer, head, pos])
                if scorer != "window" and pos not in recent:
                    protected[layer][head].add(pos)
    evictions = 0
    for step in range(steps):
        before = [_snapshot(cache.layers[layer], keys[layer]) for layer in range(num_layers)]
        calls.clear()
        with torch.no_grad():
            model(new[:, step : step + 1], cache=cache)
        cache.sync()  # the assembled views hold the newest scores until the store needs them
        for layer, query, key_states, _, _ in calls:
            keys[layer] = torch.cat([keys[layer], key_states[0]], dim=1)
            after = _snapshot(cache.layers[layer], keys[layer])
            new_pos = SEQ_LEN + step
            for head in range(num_kv):
                was, now, kept = before[layer][head], after[head], protected[layer][head]
                held_before = set(was["bucket"]) | set(was["residual"])
                held_now = set(now["bucket"]) | set(now["residual"])
                evicted = held_before - held_now
                assert held_now - held_before == {new_pos}
                assert kept <= held_now  # the scorer's selection stays
                if evicted:  # H2O: the lowest accumulated scores of the packed, unprotected tokens leave
                    evictions += 1
                    # packed tokens only (a flush may pack the residual's oldest group first), never the window
                    assert not evicted & set(sorted(held_before)[-LAYOUT["recent_window"] :])
                    assert len(held_before) + len(sinks) > keep + slack
                    competing = set(now["bucket"]) - kept
                    # back to budget plus the new token, unless no competing packed token is left
                    assert len(held_now) + len(sinks) == keep + 1 or (not competing and len(held_now) + len(sinks) > keep)
                    if competing:
                        assert max(acc[layer][head][p] for p in evicted) <= min(acc[layer][head][p] for p in competing)
                else:
                    assert len(held_before) + len(sinks) <= keep + slack or not set(now["bucket"]) - kept
                for pos in evicted:
                    del acc[layer][head][pos]
                # this step's attention mass, from the model's query over the tokens the head holds
                present = sorted(sinks | held_now)
                for q_head in range(head * rep, (head + 1) * rep):
                    probs = (query[0, q_head, 0] @ keys[layer][head, present].T * head_dim**-0.5).softmax(-1)
                    for pos, p in zip(present, probs.tolist()):
                        if pos not in sinks:
                            acc[layer][head][pos] = acc[layer][head].get(pos, 0.0) + p / rep
                stored = {**now["bucket"], **now["residual"]}
                assert all(stored[p] >= PROTECTED_SCORE for p in kept)
                free = sorted(set(stored) - kept)
                expected = torch.tensor([acc[layer][head][p] for p in free])
                got = torch.tensor([stored[p] for p in free])
                torch.testing.assert_close(got, expected, atol=SCORE_ATOL, rtol=0)
    assert evictions >= 2 * num_layers * num_kv  # eviction really ran, more than once per head
    bound = keep + slack + 1 if scorer == "window" else keep + LAYOUT["group_size"] + LAYOUT["recent_window"]
    for layer in cache.layers:
        assert (layer.head_tokens() <= bound).all()


def test_shared_ranking_normalises_over_evictable_tokens_only():
    """Shared selection under a non-window scorer: a position's decode-time score is the mean, over
    the heads that may evict it, of its H2O mass over that head's evictable mass (recomputed here
    from the stored scores); protected positions take no part."""
    from conftest import build_tiny_model

    from adaptive_kv.cache_layer import PROTECTED_SCORE

    model = build_tiny_model("llama_gqa")
    num_layers, num_kv = _heads(model)
    ids, new = _ids(SEQ_LEN, 12), _ids(12, 13)
    gen = torch.Generator().manual_seed(14)
    select, window = torch.rand(num_layers, num_kv, SEQ_LEN, generator=gen), torch.rand(num_layers, num_kv, SEQ_LEN, generator=gen)
    # unequal keeps: the heads protect different numbers of tokens, so a wrong normaliser shows
    plan = Plan(((HeadBudget(41), HeadBudget(73)),) * num_layers, selection="shared", **LAYOUT)
    cache = _fork_with_scores(model, ids, plan, select, window, eviction_slack=1000)
    with torch.no_grad():
        for i in range(new.shape[1]):
            model(new[:, i : i + 1], cache=cache)
    cache.sync()
    for layer in cache.layers:
        parts = [(b.token_heads(), b.scores, b.positions) for b in layer.buckets.values()]
        parts.append((layer.residual.token_heads(), layer.residual.scores, layer.residual.positions))
        entries = {h: [] for h in range(num_kv)}
        for heads, scores, positions in parts:
            for h, s, p in zip(heads.tolist(), scores.tolist(), positions.tolist()):
                entries[h].append((p, s))
        shares: dict[int, list[float]] = {}
        protected = 0
        for h, items in entries.items():
            free = [(p, s) for p, s in items if s < PROTECTED_SCORE]
            protected += len(items) - len(free)
            total = sum(s for _, s in free)
            for p, s in free:
                shares.setdefault(p, []).append(s / total)
        assert protected > 0 and shares
        got = layer.shared_scores()
        for p, values in shares.items():
            assert abs(float(got[p]) - sum(values) / len(values)) < 1e-6
