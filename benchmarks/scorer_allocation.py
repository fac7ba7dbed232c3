"""Where predicted reconstruction scores lose against exact ones: across heads or within a head.

A global allocation (kvzip, kvzap) makes two choices from one ranking of every (layer, head, token)
score: how many tokens each head keeps, and which. On held-out examples of `adaptive-kv
train-scorer` (their exact scores and the hidden states a scorer reads), this crosses the two:

- exact: counts and tokens from the exact scores (what kvzip keeps);
- predicted: both from the scorer's scores (what kvzap keeps);
- exact counts, predicted tokens: the scorer's allocation error removed;
- predicted counts, exact tokens: its ranking error within each head removed.

Each is measured by the share of the exact score mass it keeps, over all heads and per head (the
mean of each head's kept share). A scorer whose loss sits within heads gains nothing from a better
allocation rule, only from ranking tokens better. Reads the example cache of a `train-scorer`
output (the same lengths and counts it was run with); writes benchmarks/results/scorer_allocation.{json,md}.

    python benchmarks/scorer_allocation.py --examples outputs/scorer --context-lengths 1024,2048,4096 \\
        --train-per-task 6 --valid-per-task 1 --scorer policies/controller/shipped/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adaptive_kv.policies.global_allocation import global_keeps

RESULTS = Path(__file__).resolve().parent / "results"
CROSSINGS = ("exact", "predicted", "exact counts, predicted tokens", "predicted counts, exact tokens")


def kept_by_rank(rank_scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask (L, H, N) of each head's top `counts[l, h]` tokens by `rank_scores` (L, H, N)."""
    order = rank_scores.argsort(dim=-1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    return position < counts[..., None]


def kept_mass(exact: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """The share of the exact score mass `mask` keeps: over all heads, and the mean over heads."""
    kept = (exact * mask).sum(-1)
    return (kept.sum() / exact.sum()).item(), (kept / exact.sum(-1).clamp_min(1e-30)).mean().item()


def crossed(exact: torch.Tensor, predicted: torch.Tensor, fraction: float) -> dict[str, tuple[float, float]]:
    """Kept exact mass of the four crossings (CROSSINGS) when `fraction` of all tokens is kept globally."""
    count = int(fraction * exact.numel())
    by_exact, by_predicted = (global_keeps(s, count, sinks=0, window=0) for s in (exact, predicted))
    masks = {"exact": kept_by_rank(exact, by_exact), "predicted": kept_by_rank(predicted, by_predicted),
             "exact counts, predicted tokens": kept_by_rank(predicted, by_exact),
             "predicted counts, exact tokens": kept_by_rank(exact, by_predicted)}
    return {name: kept_mass(exact, masks[name]) for name in CROSSINGS}


def _bucket(tokens: int, lengths: tuple[int, ...]) -> int:
    """The calibration length a context was made at (contexts come a little under their target)."""
    return min(lengths, key=lambda n: abs(n - tokens))


def measure(args: argparse.Namespace) -> dict:
    from adaptive_kv.models import load_model
    from adaptive_kv.predicted_reconstruction import LOG_FLOOR, load_predictor
    from adaptive_kv.training import example_cache, label_cache
    from adaptive_kv.training.scorer import predicted_log_scores
    from adaptive_kv.training.scorer_train import ScorerTrainConfig

    config = ScorerTrainConfig(context_lengths=args.context_lengths, train_per_task=args.train_per_task,
                               valid_per_task=args.valid_per_task, output=args.examples)
    model, tokenizer = load_model(config.model)
    model_sha = label_cache.model_digest(model)
    _, valid = config.requests(tokenizer)
    examples = []
    for index, request in enumerate(valid):
        key = example_cache.example_key(model_sha, request, config.valid_tokens, index)
        example = example_cache.load(Path(args.examples) / "examples", key, request.key)
        if example is None:
            raise SystemExit(f"--examples {args.examples}: no held-out example for {request.key}; run train-scorer "
                             "with these --context-lengths/--train-per-task/--valid-per-task first")
        examples.append((_bucket(len(request.context_ids), config.context_lengths), example))
    rows = []
    for folder in args.scorer:
        predictor = load_predictor(folder)
        sums: dict[tuple[int, float, str], list[tuple[float, float]]] = {}
        with torch.inference_mode():
            for length, example in examples:
                exact = example.targets.float().exp()
                predicted = predicted_log_scores(predictor, example).clamp(LOG_FLOOR, 0.0).exp()
                for fraction in args.fractions:
                    for name, value in crossed(exact, predicted, fraction).items():
                        sums.setdefault((length, fraction, name), []).append(value)
        for (length, fraction, name), values in sums.items():
            rows.append({"scorer": folder, "tokens": length, "fraction": fraction, "crossing": name,
                         "contexts": len(values), "mass": sum(v[0] for v in values) / len(values),
                         "per_head": sum(v[1] for v in values) / len(values)})
    return {"examples": args.examples, "context_lengths": list(config.context_lengths),
            "valid_tokens": config.valid_tokens, "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = [f"Made by `{command}`. Held-out contexts of the scorer fit ({result['valid_tokens']} scored tokens each); "
             "cells: share of the exact reconstruction mass kept, over all heads / mean over heads.", ""]
    for scorer in dict.fromkeys(r["scorer"] for r in result["rows"]):
        lines += [f"Scorer `{scorer}`:", "", "| tokens | keep | " + " | ".join(CROSSINGS) + " |",
                  "|---|---|" + "---|" * len(CROSSINGS)]
        cells = {(r["tokens"], r["fraction"], r["crossing"]): r for r in result["rows"] if r["scorer"] == scorer}
        for tokens, fraction in sorted({(t, f) for t, f, _ in cells}, key=lambda k: (k[0], -k[1])):
            row = [f"{cells[(tokens, fraction, c)]['mass']:.3f} / {cells[(tokens, fraction, c)]['per_head']:.3f}"
                   for c in CROSSINGS]
            lines.append(f"| {tokens} | 1/{round(1 / fraction)} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", required=True, help="a train-scorer --output folder (its examples/ are read)")
    parser.add_argument("--context-lengths", type=_lengths, default=(1024, 2048), help="as given to train-scorer")
    parser.add_argument("--train-per-task", type=int, default=2, help="as given to train-scorer")
    parser.add_argument("--valid-per-task", type=int, default=1, help="as given to train-scorer")
    parser.add_argument("--scorer", action="append", required=True, help="a scorer folder (repeatable)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1 / 8, 1 / 16, 1 / 32],
                        help="shares of all tokens kept")
    parser.add_argument("--output", type=Path, default=RESULTS / "scorer_allocation")
    args = parser.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    result = measure(args)
    command = "python benchmarks/scorer_allocation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.output.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1))
    args.output.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
