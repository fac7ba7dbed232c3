"""Evaluation outputs: results.json, summary.md and pareto.png (score vs real bytes fraction)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any


def mean_by_policy_budget(results: dict[str, Any]) -> dict[tuple[str, float], dict[str, float]]:
    """Mean score over tasks and mean real bytes fraction per (policy, budget), feasible records only."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in results["records"]:
        if r["score"] is not None:
            groups[(r["policy"], r["budget"])].append(r)
    return {
        key: {
            "score": sum(r["score"] for r in rows) / len(rows),
            "bytes_fraction": sum(r["kv_bytes"] / r["full_kv_bytes"] for r in rows) / len(rows),
            "tasks": len(rows),
        }
        for key, rows in groups.items()
    }


def summary_markdown(results: dict[str, Any]) -> str:
    """A Markdown table: policy x budget rows, one column per task, mean and bytes fraction."""
    tasks = sorted({r["task"] for r in results["records"]})
    cell = {(r["policy"], r["budget"], r["task"]): r for r in results["records"]}
    means = mean_by_policy_budget(results)
    lines = [
        f"# adaptive-kv eval: {results['model']}, context {results['context_length']}, {results['protocol']}",
        "",
        f"Wall time {results.get('wall_time_s', '?')} s. Scores 0-100 (fidelity: top-1 agreement with the full cache), "
        "with the 95 % bootstrap interval of the mean over samples in brackets.",
        "",
        "| policy | budget | " + " | ".join(tasks) + " | mean | real bytes fraction |",
        "|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for policy, budget in sorted({(r["policy"], r["budget"]) for r in results["records"]}, key=lambda k: (-k[1], k[0])):
        scores = []
        for task in tasks:
            r = cell.get((policy, budget, task))
            scores.append("n/a" if r is None or r["score"] is None else _with_interval(r))
        m = means.get((policy, budget))
        tail = f"{m['score']:.1f} | {m['bytes_fraction']:.4f}" if m else "infeasible | -"
        lines.append(f"| {policy} | {budget:g} | " + " | ".join(scores) + f" | {tail} |")
    best = best_per_budget(results)
    if best:
        lines += ["", "Best policy per budget (mean score): " + ", ".join(f"{b:g}: {p}" for b, p in best.items())]
    notes = plan_notes(results)
    if notes:
        heading = "Plans that say how they were made (another rule, extrapolated scores):"
        lines += ["", heading, ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plan_notes(results: dict[str, Any]) -> list[str]:
    """One line per (policy, budget) whose plans carried a note, e.g. `learned` outside its trained range."""
    noted: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results["records"]:
        if r.get("noted_samples"):
            noted.setdefault((r["policy"], r["budget"]), []).append(r)
    lines = []
    for (policy, budget), rows in sorted(noted.items(), key=lambda k: (k[0][0], -k[0][1])):
        count = sum(r["noted_samples"] for r in rows)
        total = sum(r["n_samples"] + r.get("infeasible_samples", 0) for r in rows)
        lines.append(f"{policy} @ {budget:g}: {count} of {total} samples: {rows[0]['note']}")
    return lines


def _with_interval(record: dict[str, Any]) -> str:
    """'61.5 [40-80]': the score and, where recorded, its 95 % bootstrap interval."""
    if "score_ci95" not in record:
        return f"{record['score']:.1f}"
    low, high = record["score_ci95"]
    return f"{record['score']:.1f} [{low:.0f}-{high:.0f}]"


def best_per_budget(results: dict[str, Any]) -> dict[float, str]:
    """The policy with the highest mean score at each budget (the full reference excluded)."""
    best: dict[float, tuple[float, str]] = {}
    for (policy, budget), m in mean_by_policy_budget(results).items():
        if policy != "full" and (budget not in best or m["score"] > best[budget][0]):
            best[budget] = (m["score"], policy)
    return {b: p for b, (_, p) in sorted(best.items(), reverse=True)}


def pareto_png(results: dict[str, Any], path: Path) -> None:
    """Mean score vs real bytes fraction, one line per policy, the full cache as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_by_policy_budget(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in sorted({p for p, _ in means if p != "full"}):
        points = sorted((m["bytes_fraction"], m["score"]) for (p, _), m in means.items() if p == policy)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=policy)
    if ("full", 1.0) in means:
        ax.axhline(means[("full", 1.0)]["score"], color="black", linestyle="--", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real KV bytes / full-precision bytes")
    ax.set_ylabel("mean score (0-100)")
    ax.set_title(f"{results['model']} ctx {results['context_length']} {results['protocol']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write results.json, summary.md and pareto.png into `output`; returns their paths. Each file is
    written beside its target and renamed over it, so a crash leaves the previous file whole."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"results": output / "results.json", "summary": output / "summary.md", "pareto": output / "pareto.png"}
    _replace(paths["results"], lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    _replace(paths["summary"], lambda tmp: tmp.write_text(summary_markdown(results)))
    _replace(paths["pareto"], lambda tmp: pareto_png(results, tmp))
    return paths


def _replace(path: Path, write) -> None:
    """`write(tmp)` to a temporary sibling of `path`, then rename it over `path` (the temporary is removed on failure)."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
