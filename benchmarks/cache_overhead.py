"""Cost of the compressed cache on the embedded model: prefill, statistics, decode, bytes.

For each context length: prefill time with DynamicCache, with a CompressedCache that reads no
statistics (identity plan) and with one that does (a provider); decode ms/token for
DynamicCache, identity, (keep 0.5, 4-bit) and (keep 0.25, 2-bit); real vs predicted bytes.
Prints a table and writes JSON. Targets (issue): statistics <= 5 % of prefill, compressed decode
<= 1.3x DynamicCache per token at 2k.

    python benchmarks/cache_overhead.py [--lengths 1024,2048] [--decode-steps 32] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import statistics

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

import adaptive_kv.cache as cache_module
from adaptive_kv import CompressedCache, Plan, load_model
from adaptive_kv.tasks import make_samples

_STATS_SECONDS: list[float] = []


def _timed_observe(*args, **kwargs):
    """observe_layer, timed: the statistics' own cost, measured inside the prefill it belongs to."""
    start = time.perf_counter()
    out = _observe_layer(*args, **kwargs)
    _STATS_SECONDS.append(time.perf_counter() - start)
    return out


_observe_layer = cache_module.observe_layer
cache_module.observe_layer = _timed_observe


def _configs(cfg) -> dict[str, dict]:
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    frac = lambda keep, bits: lambda s: Plan.uniform_fraction(layers, heads, s.seq_len, keep_fraction=keep, key_bits=bits)  # noqa: E731
    return {
        "dynamic": {},
        "identity": {"plan": Plan.full(layers, heads)},
        "keep0.5_4bit": {"plan_provider": frac(0.5, 4)},
        "keep0.25_2bit": {"plan_provider": frac(0.25, 2)},
    }


@torch.inference_mode()
def _run(model, ids: torch.Tensor, options: dict, steps: int) -> dict:
    cache = DynamicCache(config=model.config) if not options else CompressedCache(model, **options)
    _STATS_SECONDS.clear()
    start = time.perf_counter()
    logits = model(ids, cache=cache).logits[:, -1]
    prefill_s = time.perf_counter() - start
    row = {"prefill_s": prefill_s, "stats_s": sum(_STATS_SECONDS)}
    if isinstance(cache, CompressedCache):
        row.update(bytes=cache.nbytes(), predicted_bytes=cache.predicted_nbytes(), full_bytes=cache.full_nbytes())
    token = logits.argmax(-1, keepdim=True)
    model(token, cache=cache)  # warm-up step, not timed
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    # median: this VM's timer shows rare long stalls that a mean would charge to one config
    row["decode_ms_per_token"] = 1000 * statistics.median(times)
    row["decode_ms_mean"] = 1000 * statistics.fmean(times)
    return row


def run(lengths: list[int], steps: int) -> dict:
    """Measure every configuration at every length, sharing nothing but the model."""
    model, tokenizer = load_model("smollm2-135m")
    torch.set_num_threads(torch.get_num_threads())
    results = {"model": "smollm2-135m", "dtype": str(model.dtype), "threads": torch.get_num_threads(), "rows": []}
    for length in lengths:
        sample = make_samples("fidelity", tokenizer, length, 1, seed=0)[0]
        ids = torch.tensor([list(sample.context_ids)])
        for name, options in _configs(model.config).items():
            row = {"context": length, "config": name, **_run(model, ids, options, steps)}
            results["rows"].append(row)
            print(json.dumps(row))
    return results


def summarise(results: dict) -> None:
    """Print the table and the two target ratios."""
    table = Table(title="cache overhead, smollm2-135m fp32 CPU")
    for col in ("context", "config", "prefill s", "decode ms/tok", "x dynamic", "real bytes", "predicted", "ratio"):
        table.add_column(col, justify="right")
    by = {(r["context"], r["config"]): r for r in results["rows"]}
    for r in results["rows"]:
        base = by[(r["context"], "dynamic")]["decode_ms_per_token"]
        ratio = r["full_bytes"] / r["bytes"] if "bytes" in r else 1.0
        table.add_row(
            str(r["context"]), r["config"], f"{r['prefill_s']:.2f}", f"{r['decode_ms_per_token']:.1f}",
            f"{r['decode_ms_per_token'] / base:.2f}", str(r.get("bytes", "-")), str(r.get("predicted_bytes", "-")),
            f"{ratio:.2f}x",
        )
    Console().print(table)
    for length in sorted({r["context"] for r in results["rows"]}):
        row = by[(length, "keep0.5_4bit")]
        share = row["stats_s"] / (row["prefill_s"] - row["stats_s"])
        results.setdefault("stats_overhead", {})[length] = share
        print(f"{length}: statistics took {row['stats_s']:.3f} s = {100 * share:.1f}% of the prefill without them")
        for name in ("identity", "keep0.5_4bit", "keep0.25_2bit"):
            ratio = by[(length, name)]["decode_ms_per_token"] / by[(length, "dynamic")]["decode_ms_per_token"]
            results.setdefault("decode_vs_dynamic", {}).setdefault(str(length), {})[name] = ratio


def main() -> None:
    """CLI entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--output", default="benchmarks/results/cache_overhead.json")
    args = parser.parse_args()
    results = run([int(x) for x in args.lengths.split(",")], args.decode_steps)
    summarise(results)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
