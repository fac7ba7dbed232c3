"""Decode-step speed of the fused compressed decode (`layout_decode`) against bf16 SDPA (CUDA).

One attention layer of a Llama-8B shape (32 query heads, 8 KV heads, head_dim 128, bf16), at
contexts of 4k / 32k / 128k tokens and batches of 1 and 16 sequences (each sequence its own
store; one `DecodeLayout` over the batch, one launch set per step). Plans:

* `4bit`, `2bit`: every token kept, keys and values at 4 / 2 bits (KIVI layout, groups of 32);
* `learned`: per-head keeps and bits of the shipped controller's plan at 1/8 of the bytes
  (`results/learned_plan_2k_0.125.json`, the embedded model on a 2k prompt; 8 of its 90 heads
  spread evenly, keeps scaled to the context) with H2O scores, so the mass pass runs as in the
  cache.

Each store holds 4 sinks and a 32-token residual per head besides its packed groups. Reported per
row: the fused step (eager and replayed from a CUDA graph), bf16 SDPA over the uncompressed cache
(eager and graph), the speed-up, the bytes the compressed step reads (its store), the achieved
bandwidth against the device's measured copy bandwidth, whether the step ran with
`torch.cuda.set_sync_debug_mode("error")` and whether its graph replay equals the eager output;
at 4k, the largest difference from the torch reference.

    python benchmarks/decode_speed.py [--out benchmarks/results/decode_speed_h200.json] [--smoke-test]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, GROUP, SINKS, RESIDUAL = 32, 8, 128, 32, 4, 32
CONTEXTS = (4096, 32768, 131072)
BATCHES = (1, 16)
PLANS = ("4bit", "2bit", "learned")
LEARNED_PLAN = Path(__file__).parent / "results" / "learned_plan_2k_0.125.json"


def learned_heads(context: int) -> list[tuple[int, int, int]]:
    """(tokens kept, key bits, value bits) of 8 heads of the shipped controller's 1/8 plan, at `context`."""
    data = json.loads(LEARNED_PLAN.read_text())
    heads = [h for layer in data["plan"]["heads"] for h in layer]
    picked = [heads[int((i + 0.5) * len(heads) / NUM_KV_HEADS)] for i in range(NUM_KV_HEADS)]
    scale = context / data["seq_len"]
    return [(context if h["keep"] is None else max(SINKS + RESIDUAL, round(h["keep"] * scale)), h["key_bits"],
             h["value_bits"]) for h in picked]


def plan_heads(plan: str, context: int) -> list[tuple[int, int, int]]:
    if plan == "learned":
        return learned_heads(context)
    bits = int(plan[0])
    return [(context, bits, bits)] * NUM_KV_HEADS


def build_store(tb, heads: list[tuple[int, int, int]], device: str, with_scores: bool):
    """One sequence's layer: sinks segment, one bucket per bit pair (each head's groups contiguous), residual."""
    from adaptive_kv.kernels.reference import Segment
    from adaptive_kv.store import Residual, quantize_groups

    dtype = torch.bfloat16
    sink_k, sink_v = (torch.randn(NUM_KV_HEADS * SINKS, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    sinks = Segment.full_precision(sink_k, sink_v, torch.full((NUM_KV_HEADS,), SINKS, device=device))
    by_bits: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for head, (keep, kb, vb) in enumerate(heads):
        groups = (keep - SINKS - RESIDUAL) // GROUP
        if groups:
            by_bits.setdefault((kb, vb), []).append((head, groups))
    buckets = []
    for (kb, vb), parts in by_bits.items():
        group_heads = torch.cat([torch.full((n,), h, device=device) for h, n in parts])
        keys = torch.randn(group_heads.numel(), GROUP, HEAD_DIM, device=device, dtype=dtype)
        values = torch.randn_like(keys)
        scores = torch.rand(group_heads.numel(), GROUP, device=device) if with_scores else None
        buckets.append(quantize_groups(tb, keys, values, group_heads, kb, vb, scores))
        del keys, values
    lengths = torch.full((NUM_KV_HEADS,), RESIDUAL, device=device)
    residual = Residual(*(torch.randn(NUM_KV_HEADS * RESIDUAL, HEAD_DIM, device=device, dtype=dtype) for _ in range(2)),
                        lengths, torch.rand(NUM_KV_HEADS * RESIDUAL, device=device) if with_scores else None)
    return [sinks, *buckets], residual


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def store_nbytes(segments, residual) -> int:
    """Bytes a step reads: every stored tensor (codes, scales, zeros, sinks, residual)."""
    total = _nbytes(residual.keys, residual.values)
    for seg in segments:
        total += _nbytes(seg.keys, seg.values, seg.key_scale, seg.key_zero, seg.value_scale, seg.value_zero)
    return total


def batch_residual(residuals):
    from adaptive_kv.store import Residual

    scores = None if residuals[0].scores is None else torch.cat([r.scores for r in residuals])
    return Residual(torch.cat([r.keys for r in residuals]), torch.cat([r.values for r in residuals]),
                    torch.cat([r.lengths for r in residuals]), scores)


def graph_of(fn):
    """A CUDA graph of `fn` (warmed up on a side stream) and its static output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def copy_bandwidth(do_bench) -> float:
    """Device copy bandwidth in GB/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def measure(tb, ref, do_bench, context: int, batch: int, plan: str, copy_gbs: float) -> dict:
    from adaptive_kv.kernels.layout import DecodeLayout

    heads = plan_heads(plan, context)
    with_scores = plan == "learned"
    stores, residuals = zip(*(build_store(tb, heads, "cuda", with_scores) for _ in range(batch)))
    layout = DecodeLayout.build(stores, NUM_KV_HEADS, GROUP)
    residual = batch_residual(residuals)
    scaling = HEAD_DIM**-0.5
    query = torch.randn(batch * NUM_Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def fused():
        return tb.layout_decode(query, layout, residual, scaling, accumulate_mass=with_scores)

    fused()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises if the step synchronises with the host
    try:
        eager_out = fused().clone()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph, graph_out = graph_of(fused)
    graph.replay()
    torch.cuda.synchronize()
    # mass accumulates on every call, so compare the outputs only (scores grow by design)
    graph_equal = bool(torch.equal(graph_out, eager_out))
    ref_error = None
    if context <= 4096:
        want = ref.layout_decode(query, layout, residual, scaling)
        ref_error = float((eager_out.float() - want.float()).abs().max())
    fused_ms = do_bench(fused)
    fused_graph_ms = do_bench(graph.replay)
    read = sum(store_nbytes(s, r) for s, r in zip(stores, residuals))
    del graph, graph_out
    kept = sum(h[0] for h in heads)
    dense_k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    q4 = query.view(batch, NUM_Q_HEADS, 1, HEAD_DIM)

    def sdpa():
        return F.scaled_dot_product_attention(q4, dense_k, dense_v, scale=scaling, enable_gqa=True)

    sdpa_ms = do_bench(sdpa)
    sdpa_graph, _ = graph_of(sdpa)
    sdpa_graph_ms = do_bench(sdpa_graph.replay)
    dense_bytes = 2 * dense_k.numel() * dense_k.element_size()
    del dense_k, dense_v, sdpa_graph
    return dict(
        context=context, batch=batch, plan=plan, items=layout.num_items,
        tokens_kept_fraction=kept / (NUM_KV_HEADS * context),
        fused_ms=fused_ms, fused_graph_ms=fused_graph_ms, sdpa_bf16_ms=sdpa_ms, sdpa_bf16_graph_ms=sdpa_graph_ms,
        speedup=sdpa_ms / fused_ms, speedup_graph=sdpa_graph_ms / fused_graph_ms,
        compressed_bytes=read, dense_bytes=dense_bytes, compression=dense_bytes / read,
        achieved_gbs=read / fused_graph_ms / 1e6, sdpa_gbs=dense_bytes / sdpa_graph_ms / 1e6, copy_gbs=copy_gbs,
        no_sync=True, graph_equals_eager=graph_equal, max_abs_error_vs_reference=ref_error,
    )


def table(rows: list[dict], device: str, copy_gbs: float) -> str:
    lines = [
        f"Decode step, one layer of a Llama-8B shape (32 q / 8 KV heads, head_dim 128, bf16) on {device}; "
        f"copy bandwidth {copy_gbs:.0f} GB/s. Times from `triton.testing.do_bench` (median, L2 flushed); "
        "graph = replay of a CUDA graph of the step.",
        "",
        "| ctx | batch | plan | kept | bytes vs bf16 | fused ms (graph) | SDPA bf16 ms (graph) | speed-up (graph) "
        "| fused GB/s | % of copy | graph == eager | max err vs ref |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        err = "" if r["max_abs_error_vs_reference"] is None else f"{r['max_abs_error_vs_reference']:.1e}"
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['plan']} | {r['tokens_kept_fraction']:.3f} | 1/{r['compression']:.1f} "
            f"| {r['fused_ms']:.3f} ({r['fused_graph_ms']:.3f}) | {r['sdpa_bf16_ms']:.3f} ({r['sdpa_bf16_graph_ms']:.3f}) "
            f"| {r['speedup']:.2f}x ({r['speedup_graph']:.2f}x) | {r['achieved_gbs']:.0f} "
            f"| {100 * r['achieved_gbs'] / copy_gbs:.0f} % | {r['graph_equals_eager']} | {err} |"
        )
    return "\n".join(lines) + "\n"


def run(contexts, batches, plans, out: Path) -> list[dict]:
    from triton.testing import do_bench

    from adaptive_kv.kernels import reference as ref
    from adaptive_kv.kernels import triton_backend as tb

    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth(do_bench)
    print(f"device: {device}  copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for context in contexts:
        for batch in batches:
            for plan in plans:
                row = measure(tb, ref, do_bench, context, batch, plan, copy_gbs)
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"device": device, "copy_gbs": copy_gbs, "rows": rows}, indent=2))
            out.with_suffix(".md").write_text(table(rows, device, copy_gbs))
    print(table(rows, device, copy_gbs))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="4k only, batch 1, the 4-bit plan")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_speed.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: the fused decode benchmark needs a GPU; nothing to do.")
        return 0
    if args.smoke_test:
        run((4096,), (1,), ("4bit",), args.out)
    else:
        run(CONTEXTS, BATCHES, PLANS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
