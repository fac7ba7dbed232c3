"""Real bytes (tier 1): the plan's prediction, the memory really allocated, after decode too.

head_dim 64 with group size 16 gives four value scale groups per token (as on the embedded
model); fp32, bf16 and fp16 models; odd lengths. "Allocated" counts the storage behind every
tensor the cache holds, so a view that pins the freed prefill is caught. Byte counts are
integers and compare exactly: no tolerance table here.
"""

import dataclasses
import functools
import math

import pytest
import torch

from adaptive_kv import CompressedCache, HeadBudget, Plan
from adaptive_kv.plan import Layout
from conftest import build_tiny_model

LAYOUT = dict(recent_window=8, group_size=16, sink_tokens=4)
HEAD_DIM = 64  # llama_hd64: 2 layers, 2 KV heads
# tokens a head may hold over its budget during decode: the slack (4 here), or up to one group while
# its newest tokens wait in the residual (the scorer's selected middle tokens are never evicted), + the new one
OVER_BUDGET = max(4, LAYOUT["group_size"]) + 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@functools.lru_cache(maxsize=None)
def _model(dtype: torch.dtype) -> torch.nn.Module:
    return build_tiny_model("llama_hd64").to(dtype)


def _plans(selection: str = "per_head") -> list[Plan]:
    return [
        Plan.uniform(2, 2, key_bits=4, value_bits=2, **LAYOUT),
        Plan(((HeadBudget(40, 2, 8), HeadBudget(None, 16, 4)), (HeadBudget(61, 8, 2), HeadBudget(29, 16, 16))),
             selection=selection, **LAYOUT),
        # layer 0 keeps everything while layer 1 evicts: only layer 1 carries scores
        Plan(((HeadBudget(None, 4, 4), HeadBudget(None, 16, 16)), (HeadBudget(45, 2, 2), HeadBudget(None, 8, 8))),
             selection=selection, **LAYOUT),
    ]


def _tensors(cache: CompressedCache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        out += [t for t in (*(layer.prefill or ()), *(layer.sinks or ())) if t is not None]
        for part in (*layer.buckets.values(), layer.residual):
            out += [getattr(part, f.name) for f in dataclasses.fields(part)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _allocated(cache: CompressedCache) -> int:
    """Bytes of the distinct storages behind the cache's tensors (what the allocator holds)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(cache)}
    return sum(storages.values())


def _accounted(cache: CompressedCache, itemsize: int) -> int:
    """Bytes from the layout written out: per token, per group, per head (scores on evictable tokens)."""
    plan, total = cache.plan, 0
    for layer in cache.layers:
        # only layers with an evicting head carry scores (and positions, when shared)
        per_score = 4 + (4 if plan.selection == "shared" else 0) if plan.layer_tracks_scores(layer.layer_idx) else 0
        num_heads, sinks, _ = layer.sinks[0].shape
        residual = int(layer.residual.lengths.sum())
        total += 2 * (num_heads * sinks + residual) * HEAD_DIM * itemsize + 8 * num_heads + per_score * residual
        for (key_bits, value_bits), bucket in layer.buckets.items():
            tokens, groups = bucket.num_tokens, bucket.group_len.numel()
            value_groups = math.ceil(HEAD_DIM / min(plan.group_size, HEAD_DIM))
            total += tokens * HEAD_DIM * (itemsize if key_bits == 16 else key_bits / 8)
            total += 0 if key_bits == 16 else groups * HEAD_DIM * 2 * 2  # fp16 scale + zero per channel
            total += tokens * HEAD_DIM * (itemsize if value_bits == 16 else value_bits / 8)
            total += 0 if value_bits == 16 else tokens * value_groups * 2 * 2  # per token and channel group
            total += 4 * groups + per_score * tokens
    return int(total)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_len", [17, 97])
def test_prefill_bytes_equal_prediction(dtype, seq_len):
    model = _model(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    for plan in _plans() + _plans("shared")[1:]:
        cache = CompressedCache(model, plan=plan)
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, seq_len)), cache=cache)
        predicted = plan.nbytes(seq_len, HEAD_DIM, itemsize)
        assert cache.nbytes() == predicted == _allocated(cache) == _accounted(cache, itemsize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # fp16 decodes like bf16, slowly on CPU
def test_bytes_after_decode_flushes_and_evictions(dtype):
    model = _model(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    seq_len, steps = 97, 29  # the residual (13 + 29 tokens) flushes twice; the 40-token head evicts
    keep_all, evicting, one_layer_evicting = _plans()
    for plan in (keep_all, evicting, one_layer_evicting):
        cache = CompressedCache(model, plan=plan, eviction_slack=4)
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, seq_len)), cache=cache)
            for token in torch.randint(0, 1000, (steps,)).tolist():
                model(torch.tensor([[token]]), cache=cache)
        assert cache.nbytes() == _allocated(cache) == _accounted(cache, itemsize)
        if plan is keep_all:  # flushing leaves the layout of the plan applied to all tokens seen
            assert cache.nbytes() == plan.nbytes(seq_len + steps, HEAD_DIM, itemsize)
            assert sum(len(layer.buckets) for layer in cache.layers) == 2
        elif plan is one_layer_evicting:  # the keep-all layer carries no scores; the other evicts
            assert cache.layers[0].residual.scores is None and cache.layers[1].residual.scores is not None
            assert int(cache.layers[1].head_tokens()[0]) <= 45 + OVER_BUDGET
        else:  # evicted tokens are freed: partial groups, fewer bytes than keeping everything
            held = torch.stack([layer.head_tokens() for layer in cache.layers])
            assert held.tolist()[0][0] <= 40 + OVER_BUDGET and held.tolist()[1][0] <= 61 + OVER_BUDGET
            assert any((b.group_len < LAYOUT["group_size"]).any() for layer in cache.layers for b in layer.buckets.values())


def test_byte_formula_on_arrays_equals_it_per_head():
    """The learned controller prices candidate keeps as arrays; each entry must equal Plan.head_nbytes."""
    import numpy as np

    from adaptive_kv.plan import HeadBudget, Plan, kept_nbytes

    keeps = np.array([16, 17, 31, 32, 33, 47, 48, 49, 60, 61, 299, 300])  # around group edges (floor 16, group 16)
    for selection in ("per_head", "shared"):
        layout = dict(sink_tokens=4, recent_window=12, group_size=16, scorer="snapkv", selection=selection)
        for kb, vb in ((16, 16), (8, 8), (4, 2), (2, 2)):
            got = kept_nbytes(keeps, kb, vb, Layout(**layout), 64, 2, tracks_scores=True)
            for keep, value in zip(keeps.tolist(), got.tolist()):
                plan = Plan(((HeadBudget(keep, kb, vb),),), **layout)
                assert value == plan.head_nbytes(0, 0, 300, 64, 2), (selection, kb, vb, keep)
        # every bit pair in one call (bits as arrays over columns), as the controller prices its grid
        pairs = ((16, 16), (8, 8), (8, 4), (4, 2), (2, 2), (16, 2))
        key_bits, value_bits = (np.array([p[i] for p in pairs]) for i in (0, 1))
        table = kept_nbytes(keeps[:, None], key_bits[None, :], value_bits[None, :], Layout(**layout), 64, 2, tracks_scores=True)
        for (keep, (kb, vb)), value in zip([(k, p) for k in keeps.tolist() for p in pairs], table.reshape(-1).tolist()):
            plan = Plan(((HeadBudget(keep, kb, vb),),), **layout)
            assert value == plan.head_nbytes(0, 0, 300, 64, 2), (selection, kb, vb, keep)


def test_grid_pricing_equals_plan_bytes_per_option():
    """`keeps_nbytes` (the controller's one-call pricing of a whole grid) equals Plan.head_nbytes of
    each (keep, option) priced alone, asymmetric bit pairs included (16 on one side only: a swap of key and value bits shows)."""
    import numpy as np

    from adaptive_kv.policies.controller.options import HeadOption, keeps_nbytes

    grid = tuple(HeadOption(f, kb, vb, "global") for f in (0.4, 0.1) for kb, vb in ((16, 16), (8, 4), (16, 2), (4, 16)))
    # group 128 > head_dim 64: key scales (per channel per group) and value scales (per token, one
    # group of channels) then cost differently, so swapped key/value bits change the bytes
    layout = dict(sink_tokens=4, recent_window=12, group_size=128, scorer="snapkv", selection="per_head")
    keeps = np.array([[16, 17, 144, 145, 271, 272, 299, 300], [300, 143, 16, 273, 65, 290, 31, 200]])
    got = keeps_nbytes(grid, keeps, Layout(**layout), 64, 2)
    for n in range(keeps.shape[0]):
        for o, option in enumerate(grid):
            # a second, evicting head: scores are tracked as in any plan that evicts
            plan = Plan(((HeadBudget(int(keeps[n, o]), option.key_bits, option.value_bits), HeadBudget(16)),), **layout)
            assert got[n, o] == plan.head_nbytes(0, 0, 300, 64, 2), (n, option)
