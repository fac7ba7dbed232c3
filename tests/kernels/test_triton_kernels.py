"""Triton backend vs the torch reference (tier 1 on CPU via TRITON_INTERPRET=1; real kernels on CUDA).

Integer codes and fp16 scale/zero compare exactly; floating outputs use the table below.
"""

import dataclasses
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it then

import pytest  # noqa: E402

pytest.importorskip("triton")

from adaptive_kv import CompressedCache, HeadBudget, Plan  # noqa: E402
from adaptive_kv.kernels import dispatch, get_backend  # noqa: E402
from adaptive_kv.kernels import reference as ref  # noqa: E402
from adaptive_kv.kernels import triton_backend as tb  # noqa: E402
from adaptive_kv.kernels.layout import DecodeLayout  # noqa: E402
from adaptive_kv.stats import StatsConfig, observe_layer  # noqa: E402
from adaptive_kv.store import Residual, quantize_groups  # noqa: E402
from conftest import build_tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per compared output. Measured under the interpreter (fp32): attention max error
# 5.4e-7 vs SDPA (different summation order), mass 1.8e-7, dequantised values identical (FMA is
# disabled in the launch, so codes * scale + zero rounds as in torch). fp16 attention rounds P to
# fp16 before P @ V (FlashAttention-2 does too), hence ~1e-3. bf16 dequantisation: Triton's
# interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even, like torch), so allow 1 ulp.
# Fused decode partial state (max, sum, sum of exp-weighted values up to ~20): max abs error 4.3e-6;
# merged decode output 1.1e-6. Window statistics (sums, last row, row entropy up to ~5): 1.9e-6.
TOL = {
    "dequant": (1e-6, 1e-6),
    "dequant_bf16": (1e-6, 2**-7),
    "attention_fp32": (1e-5, 1e-5),
    "attention_fp16": (2e-3, 2e-3),
    "mass": (1e-5, 1e-5),
    "window_stats": (1e-5, 1e-5),
}
MIXED_LENGTHS = (1, 17, 97, 300)  # tokens of KV heads 0..3


def _close(out, expected, kind):
    atol, rtol = TOL[kind]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 17])
def test_quantize_keys_codes_exact(bits, head_dim, group):
    torch.manual_seed(bits * group)
    keys = torch.randn(3, group, head_dim, device=DEVICE) * torch.linspace(0.1, 8, head_dim, device=DEVICE)
    got, want = tb.quantize_keys(keys, bits), ref.quantize_keys(keys, bits)
    for g, w in zip(got, want):  # packed codes, scale, zero
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_tokens", [1, 97, 300])
def test_quantize_values_codes_exact(bits, head_dim, num_tokens):
    torch.manual_seed(bits + num_tokens)
    values = (torch.randn(num_tokens, head_dim, device=DEVICE) * 3).half()
    got, want = tb.quantize_values(values, bits, 32), ref.quantize_values(values, bits, 32)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_match(bits):
    # 8 bit: the fp16 scale underflows to 0 and the reference's code is 0 (NaN cast); same here
    keys = torch.ones(2, 16, 64, device=DEVICE)
    for g, w in zip(tb.quantize_keys(keys, bits), ref.quantize_keys(keys, bits)):
        assert torch.equal(g, w)
    for g, w in zip(tb.quantize_values(keys[0], bits, 32), ref.quantize_values(keys[0], bits, 32)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dequantize_matches_reference(bits, head_dim):
    torch.manual_seed(bits)
    keys = torch.randn(4, 17, head_dim, device=DEVICE)
    packed, scale, zero = ref.quantize_keys(keys, bits)
    group_len = torch.tensor([17, 5, 1, 16], device=DEVICE)  # groups shrunk by eviction
    packed = packed[: int(group_len.sum())]
    for dtype in (torch.float32, torch.bfloat16):
        got = tb.dequantize_keys(packed, scale, zero, group_len, bits, dtype)
        assert got.dtype == dtype
        kind = "dequant_bf16" if dtype == torch.bfloat16 else "dequant"
        _close(got, ref.dequantize_keys(packed, scale, zero, group_len, bits, dtype), kind)
    v_packed, v_scale, v_zero = ref.quantize_values(keys[0], bits, 32)
    got = tb.dequantize_values(v_packed, v_scale, v_zero, bits, torch.float16)
    _close(got, ref.dequantize_values(v_packed, v_scale, v_zero, bits, torch.float16), "dequant")


# --------------------------------------------------------------------------- attention
def _varlen_inputs(head_dim, rep, q_len, dtype=torch.float32, lengths=MIXED_LENGTHS, seed=0):
    """Tokens of every head interleaved in flat order (as sinks + buckets + residual are)."""
    torch.manual_seed(seed)
    heads = torch.cat([torch.full((n,), h) for h, n in enumerate(lengths)])
    heads = heads[torch.randperm(heads.numel())]  # a head's tokens keep their relative order
    n = heads.numel()
    query = torch.randn(len(lengths) * rep, q_len, head_dim, device=DEVICE, dtype=dtype)
    keys = torch.randn(n, head_dim, device=DEVICE, dtype=dtype)
    values = torch.randn(n, head_dim, device=DEVICE, dtype=dtype)
    return query, keys, values, heads.to(DEVICE), len(lengths), head_dim**-0.5


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rep", [1, 3, 4])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("need_mass", [False, True])
def test_varlen_attention_matches_reference(head_dim, rep, q_len, need_mass):
    # a head holds at least its q new tokens (fewer leaves query rows with nothing to attend)
    args = _varlen_inputs(head_dim, rep, q_len, lengths=tuple(max(n, q_len) for n in MIXED_LENGTHS))
    out, mass = tb.varlen_attention(*args, new_tokens=q_len, need_mass=need_mass)
    want_out, want_mass = ref.varlen_attention(*args, new_tokens=q_len, need_mass=need_mass)
    _close(out, want_out, "attention_fp32")
    if need_mass:
        _close(mass, want_mass, "mass")
    else:
        assert mass is None


@pytest.mark.parametrize("num_splits", [2, 5])
def test_sequence_splits_merge_exactly(num_splits):
    args = _varlen_inputs(64, 4, 1)
    out, mass = tb._varlen_attention(*args, need_mass=True, num_splits=num_splits)
    want_out, want_mass = ref.varlen_attention(*args, new_tokens=1, need_mass=True)
    _close(out, want_out, "attention_fp32")
    _close(mass, want_mass, "mass")


def test_varlen_attention_fp16():
    # every head holds its 2 new tokens: a query row that sees nothing is undefined (CUDA SDPA gives 0)
    args = _varlen_inputs(64, 3, 2, dtype=torch.float16, lengths=tuple(max(n, 2) for n in MIXED_LENGTHS))
    out, _ = tb.varlen_attention(*args, new_tokens=2)
    assert out.dtype == torch.float16
    _close(out, ref.varlen_attention(*args, new_tokens=2)[0], "attention_fp16")


# --------------------------------------------------------------------------- fused decode over the packed store
DECODE_BITS = [(2, 2), (4, 4), (8, 8), (16, 16), (2, 16), (16, 4)]  # (key_bits, value_bits)


def _on(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _decode_store(head_dim, rep, bits_list, dtype=torch.float32, seed=0):
    """A layer's store with mixed per-head counts: 4 KV heads, 2 sinks, one bucket per bits pair
    (head 2 holds no group, tokens evicted so groups shrink or vanish), residual of 1/5/17/3 tokens."""
    torch.manual_seed(seed)
    num_kv, group = 4, 16
    sinks = tuple(torch.randn(num_kv, 2, head_dim, dtype=dtype) for _ in range(2))
    buckets = []
    for key_bits, value_bits in bits_list:
        group_heads = torch.tensor([0, 1, 3, 1, 3, 3, 0])
        keys = torch.randn(7, group, head_dim, dtype=dtype) * torch.linspace(0.2, 3, head_dim, dtype=dtype)
        values = torch.randn(7, group, head_dim, dtype=dtype)
        bucket = quantize_groups(ref, keys, values, group_heads, key_bits, value_bits, None)
        keep = torch.rand(bucket.num_tokens) > 0.3
        keep[group : 2 * group] = False  # one group evicted whole
        bucket = bucket.select(keep)
        buckets.append(dataclasses.replace(bucket, **{f.name: _on(getattr(bucket, f.name), DEVICE)
                                                      for f in dataclasses.fields(bucket)}))
    lengths = torch.tensor([1, 5, 17, 3])
    n = int(lengths.sum())
    residual = Residual(torch.randn(n, head_dim, dtype=dtype, device=DEVICE),
                        torch.randn(n, head_dim, dtype=dtype, device=DEVICE), lengths, None)
    query = torch.randn(num_kv * rep, 1, head_dim, dtype=dtype, device=DEVICE)
    sinks = tuple(t.to(DEVICE) for t in sinks)
    return query, sinks, buckets, residual, num_kv, head_dim**-0.5


def _layout(sinks, buckets, num_kv, group=16, tokens_per_item=None):
    lengths = torch.full((num_kv,), sinks[0].shape[1], device=DEVICE)
    sink_segment = ref.Segment.full_precision(sinks[0].reshape(-1, sinks[0].shape[2]), sinks[1].reshape(-1, sinks[1].shape[2]), lengths)
    return DecodeLayout.build([[sink_segment, *buckets]], num_kv, group, tokens_per_item)


def _with_scores(store):
    """The store with fresh H2O scores on every bucket and the residual (a copy per backend)."""
    query, sinks, buckets, residual, num_kv, scaling = store
    torch.manual_seed(7)
    buckets = [dataclasses.replace(b, scores=torch.rand(b.num_tokens, device=DEVICE)) for b in buckets]
    residual = dataclasses.replace(residual, scores=torch.rand(residual.keys.shape[0], device=DEVICE))
    return query, sinks, buckets, residual, num_kv, scaling


@pytest.mark.parametrize("bits", DECODE_BITS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rep", [1, 3, 4])
def test_layout_decode_matches_reference(bits, head_dim, rep):
    query, sinks, buckets, residual, num_kv, scaling = _decode_store(head_dim, rep, [bits], seed=rep)
    layout = _layout(sinks, buckets, num_kv)
    out = tb.layout_decode(query, layout, residual, scaling)
    _close(out, ref.layout_decode(query, layout, residual, scaling), "attention_fp32")


@pytest.mark.parametrize("tokens_per_item", [16, 32, None])
def test_layout_decode_splits_and_mixed_bits(tokens_per_item):
    # heads split over many items (merged by log-sum-exp), one launch over every bit pair
    query, sinks, buckets, residual, num_kv, scaling = _decode_store(64, 4, DECODE_BITS, seed=3)
    layout = _layout(sinks, buckets, num_kv, tokens_per_item=tokens_per_item)
    want, _ = ref.decode_attention(query, sinks, buckets, residual, num_kv, scaling)  # independent of the layout
    _close(tb.layout_decode(query, layout, residual, scaling), want, "attention_fp32")


@pytest.mark.parametrize("bits", [(4, 4), (2, 8)])
def test_layout_decode_joined_groups(bits):
    # a head's full groups stored one after another (as a plan lays them out) form one range whose
    # tiles each read their own group's key scales
    query, sinks, _, residual, num_kv, scaling = _decode_store(64, 2, [], seed=6)
    heads = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3, 2])
    keys = torch.randn(10, 16, 64) * torch.linspace(0.2, 3, 64) + torch.randn(10, 1, 64) * 4  # groups differ in range
    bucket = quantize_groups(ref, keys, torch.randn(10, 16, 64), heads, *bits, None)
    bucket = dataclasses.replace(bucket, **{f.name: _on(getattr(bucket, f.name), DEVICE) for f in dataclasses.fields(bucket)})
    layout = _layout(sinks, [bucket], num_kv, tokens_per_item=64)
    assert layout.items[:, 3].max() == 64  # four groups joined
    want, _ = ref.decode_attention(query, sinks, [bucket], residual, num_kv, scaling)
    _close(tb.layout_decode(query, layout, residual, scaling), want, "attention_fp32")


def test_layout_decode_fp16():
    query, sinks, buckets, residual, num_kv, scaling = _decode_store(64, 4, [(4, 2), (8, 16)], dtype=torch.float16)
    layout = _layout(sinks, buckets, num_kv)
    out = tb.layout_decode(query, layout, residual, scaling)
    assert out.dtype == torch.float16
    _close(out, ref.layout_decode(query, layout, residual, scaling), "attention_fp16")


@pytest.mark.parametrize("rep", [1, 4])
def test_layout_decode_accumulates_mass_in_place(rep):
    store = _decode_store(64, rep, [(4, 2), (8, 16), (16, 16)], seed=5)
    got_q, got_sinks, got_buckets, got_residual, num_kv, scaling = _with_scores(store)
    _, sinks, want_buckets, want_residual, _, _ = _with_scores(store)
    before = [b.scores.clone() for b in want_buckets] + [want_residual.scores.clone()]
    out = tb.layout_decode(got_q, _layout(got_sinks, got_buckets, num_kv, tokens_per_item=16), got_residual, scaling,
                           accumulate_mass=True)
    want = ref.layout_decode(got_q, _layout(sinks, want_buckets, num_kv), want_residual, scaling, accumulate_mass=True)
    _close(out, want, "attention_fp32")
    # independent: the mass of one decode query over the whole store, from the dequantised reference
    _, mass = ref.decode_attention(got_q, sinks, store[2], store[3], num_kv, scaling, need_mass=True)
    got = torch.cat([b.scores for b in got_buckets] + [got_residual.scores]) - torch.cat(before)
    _close(got, mass[num_kv * sinks[0].shape[1]:], "mass")
    for g, w in zip(got_buckets + [got_residual], want_buckets + [want_residual]):
        _close(g.scores, w.scores, "mass")


def test_layout_decode_batch_of_stores():
    # two sequences' stores in one layout: rows b * H + h, one launch for both
    first = _decode_store(64, 2, [(4, 4)], seed=1)
    second = _decode_store(64, 2, [(2, 8), (16, 4)], seed=2)
    num_kv, scaling = first[4], first[5]
    segs = []
    for _, sinks, buckets, _, _, _ in (first, second):
        lengths = torch.full((num_kv,), sinks[0].shape[1], device=DEVICE)
        segs.append([ref.Segment.full_precision(sinks[0].reshape(-1, 64), sinks[1].reshape(-1, 64), lengths), *buckets])
    layout = DecodeLayout.build(segs, num_kv, 16, 32)
    residual = Residual(torch.cat([first[3].keys, second[3].keys]), torch.cat([first[3].values, second[3].values]),
                        torch.cat([first[3].lengths, second[3].lengths]).to(DEVICE), None)
    out = tb.layout_decode(torch.cat([first[0], second[0]]), layout, residual, scaling)
    for i, (query, sinks, buckets, res, _, _) in enumerate((first, second)):
        want, _ = ref.decode_attention(query, sinks, buckets, res, num_kv, scaling)
        _close(out[i * query.shape[0] : (i + 1) * query.shape[0]], want, "attention_fp32")


def test_layout_ranges_cover_every_token_once():
    # independent of the kernels: every stored token lies in exactly one item of its own head's row
    _, sinks, buckets, _, num_kv, _ = _decode_store(64, 1, DECODE_BITS, seed=4)
    layout = _layout(sinks, buckets, num_kv, tokens_per_item=32)
    items = layout.items.cpu()
    for index, seg in enumerate(layout.stores[0]):
        heads = seg.group_head.long().repeat_interleave(seg.group_len.long()).cpu()
        covered = torch.zeros(seg.keys.shape[0], dtype=torch.long)
        for item in items[items[:, 0] == index].tolist():
            _, row, start, count, _ = item
            assert count <= 32 or index == 0
            covered[start : start + count] += 1
            assert (heads[start : start + count] == row).all()
        assert (covered == 1).all()
    ranges = layout.item_ranges.cpu()
    for row in range(num_kv):
        assert (items[ranges[row] : ranges[row + 1], 1] == row).all()


# --------------------------------------------------------------------------- prefill statistics
@pytest.mark.parametrize("seq_len", [17, 97, 300])
@pytest.mark.parametrize("window", [8, 32])
@pytest.mark.parametrize("head_dim,rep", [(64, 1), (128, 3)])
def test_window_attention_scores_match_reference(seq_len, window, head_dim, rep):
    torch.manual_seed(seq_len + window)
    query = torch.randn(2 * rep, seq_len, head_dim, device=DEVICE)
    keys = torch.randn(2, seq_len, head_dim, device=DEVICE)
    got = tb.window_attention_scores(query, keys, head_dim**-0.5, window)
    want = ref.window_attention_scores(query, keys, head_dim**-0.5, window)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        _close(got[name], want[name], "window_stats")


def test_observe_layer_same_on_both_backends():
    torch.manual_seed(1)
    query, keys, values = torch.randn(6, 97, 64), torch.randn(2, 97, 64), torch.randn(2, 97, 64)
    config = StatsConfig(window=8, sink_tokens=4, group_size=16)
    got = observe_layer(query.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), 0.125, 0, 2, config, kernels=tb)
    want = observe_layer(query, keys, values, 0.125, 0, 2, config)
    _close(got.features, want.features, "window_stats")
    for name, scores in want.token_scores.items():
        _close(got.token_scores[name].cpu(), scores, "window_stats")


# --------------------------------------------------------------------------- dispatch, end to end
def test_backend_selectable_and_explains_itself(monkeypatch):
    assert "triton" in dispatch.available_backends()
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert get_backend(DEVICE) is tb
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        reasons = dispatch._BACKENDS["triton"].unavailable_reasons(torch.device("cpu"))
        assert reasons == ["device is not CUDA and TRITON_INTERPRET is not set"]
        assert get_backend("cpu") is ref


def test_importing_adaptive_kv_does_not_import_triton():
    code = "import sys, adaptive_kv, adaptive_kv.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("evict", [True, False])
def test_generation_matches_torch_backend(evict, monkeypatch):
    model = build_tiny_model("llama_gqa").to(DEVICE)  # head_dim 16, 4 query / 2 KV heads
    layout = dict(recent_window=8, group_size=16, sink_tokens=4)
    # mixed bits per head; with H2O eviction (the fused mass pass adds to the scores) or without
    keep = (40, 50) if evict else (None, None)
    plan = Plan(((HeadBudget(keep[0], 2, 8), HeadBudget(None, 4, 4)), (HeadBudget(keep[1], 8, 2), HeadBudget(None, 16, 16))), **layout)
    mass_passes = []
    launch = tb.K.layout_mass_kernel
    monkeypatch.setattr(tb.K, "layout_mass_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: mass_passes.append(1) or launch[grid]})())
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 77), device=DEVICE)
    sequences = {}
    for backend in ("torch", "triton"):
        # assembled=False: decode through each backend's layout_decode (the CPU default keeps
        # assembled operands instead, which would leave the fused kernels unused)
        cache = CompressedCache(model, plan=plan, backend=backend, assembled=False)
        sequences[backend] = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
    assert sequences["triton"].shape[1] == 77 + 8
    assert torch.equal(sequences["triton"], sequences["torch"])
    assert bool(mass_passes) == evict
