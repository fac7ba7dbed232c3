"""A compressed context shared by many requests (`CompressedCache.share`): each copy is extended by its
own suffix and decodes exactly as a fresh query-agnostic run of the same context and suffix, while the
stored context and the other copies never see its tokens."""

import pytest
import torch

from adaptive_kv import CompressedCache, HeadBudget, Plan

LAYOUT = dict(recent_window=8, group_size=16, sink_tokens=4, scorer="window")
# evicting and quantised heads: decode flushes every 16 tokens and evicts by accumulated attention
PLAN = Plan(((HeadBudget(40, 4, 4), HeadBudget(56, 8, 8)), (HeadBudget(48, 2, 4), HeadBudget(None, 16, 16))), **LAYOUT)
FOLLOW = 40  # tokens fed after the suffix: past two flushes and several evictions


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


def _fresh(model, context, suffix, follow, **options) -> torch.Tensor:
    """Logits of a new cache: the context compressed alone, then the suffix, then `follow` one by one."""
    cache = CompressedCache(model, plan=PLAN, **options)
    model(context, cache=cache)
    return _extend(model, cache, suffix, follow)


def _extend(model, cache, suffix, follow) -> torch.Tensor:
    logits = [model(suffix, cache=cache).logits[:, -1]]
    logits += [model(follow[:, i : i + 1], cache=cache).logits[:, -1] for i in range(follow.shape[1])]
    return torch.cat(logits)


@pytest.mark.parametrize("assembled", [None, False], ids=["assembled-view", "packed-store"])
@torch.no_grad()
def test_copies_decode_as_fresh_runs_and_never_see_each_other(llama_gqa, assembled):
    context, suffixes = _ids(100, 0), (_ids(5, 1), _ids(9, 2))
    follows = (_ids(FOLLOW, 3), _ids(FOLLOW, 4))
    expected = [_fresh(llama_gqa, context, s, f, assembled=assembled) for s, f in zip(suffixes, follows)]

    stored = CompressedCache(llama_gqa, plan=PLAN, assembled=assembled)
    llama_gqa(context, cache=stored)
    stored_tokens = [layer.head_tokens().tolist() for layer in stored.layers]
    stored_bytes = stored.nbytes()
    copies = [stored.share(), stored.share()]
    # interleaved, as a batch decodes them: each step of one copy runs between two steps of the other
    got = [[llama_gqa(s, cache=c).logits[:, -1]] for s, c in zip(suffixes, copies)]
    for i in range(FOLLOW):
        for follow, cache, out in zip(follows, copies, got):
            out.append(llama_gqa(follow[:, i : i + 1], cache=cache).logits[:, -1])
    for want, out in zip(expected, got):
        torch.testing.assert_close(torch.cat(out), want, atol=1e-6, rtol=0)

    # the copies evicted and flushed; the stored context did not move
    assert [layer.head_tokens().tolist() for layer in copies[0].layers] != stored_tokens
    assert [layer.head_tokens().tolist() for layer in stored.layers] == stored_tokens
    assert stored.nbytes() == stored_bytes and stored.get_seq_length() == 100
    # and a copy taken afterwards still decodes as the first did
    again = _extend(llama_gqa, stored.share(), suffixes[0], follows[0])
    torch.testing.assert_close(again, expected[0], atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_copy_shares_the_stored_tensors(llama_gqa):
    stored = CompressedCache(llama_gqa, plan=PLAN)
    llama_gqa(_ids(100, 0), cache=stored)
    copy = stored.share()
    for mine, theirs in zip(stored.layers, copy.layers):
        for bits, bucket in mine.buckets.items():
            assert theirs.buckets[bits].keys.data_ptr() == bucket.keys.data_ptr()  # shared, not copied
        assert theirs.residual.keys.data_ptr() == mine.residual.keys.data_ptr()
    assert copy.nbytes() == stored.nbytes()


def test_only_a_compressed_cache_is_shared(llama_gqa):
    captured = CompressedCache(llama_gqa, capture=True)
    with torch.no_grad():
        llama_gqa(_ids(40, 0), cache=captured)
    with pytest.raises(ValueError, match="share needs a compressed cache"):
        captured.share()
