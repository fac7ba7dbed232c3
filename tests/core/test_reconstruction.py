"""Context-reconstruction scores (KVzip) and global allocation (tier 1)."""

import copy

import pytest
import torch

from adaptive_kv import CompressedCache, Plan
from adaptive_kv.plan import Layout
from adaptive_kv.policies import get_policy
from adaptive_kv.policies.global_allocation import allocate_globally, global_keeps
from adaptive_kv.reconstruction import ReconstructionRequest
from conftest import build_tiny_model

PROMPT, PART_PROMPT = (11, 12, 13), (21, 22)
# fp32 attention probabilities: the fused pass (two flash calls merged by their log-sum-exps) vs
# transformers' eager attention, within 1e-4 of each probability (the blocked torch reference
# agrees to 1e-5 absolute)
SCORE_ATOL, SCORE_RTOL = 1e-5, 1e-4


def _sharp(kind: str) -> torch.nn.Module:
    """A tiny model with scaled q/k projections, so attention is peaked and errors show."""
    model = build_tiny_model(kind)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@torch.no_grad()
def _direct_scores(model, context: list[int], request: ReconstructionRequest) -> torch.Tensor:
    """Materialised eager attention over context + each pass: max over the pass's queries and group heads."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    cfg = eager.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    best = None
    for _, ids in request.chunks():
        out = eager(torch.tensor([context + ids]), output_attentions=True)
        per_layer = []
        for probs in out.attentions:  # (1, H_q, N, N)
            part = probs[0, :, len(context) :, : len(context)]  # pass queries x context keys
            part = part.amax(1).view(cfg.num_key_value_heads, group, -1).amax(1)
            per_layer.append(part)
        scores = torch.stack(per_layer)
        best = scores if best is None else torch.maximum(best, scores)
    return best


@pytest.mark.parametrize("kind, chunk", [("llama_gqa", 512), ("llama_gqa", 40), ("qwen2", 64), ("llama_mha", 97)])
def test_scores_equal_a_direct_computation(kind, chunk):
    model = _sharp(kind)
    context = torch.randint(0, 1000, (97,), generator=torch.Generator().manual_seed(4)).tolist()
    request = ReconstructionRequest(tuple(context), PROMPT, PART_PROMPT, chunk=chunk)
    cache = CompressedCache(model, capture=True, reconstruction=request)
    with torch.no_grad():
        model(torch.tensor([context]), cache=cache)
    got = cache.stats.token_scores["reconstruction"]
    torch.testing.assert_close(got, _direct_scores(model, context, request), atol=SCORE_ATOL, rtol=SCORE_RTOL)
    assert len(request.chunks()) == -(-97 // chunk)
    names = cache.stats.feature_names
    assert names[-5] == "recon_top25_mass" and cache.stats.features.shape[-1] == len(names)
    # global shares, directly: each head's count among the top k of all scores (ties: earlier first), over T
    num_layers, num_heads, seq_len = got.shape
    entries = sorted(((-float(v), i) for i, v in enumerate(got.flatten().tolist())))
    for q, name in zip((0.4, 0.2, 0.1, 0.05), names[-4:]):
        k = -(-int(q * 100) * got.numel() // 100)
        direct = torch.zeros(num_layers * num_heads)
        for _, i in entries[:k]:
            direct[i // seq_len] += 1 / seq_len
        torch.testing.assert_close(cache.stats.feature(name).flatten(), direct)


def test_cache_after_reconstruction_equals_plain_prefill():
    model = _sharp("llama_gqa")
    ids = torch.randint(0, 1000, (1, 150), generator=torch.Generator().manual_seed(5))
    plain = CompressedCache(model, capture=True)
    recon = CompressedCache(model, capture=True,
                            reconstruction=ReconstructionRequest(tuple(ids[0].tolist()), PROMPT, PART_PROMPT, chunk=64))
    with torch.no_grad():
        logits_plain = model(ids, cache=plain).logits
        logits_recon = model(ids, cache=recon).logits
    assert torch.equal(logits_plain, logits_recon)
    for a, b in zip(plain.layers, recon.layers):
        assert a.seen_tokens == b.seen_tokens == 150
        assert torch.equal(a.prefill[0], b.prefill[0]) and torch.equal(a.prefill[1], b.prefill[1])
    for name, scores in plain.stats.token_scores.items():
        assert torch.equal(scores, recon.stats.token_scores[name])


def test_reconstruction_needs_the_context_ids():
    model = build_tiny_model("llama_gqa")
    with pytest.raises(ValueError, match="ReconstructionRequest.for_prompt"):
        CompressedCache(model, plan_provider=lambda s: None, stats_config=get_policy("kvzip").stats_config())
    cache = CompressedCache(model, plan=Plan.uniform(2, 2, keep=40, scorer="reconstruction", recent_window=8, group_size=16))
    with pytest.raises(ValueError, match="'reconstruction' was not read during prefill"):
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, 100)), cache=cache)


def test_global_keeps_follow_the_scores():
    # head (0, 1) holds the 30 highest scores of the middle, head (1, 0) the next 20
    scores = torch.rand(2, 2, 100) * 0.1
    scores[0, 1, 10:40] = 1.0
    scores[1, 0, 50:70] = 0.5
    keeps = global_keeps(scores, 50, sinks=4, window=8)
    assert keeps.tolist() == [[12, 42], [32, 12]]


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125, 0.08])
@pytest.mark.parametrize("bits", [(16, 16), (4, 4), (4, 2), (2, 2)])
def test_global_allocation_meets_budget_exactly(budget, bits):
    layout = Layout(sink_tokens=4, recent_window=32, group_size=32, scorer="reconstruction", selection="per_head")
    scores = torch.rand(4, 3, 1000, generator=torch.Generator().manual_seed(0)) ** 4
    plan = allocate_globally(scores, budget, layout, head_dim=64, dtype_bytes=2, key_bits=bits[0], value_bits=bits[1])
    full = plan.full_nbytes(1000, 64, 2)
    assert plan.nbytes(1000, 64, 2) <= budget * full
    richer = allocate_globally(scores, budget * 1.5, layout, head_dim=64, dtype_bytes=2, key_bits=bits[0], value_bits=bits[1])
    tokens = lambda p: sum(b.keep or 1000 for row in p.heads for b in row)  # noqa: E731
    assert tokens(richer) > tokens(plan) or tokens(plan) == 12 * 1000  # the budget, not a cap, decides the count


def test_kvzip_policy_infeasible_budget_names_the_minimum():
    from adaptive_kv.stats import AttentionStats, FEATURE_NAMES

    stats = AttentionStats(torch.zeros(2, 2, len(FEATURE_NAMES)), {"reconstruction": torch.rand(2, 2, 300)}, 300,
                           head_dim=16, dtype_bytes=4)
    with pytest.raises(ValueError, match=r"budget 0.01 is below the minimum feasible 0\.\d+ for seq_len=300"):
        get_policy("kvzip").plan(stats, 0.01)


@pytest.mark.parametrize("num_kv, group, q_len", [(2, 2, 37), (3, 3, 300), (4, 1, 5)])
def test_fused_pass_equals_its_torch_reference(num_kv, group, q_len):
    from adaptive_kv.reconstruction import ReconstructionPass

    gen = torch.Generator().manual_seed(q_len)
    seq_len, dim = 90, 16
    keys, values = [torch.randn(num_kv, seq_len, dim, generator=gen) * 3], [torch.randn(num_kv, seq_len, dim, generator=gen)]
    query = torch.randn(1, num_kv * group, q_len, dim, generator=gen) * 3
    k_new, v_new = torch.randn(1, num_kv, q_len, dim, generator=gen), torch.randn(1, num_kv, q_len, dim, generator=gen)
    fused, reference = ReconstructionPass(keys, values), ReconstructionPass(keys, values)
    for _ in range(2):  # a second chunk keeps the running max
        got = fused.attend(0, query, k_new, v_new, 0.25)
        want = reference.attend_reference(0, query, k_new, v_new, 0.25)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        query = query.roll(1, dims=2)
    torch.testing.assert_close(fused.scores[0], reference.scores[0], atol=1e-6, rtol=1e-4)
