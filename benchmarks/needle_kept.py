"""Which heads keep a needle: the share of a needle task's answer tokens each policy's plan keeps, per head.

For chosen samples of an `adaptive-kv eval` row (same task, length, seed, protocol), it prefills each
context once with every policy's statistics, plans each policy at one budget, and applies the
cache's own token-selection rule (`adaptive_kv.selection`, the plan's kept counts) to the scores the
plan ranks by. The needle is the context's digit tokens (passkey and NIAH answers are numbers; the
haystacks hold none). Reported per sample and policy: the mean share of the needle kept over the
(layer, head) pairs, how many heads keep all of it and how many none, per layer, and the needle's
mean percentile within its heads under each score. It tells whether an answer a policy loses was
evicted or lost with the needle still held.

    python benchmarks/needle_kept.py --task passkey --context-length 8192 --budget 0.0625 \\
        --samples 20 --indices 2,7,18,1 --policies kvzip,kvzap [--around 8] --output benchmarks/results/needle_kept/ctx8192_passkey
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from adaptive_kv.cli_args import csv
from adaptive_kv.selection import kept_middle, layer_ranking


def kept_positions(plan, scores: torch.Tensor, layer: int, seq_len: int) -> list[torch.Tensor]:
    """Positions each KV head of `layer` holds after `plan` (scores (H, T) the plan ranks by)."""
    if plan.layer_window(layer) is not None:
        raise ValueError(f"layer {layer} is a sliding-window layer; this benchmark reads full-attention layers only")
    sinks = min(plan.sink_tokens, seq_len)
    recent_start = max(sinks, seq_len - plan.recent_window)
    ranking = layer_ranking(scores.float(), plan.selection, sinks, recent_start)
    kept = []
    for head in range(scores.shape[0]):
        wanted = plan.kept_tokens(layer, head, seq_len) - sinks - (seq_len - recent_start)
        middle = kept_middle(ranking[head], sinks, recent_start, wanted)
        kept.append(torch.cat([torch.arange(sinks), middle, torch.arange(recent_start, seq_len)]))
    return kept


def needle_share(kept: list[list[torch.Tensor]], needle: list[int]) -> torch.Tensor:
    """(L, H) share of the `needle` positions each head's kept positions hold."""
    wanted = torch.tensor(needle)
    return torch.tensor([[torch.isin(wanted, positions).float().mean().item() for positions in layer]
                         for layer in kept])


def percentile_within_heads(scores: torch.Tensor, needle: list[int], sinks: int, recent_start: int) -> float:
    """Mean percentile (0 lowest, 1 highest) of the needle's middle tokens among each head's middle tokens."""
    middle = scores[..., sinks:recent_start].float()
    rank = middle.argsort(-1).argsort(-1).float() / max(1, middle.shape[-1] - 1)
    inside = torch.tensor([p - sinks for p in needle if sinks <= p < recent_start])
    return rank[..., inside].mean().item()


def digit_positions(tokenizer, ids: list[int], around: int = 0) -> list[int]:
    """Positions of tokens that spell a digit (the needle of passkey and NIAH contexts), with `around`
    tokens either side of each (the sentence that says what the number is)."""
    digits = [i for i, token in enumerate(ids) if any(c.isdigit() for c in tokenizer.decode([token]))]
    return sorted({p for i in digits for p in range(max(0, i - around), min(len(ids), i + around + 1))})


def measure(args: argparse.Namespace) -> dict:
    from adaptive_kv.models import load_model
    from adaptive_kv.policies import get_policy
    from adaptive_kv.prefill import capture
    from adaptive_kv.tasks import make_samples

    model, tokenizer = load_model(args.model)
    samples = make_samples(args.task, tokenizer, args.context_length, args.samples, args.seed)
    policies = {name: get_policy(name) for name in args.policies}
    needs = _union_needs(list(policies.values()))
    rows = []
    for index in args.indices:
        sample = samples[index]
        ids = list(sample.prompt_ids if args.protocol == "query_aware" else sample.context_ids)
        needle = digit_positions(tokenizer, list(sample.context_ids), args.around)
        if not needle:
            raise SystemExit(f"sample {index} of {args.task} has no digit tokens to follow")
        with torch.inference_mode():
            stats = capture(model, tokenizer, ids, needs).cache.stats
        seq_len = len(ids)
        for name, policy in policies.items():
            plan = policy.plan(stats, args.budget)
            scores = stats.token_scores[plan.scorer]
            kept = [kept_positions(plan, scores[layer], layer, seq_len) for layer in range(plan.num_layers)]
            share = needle_share(kept, needle)
            sinks = min(plan.sink_tokens, seq_len)
            rows.append({"sample": index, "policy": name, "scorer": plan.scorer, "needle": needle,
                         "seq_len": seq_len, "mean_share": share.mean().item(),
                         "heads_all": int((share == 1).sum()), "heads_none": int((share == 0).sum()),
                         "heads": share.numel(), "per_layer": share.mean(1).tolist(),
                         "percentile": percentile_within_heads(scores, needle, sinks,
                                                               max(sinks, seq_len - plan.recent_window))})
        print(f"sample {index}: " + "; ".join(f"{r['policy']} {r['mean_share']:.3f} ({r['heads_all']} heads all)"
                                             for r in rows if r["sample"] == index), flush=True)
    return {"model": args.model, "task": args.task, "context_length": args.context_length, "seed": args.seed,
            "protocol": args.protocol, "budget": args.budget, "around": args.around, "rows": rows}


def _union_needs(policies: list):
    """One prefill's statistics for every policy: the first's layout, every score any of them reads."""
    configs = [p.stats_config() for p in policies]
    predictor = next((c.predictor for c in configs if c.predictor is not None), None)
    return dataclasses.replace(configs[0], reconstruction=any(c.reconstruction for c in configs), predictor=predictor)


def markdown(result: dict, command: str) -> str:
    lines = [f"Made by `{command}`. {result['task']} ({result['protocol']}), {result['context_length']} tokens, "
             f"seed {result['seed']}, budget {result['budget']:g}. Cells: mean share of the needle (digit "
             f"tokens, with {result['around']} either side) kept over (layer, head) pairs; heads keeping all of it / none of it; the needle's mean "
             "percentile within its heads under the score the policy ranks by.", "",
             "| sample | policy | needle share | heads all / none (of) | percentile |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['sample']} | {r['policy']} | {r['mean_share']:.3f} | {r['heads_all']} / {r['heads_none']} "
                     f"({r['heads']}) | {r['percentile']:.3f} |")
    return "\n".join(lines) + "\n"


def _sample_indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated sample indices, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="passkey", help="a needle task: passkey, niah_single, niah_multikey")
    parser.add_argument("--context-length", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=20, help="as the eval row was made (samples are drawn together)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=("query_agnostic", "query_aware"), default="query_agnostic")
    parser.add_argument("--indices", type=_sample_indices, required=True, help="which samples, comma-separated, e.g. 2,7,18")
    parser.add_argument("--budget", type=float, default=0.0625)
    parser.add_argument("--around", type=int, default=0, help="also follow this many tokens either side of each digit")
    parser.add_argument("--policies", type=csv, default=("kvzip", "kvzap"))
    parser.add_argument("--output", type=Path, required=True, help="path without suffix; .json and .md are written")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must lie in (0, 1], got {args.budget}")
    if args.around < 0:
        parser.error(f"--around must be >= 0, got {args.around}")
    if any(not 0 <= i < args.samples for i in args.indices):
        parser.error(f"--indices must lie in [0, {args.samples}), got {args.indices}")
    result = measure(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    command = "python benchmarks/needle_kept.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.output.with_suffix(".md").write_text(markdown(result, command))


if __name__ == "__main__":
    main()
