"""Prefill statistics against an independent calculation (tier 1).

The reference materialises the full causal T x T attention of every query head in float64 with
plain torch, keeps the window's rows and averages each GQA group, then computes every feature
and token score from that, from the spec in words (stats.py docstrings), sharing no code with
`adaptive_kv.stats` or the kernels.
"""

import math

import pytest
import torch

from adaptive_kv.stats import FEATURE_NAMES, QUANT_BITS, TOP_MASS_FRACTIONS, StatsConfig, observe_layer

# Tolerances, one table for the file (observe_layer runs in fp32, the reference in float64).
# Attention-derived features and scores: measured max abs error 1.6e-6 (window sums of 32 rows).
ATTN_ATOL = 1e-5
# Quantisation errors, relative: the cache rounds scale and zero to fp16 (widening the grid a
# little); the reference uses the exact float64 min/max grid. Measured gaps: 2 and 4 bit <= 3.6e-3;
# 8 bit <= 8.6e-2 (an fp16 zero near a +4 offset channel is as coarse as one 8-bit step). A wrong
# bit-width, grouping axis or norm moves them by > 30 %.
QERR_RTOL = {2: 1e-2, 4: 1e-2, 8: 0.15}
KEY_NORM_ATOL = 1e-5  # fp32 norms of O(10) keys


def _reference_window(query, keys, scaling, window):
    """GQA-averaged attention rows of the last `window` queries: (H_kv, W, T) float64."""
    num_q, seq_len, _ = query.shape
    num_kv = keys.shape[0]
    rep, w = num_q // num_kv, min(window, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()  # query i sees keys 0..i
    rows = []
    for kv in range(num_kv):
        group = []
        for q_head in range(kv * rep, (kv + 1) * rep):
            logits = query[q_head].double() @ keys[kv].double().T * scaling  # (T, T)
            probs = logits.masked_fill(~causal, -math.inf).softmax(-1)
            group.append(probs[seq_len - w :])
        rows.append(torch.stack(group).mean(0))
    return torch.stack(rows)


def _quantise_error(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x with each slice along `dim` rounded to 2**bits levels between its min and max (float64)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    step = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    return torch.round((x - lo) / step) * step + lo


def _reference_qerr(keys, values, group):
    """Relative L2 error per head of K (per channel over G tokens) and V (per token over channel groups)."""
    num_kv, seq_len, head_dim = keys.shape
    if seq_len < group:
        return torch.zeros(num_kv, 2 * len(QUANT_BITS), dtype=torch.float64)
    count = max(1, min(seq_len, 256) // group)  # groups of G tokens spread evenly over the sequence
    starts = [int(i * (seq_len - group) / max(1, count - 1)) if count > 1 else 0 for i in range(count)]
    out = torch.zeros(num_kv, 2 * len(QUANT_BITS), dtype=torch.float64)
    channel_group = min(group, head_dim)
    for head in range(num_kv):
        k = torch.stack([keys[head, s : s + group] for s in starts]).double()  # (n, G, D)
        v = torch.cat([values[head, s : s + group] for s in starts]).double()  # (n*G, D)
        v = v.view(v.shape[0], head_dim // channel_group, channel_group)
        for i, bits in enumerate(QUANT_BITS):
            out[head, i] = (k - _quantise_error(k, bits, 1)).norm() / k.norm()
            out[head, len(QUANT_BITS) + i] = (v - _quantise_error(v, bits, 2)).norm() / v.norm()
    return out


def _reference(query, keys, values, scaling, layer_idx, num_layers, config):
    """Features (H_kv, F) and token scores {name: (H_kv, T)} computed from the spec."""
    num_kv, seq_len, _ = keys.shape
    attn = _reference_window(query, keys, scaling, config.window)  # (H_kv, W, T)
    w = attn.shape[1]
    plogp = torch.where(attn > 0, attn * attn.clamp_min(1e-300).log(), torch.zeros_like(attn))
    visible = torch.arange(seq_len - w + 1, seq_len + 1, dtype=torch.float64)  # row i sees this many keys
    entropy = (-plogp.sum(-1) / visible.log().clamp_min(1e-6)).mean(-1)
    mass = attn.sum(1) / w  # (H_kv, T): the window's average attention, sums to 1
    ordered = mass.sort(-1, descending=True).values
    top = [ordered[:, : max(1, math.ceil(f * seq_len))].sum(-1) for f in TOP_MASS_FRACTIONS]
    channel_max = keys.double().abs().amax(1)  # (H_kv, D)
    lower_median = channel_max.sort(-1).values[:, (keys.shape[-1] - 1) // 2]
    features = {
        "entropy": entropy,
        **{f"top{int(f * 100)}_mass": t for f, t in zip(TOP_MASS_FRACTIONS, top)},
        "sink_mass": mass[:, : config.sink_tokens].sum(-1),
        "recent_mass": mass[:, -config.window :].sum(-1),
        "key_outlier_ratio": channel_max.amax(-1) / lower_median,
        "log_seq_len": torch.full((num_kv,), math.log(seq_len), dtype=torch.float64),
        "depth": torch.full((num_kv,), layer_idx / max(1, num_layers - 1), dtype=torch.float64),
    }
    qerr = _reference_qerr(keys, values, config.group_size)
    for i, bits in enumerate(QUANT_BITS):
        features[f"key_qerr_{bits}"] = qerr[:, i]
        features[f"value_qerr_{bits}"] = qerr[:, len(QUANT_BITS) + i]
    window_sum = attn.sum(1)
    half = 3  # SnapKV's max-pool of kernel 7: a token takes the best score within 3 positions
    pooled = torch.stack([window_sum[:, max(0, t - half) : t + half + 1].amax(-1) for t in range(seq_len)], -1)
    scores = {"window": window_sum, "last_query": attn[:, -1], "snapkv": pooled, "key_norm": -keys.double().norm(dim=-1)}
    return features, scores


def _inputs(num_q, num_kv, seq_len, head_dim, seed):
    """Sharp random queries, keys with two outlier channels, values."""
    gen = torch.Generator().manual_seed(seed)
    query = 3 * torch.randn(num_q, seq_len, head_dim, generator=gen)
    keys = torch.randn(num_kv, seq_len, head_dim, generator=gen)
    keys[..., 1] *= 8
    keys[..., 5] += 4
    values = torch.randn(num_kv, seq_len, head_dim, generator=gen)
    return query, keys, values


def _check(features, scores, ref_features, ref_scores):
    for i, name in enumerate(FEATURE_NAMES):
        rtol = QERR_RTOL[int(name.rsplit("_", 1)[1])] if "qerr" in name else 0
        atol = 0 if "qerr" in name else ATTN_ATOL
        torch.testing.assert_close(features[:, i].double(), ref_features[name], atol=atol, rtol=rtol, msg=name)
    for name in ("window", "last_query", "snapkv"):
        torch.testing.assert_close(scores[name].double(), ref_scores[name], atol=ATTN_ATOL, rtol=0, msg=name)
    torch.testing.assert_close(scores["key_norm"].double(), ref_scores["key_norm"], atol=KEY_NORM_ATOL, rtol=0)


@pytest.mark.parametrize(
    "num_q, num_kv, seq_len, head_dim, window, group",
    [
        (4, 2, 97, 16, 32, 16),  # GQA
        (4, 1, 17, 16, 32, 16),  # MQA, the window longer than the prompt
        (2, 2, 97, 64, 17, 16),  # MHA, an odd window, four value scale groups per token
        (4, 2, 1000, 128, 32, 32),  # head_dim 128, the quantisation sample strided over 1000 tokens
    ],
)
def test_features_and_scores_match_full_attention(num_q, num_kv, seq_len, head_dim, window, group):
    query, keys, values = _inputs(num_q, num_kv, seq_len, head_dim, seed=seq_len + head_dim)
    config = StatsConfig(window=window, sink_tokens=4, group_size=group)
    scaling = head_dim**-0.5
    obs = observe_layer(query, keys, values, scaling, 1, 3, config)
    ref_features, ref_scores = _reference(query, keys, values, scaling, 1, 3, config)
    _check(obs.features, obs.token_scores, ref_features, ref_scores)


def test_cache_reads_statistics_from_the_models_rotated_queries_and_keys():
    """End to end: the cache's stats equal the reference on q/k/v recomputed from the model's own layers."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from adaptive_kv import CompressedCache, Plan
    from conftest import build_tiny_model

    model = build_tiny_model("llama_gqa")
    cfg = model.config
    num_q, num_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inputs = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda m, args, kw, i=i: inputs.__setitem__(i, kw["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    seen = {}

    def provider(stats):
        seen["stats"] = stats
        return Plan.full(cfg.num_hidden_layers, num_kv)

    seq_len = 97
    ids = torch.randint(0, 1000, (1, seq_len), generator=torch.Generator().manual_seed(12))
    config = StatsConfig(window=32, sink_tokens=4, group_size=16)
    try:
        with torch.no_grad():
            model(ids, cache=CompressedCache(model, plan_provider=provider, stats_config=config))
    finally:
        for hook in hooks:
            hook.remove()
    stats = seen["stats"]
    positions = torch.arange(seq_len)[None]
    with torch.no_grad():
        for layer_idx, layer in enumerate(model.model.layers):
            hidden = inputs[layer_idx]  # (1, T, hidden) after the input norm
            attn = layer.self_attn
            q = attn.q_proj(hidden).view(1, seq_len, num_q, head_dim).transpose(1, 2)
            k = attn.k_proj(hidden).view(1, seq_len, num_kv, head_dim).transpose(1, 2)
            v = attn.v_proj(hidden).view(1, seq_len, num_kv, head_dim).transpose(1, 2)
            cos, sin = model.model.rotary_emb(hidden, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            ref_features, ref_scores = _reference(q[0], k[0], v[0], head_dim**-0.5, layer_idx, cfg.num_hidden_layers, config)
            scores = {name: s[layer_idx] for name, s in stats.token_scores.items()}
            _check(stats.features[layer_idx], scores, ref_features, ref_scores)
