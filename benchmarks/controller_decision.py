"""How long the learned controller takes to decide, and what the reconstruction pass costs.

Embedded SmolLM2-135M (fp32, CPU). Decision = `Learned.plan(stats, budget)` on one request's real
statistics (network + knapsack over 30 x 3 heads and every option of its grid: 45 for the shipped one,
25 uniform + 20 global), median of 200 calls per budget; beside it its parts: the option tables
(network + bytes of every option), the compiled knapsack and, for comparison, its NumPy reference.
Prefill = capturing prefill of a 1k / 2k-token context without and with reconstruction scores
(median of 3). Prints a table and writes benchmarks/results/controller_decision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adaptive_kv import load_model
from adaptive_kv.cache import CompressedCache
from adaptive_kv.policies import get_policy
from adaptive_kv.policies.controller.allocator import allocate, allocate_reference
from adaptive_kv.prefill import capture
from adaptive_kv.stats import StatsConfig
from adaptive_kv.tasks import make_samples

OUT = Path(__file__).resolve().parent / "results" / "controller_decision.json"


def _prefill(model, tokenizer, ids, reconstruct: bool) -> tuple[float, CompressedCache]:
    prefill = capture(model, tokenizer, ids, StatsConfig(reconstruction=reconstruct))
    return prefill.seconds, prefill.cache


def _median_ms(call, repeats: int = 200) -> tuple[float, float]:
    """Median and p95 wall time of `call` in ms, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return round(1e3 * statistics.median(times), 3), round(1e3 * times[int(0.95 * repeats) - 1], 3)


def main(argv: list[str] | None = None) -> None:
    """Run both measurements and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    policy = get_policy("learned")
    rows, prefill = [], []
    for length in (1024, 2048):
        ids = make_samples("passkey", tokenizer, length, 1, 0)[0].context_ids
        plain = statistics.median(_prefill(model, tokenizer, ids, False)[0] for _ in range(3))
        timed = [_prefill(model, tokenizer, ids, True) for _ in range(3)]
        recon = statistics.median(t for t, _ in timed)
        prefill.append({"context": length, "prefill_s": round(plain, 3), "with_reconstruction_s": round(recon, 3),
                        "overhead": round(recon / plain, 2)})
        stats = timed[0][1].stats
        cost, nbytes, _ = policy.option_tables(stats, 0)
        full = 2 * nbytes.shape[0] * length * stats.head_dim * stats.dtype_bytes
        for budget in (0.25, 0.125, 0.0625):
            median, p95 = _median_ms(lambda: policy.plan(stats, budget))
            rows.append({"context": length, "budget": budget, "median_ms": median, "p95_ms": p95,
                         "option_tables_ms": _median_ms(lambda: policy.option_tables(stats, 0))[0],
                         "knapsack_ms": _median_ms(lambda: allocate(cost, nbytes, budget * full))[0],
                         "knapsack_numpy_ms": _median_ms(lambda: allocate_reference(cost, nbytes, budget * full))[0]})
    print("| context | budget | decision median ms | p95 ms | option tables ms | knapsack ms | knapsack (NumPy) ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['budget']} | {r['median_ms']} | {r['p95_ms']} | {r['option_tables_ms']} "
              f"| {r['knapsack_ms']} | {r['knapsack_numpy_ms']} |")
    print("\n| context | prefill s | with reconstruction s | x |\n|---|---|---|---|")
    for r in prefill:
        print(f"| {r['context']} | {r['prefill_s']} | {r['with_reconstruction_s']} | {r['overhead']} |")
    OUT.write_text(json.dumps({"model": "smollm2-135m", "threads": torch.get_num_threads(),
                               "decision": rows, "prefill": prefill}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
