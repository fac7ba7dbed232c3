"""Cost of the compressed cache on the embedded model: decode speed and prefill peak memory.

Decode (one process): per context length, one capturing prefill is shared by every configuration
(DynamicCache is filled from the same keys and values; plans are `fork`s), then greedy decode
steps for DynamicCache, the identity plan, keep 0.5 / 4-bit, 2-bit keep-all and the `learned`
policy at 0.125: on the assembled fast path (the CPU default: bf16 working copy of fully quantised
sides), the same with the working copy in the model's dtype (`working_dtype="model"`, exact), and
the packed path that dequantises the store at every step (`assembled=False`, least memory). The
figure is the mean ms/token over `--decode-steps` (default 64: two group flushes and the
evictions they bring are inside it; the median is reported too), taken in rounds of 16 steps in
which every configuration takes its turn (a slow spell of the VM then hits all of them), and
`agree` the share of greedy tokens equal to the exact working copy's.

Prefill peak (a fresh process per configuration, so no allocator state carries over): DynamicCache,
a plan applied at the end of prefill and the same policy applied layer by layer (bounded
prefill; SnapKV at 0.125), logits of the last position only. Reports the process's resident
memory sampled every 2 ms during the prefill minus the resident memory just before it (after a
warm-up forward), and the bytes the cache itself held at most (`prefill_peak_nbytes`, exact).

    python benchmarks/cache_overhead.py [--lengths 1024,2048,4096,8192] [--decode-steps 64]
        [--learned-max 8192] [--peak-lengths 4096,8192] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from adaptive_kv import CompressedCache, Plan, load_model
from adaptive_kv.prefill import capture
from adaptive_kv.stats import StatsConfig
from adaptive_kv.tasks import make_samples

BUDGET = 0.125
PAGE = os.sysconf("SC_PAGE_SIZE")


def _plans(model, stats) -> dict[str, Plan]:
    """The fixed plans compared at every length (learned is added when its statistics were read)."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    plans = {
        "identity": Plan.full(*shape),
        "keep0.5_4bit": Plan.uniform_fraction(*shape, stats.seq_len, keep_fraction=0.5, key_bits=4),
        "keepall_2bit": Plan.uniform(*shape, key_bits=2, value_bits=2),
    }
    if "reconstruction" in stats.token_scores:
        from adaptive_kv.policies import get_policy

        plans["learned@0.125"] = get_policy("learned").plan(stats, BUDGET)
    return plans


def _dynamic_from(captured: CompressedCache, model) -> DynamicCache:
    """A DynamicCache holding the captured prefill's keys and values."""
    cache = DynamicCache(config=model.config)
    for idx in range(captured.num_layers):
        keys, values = captured.prefill_states(idx)
        cache.update(keys[None].clone(), values[None].clone(), idx)
    return cache


class _Decoder:
    """Greedy decode on one cache, timed step by step (one untimed warm-up step first)."""

    def __init__(self, model, cache, first_token: torch.Tensor) -> None:
        self.model, self.cache = model, cache
        with torch.inference_mode():
            self.token = model(first_token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        self.times: list[float] = []
        self.tokens: list[int] = []

    @torch.inference_mode()
    def run(self, steps: int) -> None:
        """Decode `steps` more tokens."""
        for _ in range(steps):
            start = time.perf_counter()
            self.token = self.model(self.token, cache=self.cache).logits[:, -1].argmax(-1, keepdim=True)
            self.times.append(time.perf_counter() - start)
            self.tokens.append(int(self.token))

    def mean_ms(self) -> float:
        """Mean ms per step: flushes and evictions count where they fall."""
        return 1000 * statistics.mean(self.times)

    def median_ms(self) -> float:
        """Median ms per step."""
        return 1000 * statistics.median(self.times)


PATHS = {"assembled": dict(assembled=True), "assembled_exact": dict(assembled=True, working_dtype="model"),
         "packed": dict(assembled=False)}
ROUND = 16  # steps per configuration per round: configurations take turns, so a slow spell of a shared VM hits all


def decode_rows(model, tokenizer, length: int, steps: int, with_learned: bool) -> list[dict]:
    """Every decode configuration at one context length, sharing one capturing prefill."""
    ids = make_samples("fidelity", tokenizer, length, 1, seed=0)[0].context_ids
    prefill = capture(model, tokenizer, ids, StatsConfig(reconstruction=with_learned))
    captured, prefill_s = prefill.cache, prefill.seconds
    first = prefill.last_logits.argmax(-1, keepdim=True)
    decoders = {("dynamic", "-"): _Decoder(model, _dynamic_from(captured, model), first)}
    for name, plan in _plans(model, captured.stats).items():
        for path in ("assembled_exact", "assembled", "packed"):
            if path == "assembled_exact" and name == "identity":
                continue  # nothing quantised: the default path is already exact
            decoders[(name, path)] = _Decoder(model, captured.fork(plan, **PATHS[path]), first)
    for _ in range(max(1, steps // ROUND)):
        for decoder in decoders.values():
            decoder.run(ROUND)
    base = decoders[("dynamic", "-")].mean_ms()
    rows = []
    for (name, path), decoder in decoders.items():
        row = {"context": length, "config": name, "path": path, "decode_ms": decoder.mean_ms(),
               "median_ms": decoder.median_ms(), "x_dynamic": decoder.mean_ms() / base}
        if name == "dynamic":
            row["prefill_s"] = prefill_s
        else:
            exact = decoders.get((name, "assembled_exact"), decoders[(name, "assembled")]).tokens
            cache = decoder.cache
            row.update(agree=sum(a == b for a, b in zip(decoder.tokens, exact)) / len(exact), bytes=cache.nbytes(),
                       working_bytes=cache.working_nbytes(), full_bytes=cache.full_nbytes())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------ prefill peak (child)
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_child(length: int, mode: str) -> dict:
    """One prefill in this fresh process: resident-memory peak over the prefill and the cache's own peak."""
    from adaptive_kv.policies import get_policy

    model, tokenizer = load_model("smollm2-135m")
    ids = torch.tensor([list(make_samples("fidelity", tokenizer, length, 1, seed=0)[0].context_ids)])
    policy = get_policy("snapkv")
    cfg = model.config
    if mode == "dynamic":
        cache = DynamicCache(config=cfg)
    elif mode == "end_of_prefill":
        cache = CompressedCache(model, plan_provider=lambda s: policy.plan(s, BUDGET))
    else:
        cache = CompressedCache(model, layer_plan_provider=lambda s, i: policy.plan_layer(s, i, cfg.num_hidden_layers, BUDGET))
    with torch.inference_mode():  # the first forward allocates once-only state: keep it out of the baseline
        model(ids[:, :16], cache=DynamicCache(config=cfg))
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    before = _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.inference_mode():  # logits of the last position only, as a server's prefill needs
        model(ids, cache=cache, logits_to_keep=1)
    done.set()
    sampler.join()
    row = {"context": length, "mode": mode, "rss_peak_over_baseline": max(peak[0], _rss()) - before}
    if isinstance(cache, CompressedCache):
        row.update(cache_peak_bytes=cache.prefill_peak_nbytes, bytes_after=cache.nbytes(), full_bytes=cache.full_nbytes())
    else:
        row.update(cache_peak_bytes=sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
    return row


def peak_rows(lengths: list[int]) -> list[dict]:
    """Each (length, mode) in a fresh process; big allocations mmapped so freed memory leaves the RSS."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for length in lengths:
        for mode in ("dynamic", "end_of_prefill", "per_layer"):
            out = subprocess.run([sys.executable, __file__, "--peak-child", str(length), mode], env=env,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(results: dict) -> str:
    """Markdown tables of both measurements."""
    lines = ["| context | config | path | mean ms/token | median | x DynamicCache | agree | KV bytes | working copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["decode"]:
        kv = f"{r['bytes'] / r['full_bytes']:.3f} of full" if "bytes" in r else "full"
        work = f"{r['working_bytes'] / 2**20:.1f} MiB" if r.get("working_bytes") else "-"
        agree = f"{r['agree']:.2f}" if "agree" in r else "-"
        lines.append(f"| {r['context']} | {r['config']} | {r['path']} | {r['decode_ms']:.1f} | {r['median_ms']:.1f} | "
                     f"{r['x_dynamic']:.2f} | {agree} | {kv} | {work} |")
    lines += ["", "| context | prefill mode | RSS peak over baseline MiB | cache peak MiB | KV after MiB |", "|---|---|---|---|---|"]
    for r in results["prefill_peak"]:
        after = r.get("bytes_after", r["cache_peak_bytes"]) / 2**20
        lines.append(f"| {r['context']} | {r['mode']} | {r['rss_peak_over_baseline'] / 2**20:.0f} | "
                     f"{r['cache_peak_bytes'] / 2**20:.1f} | {after:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """CLI entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--learned-max", type=int, default=8192, help="longest context for learned (its reconstruction pass)")
    parser.add_argument("--peak-lengths", default="4096,8192")
    parser.add_argument("--output", default="benchmarks/results/cache_overhead.json")
    parser.add_argument("--peak-child", nargs=2, metavar=("LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        print(json.dumps(peak_child(int(args.peak_child[0]), args.peak_child[1])))
        return
    model, tokenizer = load_model("smollm2-135m")
    results = {"model": "smollm2-135m", "dtype": str(model.dtype), "threads": torch.get_num_threads(), "decode": [],
               "prefill_peak": []}
    for length in [int(x) for x in args.lengths.split(",") if x]:
        results["decode"] += decode_rows(model, tokenizer, length, args.decode_steps, length <= args.learned_max)
    del model
    results["prefill_peak"] = peak_rows([int(x) for x in args.peak_lengths.split(",") if x])
    print(table(results))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    Path(args.output).with_suffix(".md").write_text(table(results) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
