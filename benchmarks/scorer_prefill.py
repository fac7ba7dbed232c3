"""What reconstruction scores cost in the prefill: predicted inside it vs the exact second pass.

Embedded SmolLM2-135M (fp32, CPU, the torch threads this process has). Per context length, one
passkey context, each variant timed `--repeats` times in turn (interleaved, so drift hits all alike):
plain = a model forward into a DynamicCache; stats = the capturing prefill that reads the default
statistics (what every policy pays); predicted = stats + the shipped reconstruction predictor
(kvzap, `learned:reconstruction=predicted`); exact = stats + the exact reconstruction pass (kvzip,
learned); exact_reference = the same pass computed by `ReconstructionPass.attend_reference` (a
materialised fp32 softmax per query block, what the fused pass replaces). Ratios are over `plain`
(median) with the min-max range of the repeats. Writes benchmarks/results/scorer_prefill.{json,md}.

    python benchmarks/scorer_prefill.py [--lengths 1024 2048 4096 8192] [--exact-lengths 1024 2048 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

from adaptive_kv import load_model
from adaptive_kv.policies import get_policy
from adaptive_kv.prefill import capture
from adaptive_kv.reconstruction import ReconstructionPass
from adaptive_kv.stats import StatsConfig
from adaptive_kv.tasks import make_samples

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@contextmanager
def _reference_pass():
    """The reconstruction pass through its plain-torch reference on every device."""
    fused = ReconstructionPass.attend
    ReconstructionPass.attend = ReconstructionPass.attend_reference
    try:
        yield
    finally:
        ReconstructionPass.attend = fused


def _exact_reference(model, tokenizer, ids):
    with _reference_pass():
        return capture(model, tokenizer, ids, StatsConfig(reconstruction=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--exact-lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="lengths at which the exact pass is timed too (it grows fastest)")
    parser.add_argument("--reference-lengths", type=int, nargs="*", default=[1024, 2048],
                        help="lengths at which the exact pass's plain-torch reference is timed too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="scorer_prefill")
    args = parser.parse_args(argv)
    model, tokenizer = load_model("smollm2-135m")
    predictor = get_policy("kvzap").predictor
    variants = {
        "plain": lambda ids: model(torch.tensor([ids]), cache=DynamicCache(config=model.config), logits_to_keep=1),
        "stats": lambda ids: capture(model, tokenizer, ids, StatsConfig()),
        "predicted": lambda ids: capture(model, tokenizer, ids, StatsConfig(predictor=predictor)),
        "exact": lambda ids: capture(model, tokenizer, ids, StatsConfig(reconstruction=True)),
        "exact_reference": lambda ids: _exact_reference(model, tokenizer, ids),
    }
    timed_at = {"exact": args.exact_lengths, "exact_reference": args.reference_lengths}
    rows = []
    for length in args.lengths:
        ids = make_samples("passkey", tokenizer, length, 1, 0)[0].context_ids
        names = [n for n in variants if length in timed_at.get(n, [length])]
        with torch.inference_mode():
            variants["plain"](ids)  # warm-up
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.repeats):
                for name in names:
                    times[name].append(_timed(lambda: variants[name](ids)))
        plain = statistics.median(times["plain"])
        row = {"context": length, "repeats": args.repeats}
        for name in names:
            row[f"{name}_s"] = [round(t, 3) for t in times[name]]
            row[f"{name}_x"] = round(statistics.median(times[name]) / plain, 3)
            row[f"{name}_x_range"] = [round(min(times[name]) / plain, 3), round(max(times[name]) / plain, 3)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = shlex.join(["python", "benchmarks/scorer_prefill.py", *sys.argv[1:]])
    meta = {"command": command, "model": "smollm2-135m (fp32, CPU)", "threads": torch.get_num_threads(),
            "predictor": predictor.to_json(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"`{command}`: SmolLM2-135M-Instruct (fp32) on CPU, {torch.get_num_threads()} torch threads, one passkey "
             f"context per length, {args.repeats} interleaved repeats; x = median over the plain prefill's median "
             "(range: fastest and slowest repeat). plain: DynamicCache forward; stats: the capturing prefill every "
             f"policy pays; predicted: + the {predictor.kind} reconstruction predictor; exact: + the reconstruction pass "
             "(fused); exact reference: + the same pass with a materialised fp32 softmax per query block.",
             "", "| context | plain s | stats x | predicted x | exact x | exact reference x |", "|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda n: "-" if f"{n}_x" not in r else f"{r[f'{n}_x']} ({r[f'{n}_x_range'][0]}-{r[f'{n}_x_range'][1]})"  # noqa: E731
        lines.append(f"| {r['context']} | {statistics.median(r['plain_s']):.2f} | {cell('stats')} | {cell('predicted')} "
                     f"| {cell('exact')} | {cell('exact_reference')} |")
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
