"""Decode-attention and quantisation benchmark of the Triton backend (CUDA only).

For contexts of 4k-128k tokens and 2/4/8-bit keys and values (one layer, Llama-8B shape: 32
query heads, 8 KV heads, head_dim 128, bf16), times the compressed decode step as the cache runs
it (`decode_attention`: fused, packed codes dequantised in registers; sinks and residual
included) and the unfused path it replaced (dequantise the bucket, then `varlen_attention`),
reports the achieved bandwidth over the bytes the compressed store holds against the device's
measured copy bandwidth, the speed-up over bf16 `F.scaled_dot_product_attention` on the
uncompressed cache, and quantise+pack throughput.

    python benchmarks/kernels.py [--smoke-test] [--out benchmarks/results/kernels.json]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, GROUP = 32, 8, 128, 32
CONTEXTS = (4096, 16384, 65536, 131072)
BITS = (2, 4, 8)


def _copy_bandwidth(do_bench) -> float:
    """Device copy bandwidth in GB/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _bucket(tb, ctx: int, bits: int):
    """One layer's packed store: every KV head holds `ctx` tokens at `bits` (keys and values)."""
    keys = torch.randn(NUM_KV_HEADS * ctx // GROUP, GROUP, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(NUM_KV_HEADS * ctx, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = tb.quantize_keys(keys, bits)
    v = tb.quantize_values(values, bits, GROUP)
    group_len = torch.full((keys.shape[0],), GROUP, device="cuda")
    group_heads = torch.arange(NUM_KV_HEADS, device="cuda", dtype=torch.int16).repeat_interleave(ctx // GROUP)
    heads = torch.arange(NUM_KV_HEADS, device="cuda").repeat_interleave(ctx)
    nbytes = sum(t.numel() * t.element_size() for t in (*k, *v))
    return keys, values, k, v, group_len, group_heads, heads, nbytes


def run(contexts, bits_list, out: Path) -> list[dict]:
    from triton.testing import do_bench

    from adaptive_kv.kernels import triton_backend as tb
    from adaptive_kv.store import Bucket, Residual

    copy_gbs = _copy_bandwidth(do_bench)
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {copy_gbs:.0f} GB/s")
    header = f"{'ctx':>7} {'bits':>4} {'ours ms':>8} {'unfused':>8} {'sdpa ms':>8} {'speedup':>7} {'GB/s':>7} {'% copy':>6} {'quant GB/s':>10}"
    print(header)
    rows = []
    query = torch.randn(NUM_Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scaling = HEAD_DIM**-0.5
    # a decode step also reads 4 sinks and a 32-token residual per head (full precision)
    sinks = tuple(torch.randn(NUM_KV_HEADS, 4, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    residual = Residual(*(torch.randn(NUM_KV_HEADS * 32, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)),
                        torch.full((NUM_KV_HEADS,), 32), None)
    for ctx in contexts:
        dense_k = torch.randn(1, NUM_KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        dense_v = torch.randn_like(dense_k)
        sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(
            query[None], dense_k, dense_v, scale=scaling, enable_gqa=True))
        for bits in bits_list:
            keys, values, k, v, group_len, group_heads, heads, nbytes = _bucket(tb, ctx, bits)

            bucket = Bucket(bits, bits, k[0], v[0], k[1], k[2], v[1], v[2], group_len.to(torch.int16),
                            group_heads, None)

            def decode():  # fused: packed codes read and dequantised in registers (as the cache runs it)
                return tb.decode_attention(query, sinks, [bucket], residual, NUM_KV_HEADS, scaling)

            def unfused():  # dequantise the bucket, then varlen_attention
                dk = tb.dequantize_keys(*k, group_len, bits, torch.bfloat16)
                dv = tb.dequantize_values(*v, bits, torch.bfloat16)
                return tb.varlen_attention(query, dk, dv, heads, NUM_KV_HEADS, scaling)

            unfused_ms = do_bench(unfused)
            ours_ms = do_bench(decode)
            quant_ms = do_bench(lambda: (tb.quantize_keys(keys, bits), tb.quantize_values(values, bits, GROUP)))
            quant_gbs = 2 * keys.numel() * keys.element_size() / quant_ms / 1e6  # bf16 keys + values read
            gbs = nbytes / ours_ms / 1e6
            row = dict(context=ctx, bits=bits, ours_ms=ours_ms, unfused_ms=unfused_ms, sdpa_bf16_ms=sdpa_ms,
                       speedup=sdpa_ms / ours_ms,
                       store_bytes=nbytes, achieved_gbs=gbs, copy_gbs=copy_gbs, quantize_gbs=quant_gbs)
            rows.append(row)
            print(f"{ctx:>7} {bits:>4} {ours_ms:>8.3f} {unfused_ms:>8.3f} {sdpa_ms:>8.3f} {row['speedup']:>7.2f} {gbs:>7.0f} "
                  f"{100 * gbs / copy_gbs:>5.1f}% {quant_gbs:>10.0f}")
            del keys, values, k, v
        del dense_k, dense_v
        torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="one small context, 4 bits")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: the Triton kernel benchmark needs a GPU; nothing to do.")
        return 0
    if args.smoke_test:
        run((4096,), (4,), args.out)
    else:
        run(CONTEXTS, BITS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
