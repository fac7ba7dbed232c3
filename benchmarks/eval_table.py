"""One table over several `adaptive-kv eval` runs (one task x protocol each): every row's score with its
95 % bootstrap interval, and per (policy, budget) the mean over rows with the interval of that mean
(each row's samples resampled independently, 2000 times, fixed seed).

    python benchmarks/eval_table.py benchmarks/results/eval_scorer/ctx1024 [--output README.md]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--output", default="README.md", help="file written under ROOT")
    parser.add_argument("--made-by", default=None, help="the command that made the rows, quoted at the top")
    args = parser.parse_args(argv)
    rows = _rows(args.root)
    keys = sorted({k for r in rows.values() for k in r if k[0] != "full"}, key=lambda k: (-k[1], k[0]))
    budgets = sorted({b for _, b in keys}, reverse=True)
    policies = sorted({p for p, _ in keys})
    lines = [f"Held-out rows under `{args.root}` (seed 0). Cells: score [95 % bootstrap interval]; "
             f"samples per row: {sorted({len(s) for r in rows.values() for s in r.values()})}.", ""]
    if args.made_by:
        lines[0] = f"Made by `{args.made_by}`; table by `python benchmarks/eval_table.py {args.root}`. " + lines[0]
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
    (args.root / args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
