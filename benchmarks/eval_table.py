"""One table over several `adaptive-kv eval` runs (one task x protocol each): every row's score with its
95 % bootstrap interval, and per (policy, budget) the mean over rows with the interval of that mean
(each row's samples resampled independently, 2000 times, fixed seed).

With `--paired-against REF`, also each policy's score minus REF's on the same samples, per row and
budget, with the 95 % bootstrap interval of the mean difference (samples resampled in pairs), and
the cells where that interval lies below zero: where the policy is worse than REF beyond the noise.

    python benchmarks/eval_table.py benchmarks/results/eval_scorer/ctx1024 [--output README.md] \
        [--paired-against kvzip]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESAMPLES = 2000


def _rows(root: Path) -> dict[str, dict[tuple[str, float], list[float]]]:
    """{row name: {(policy, budget): per-sample scores}} of every results.json under `root`."""
    out = {}
    for path in sorted(root.glob("*/results.json")):
        results = json.loads(path.read_text())
        for record in results["records"]:
            if record.get("sample_scores"):
                name = f"{record['task']} ({results['protocol'].replace('query_', '')})"
                out.setdefault(name, {})[(record["policy"], record["budget"])] = record["sample_scores"]
    return out


def _interval(rows: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """Mean over rows of each row's mean, and the 95 % bootstrap interval of it."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.zeros(RESAMPLES, dtype=torch.float64)
    for scores in rows:
        values = torch.tensor(scores, dtype=torch.float64)
        means += values[torch.randint(0, len(scores), (RESAMPLES, len(scores)), generator=gen)].mean(1)
    means /= len(rows)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return sum(sum(r) / len(r) for r in rows) / len(rows), low, high


def paired(scores: list[float], reference: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-sample differences scores - reference, and its 95 % bootstrap interval."""
    if len(scores) != len(reference):
        raise ValueError(f"paired rows need the same samples, got {len(scores)} and {len(reference)} scores")
    return _interval([[a - b for a, b in zip(scores, reference)]], seed)


def paired_lines(rows: dict[str, dict[tuple[str, float], list[float]]], reference: str) -> list[str]:
    """The table of paired differences against `reference`, then per policy the cells below it beyond the noise."""
    keys = sorted({k for r in rows.values() for k in r if k[0] not in ("full", reference)}, key=lambda k: (-k[1], k[0]))
    lines = [f"Paired on the same samples: score minus {reference}'s, mean [95 % bootstrap interval]:", "",
             "| row | " + " | ".join(f"{p} @ {b:g}" for p, b in keys) + " |", "|---|" + "---|" * len(keys)]
    below: dict[str, list[str]] = {policy: [] for policy in sorted({p for p, _ in keys})}
    for name, row in rows.items():
        cells = []
        for policy, budget in keys:
            if (policy, budget) not in row or (reference, budget) not in row:
                cells.append("-")
                continue
            mean, low, high = paired(row[(policy, budget)], row[(reference, budget)])
            cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]")
            if high < 0:
                below[policy].append(f"{name} @ {budget:g} {mean:+.1f} [{low:+.1f}, {high:+.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Below {reference} with the paired interval apart from zero:", ""]
    lines += [f"- {policy}: " + ("; ".join(cells) if cells else "nowhere") for policy, cells in below.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--output", default="README.md", help="file written under ROOT")
    parser.add_argument("--made-by", default=None,
                        help="how the rows were made, quoted at the top: one command (set as code) or Markdown "
                             "prose that carries its own `code spans`")
    parser.add_argument("--paired-against", default=None, metavar="POLICY",
                        help="also each policy minus POLICY on the same samples, with intervals")
    args = parser.parse_args(argv)
    rows = _rows(args.root)
    keys = sorted({k for r in rows.values() for k in r if k[0] != "full"}, key=lambda k: (-k[1], k[0]))
    budgets = sorted({b for _, b in keys}, reverse=True)
    policies = sorted({p for p, _ in keys})
    lines = [f"Held-out rows under `{args.root}` (seed 0). Cells: score [95 % bootstrap interval]; "
             f"samples per row: {sorted({len(s) for r in rows.values() for s in r.values()})}.", ""]
    if args.made_by:
        made_by = args.made_by if "`" in args.made_by else f"`{args.made_by}`"
        lines[0] = f"Made by {made_by}; table by `python benchmarks/eval_table.py {args.root}`. " + lines[0]
    lines += ["| row | full | " + " | ".join(f"{p} @ {b:g}" for b in budgets for p in policies) + " |",
              "|---|---|" + "---|" * len(budgets) * len(policies)]
    for name, row in rows.items():
        cells = []
        for key in [("full", 1.0)] + [(p, b) for b in budgets for p in policies]:
            scores = row.get(key)
            if not scores:
                cells.append("-")
                continue
            mean, low, high = _interval([scores])
            cells.append(f"{mean:.1f} [{low:.0f}-{high:.0f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over the rows every policy has, with the 95 % bootstrap interval of that mean:", "",
              "| policy | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for policy in policies:
        cells = []
        for budget in budgets:
            present = [row[(policy, budget)] for row in rows.values() if (policy, budget) in row]
            if len(present) != len(rows):
                cells.append("-")
                continue
            mean, low, high = _interval(present)
            cells.append(f"{mean:.1f} [{low:.1f}-{high:.1f}]")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    if args.paired_against:
        if not any(p == args.paired_against for r in rows.values() for p, _ in r):
            parser.error(f"--paired-against {args.paired_against!r} is not a policy of these rows ({', '.join(policies)})")
        lines += [""] + paired_lines(rows, args.paired_against)
    (args.root / args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
