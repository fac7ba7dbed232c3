"""The training run's summary table: policy x budget x task -> score, 95 % interval, bytes (`mlflow.log_table`).

Read from `objective.evaluate_policy` results (the learned controller's and the static baselines', on the
same validation prefills). No MLflow here: the rows are plain dicts, so the table is checked without a store.
"""

from __future__ import annotations

from typing import Any

from adaptive_kv.evaluation import bootstrap_interval

ALL_TASKS = "all"
COLUMNS = ("policy", "budget", "task", "score", "ci95_low", "ci95_high", "n", "bytes_fraction", "infeasible")


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (policy, budget, task) and one per (policy, budget) over every task (`task` = "all").

    A budget the policy could not reach for any request has score None and its `infeasible` count; the
    interval is the percentile bootstrap of the mean over the scored requests (absent when none was).
    Results written by an older trainer (no per-request scores) give means without intervals.
    """
    rows = []
    for policy, result in sorted(results.items()):
        samples = result.get("samples")
        for budget, score in sorted(((float(b), s) for b, s in result["by_budget"].items()), reverse=True):
            tasks = _per_task(result, budget)
            scored = [x for task in tasks.values() for x in task[0]] if samples is not None else []
            fraction = _get(result["bytes_fraction"], budget)
            infeasible = _get(result.get("infeasible", {}), budget)
            rows.append(_row(policy, budget, ALL_TASKS, score, scored, fraction, infeasible))
            for task, (scores, fractions, mean) in sorted(tasks.items()):
                task_fraction = sum(fractions) / len(fractions) if fractions else None
                rows.append(_row(policy, budget, task, mean, scores, task_fraction, None))
    return rows


def _per_task(result: dict[str, Any], budget: float) -> dict[str, tuple[list[float], list[float], float]]:
    """task -> (scores, byte fractions, mean score) at `budget`, from the "task/budget" keys."""
    out = {}
    samples, fractions = result.get("samples"), result.get("sample_bytes", {})
    for key, mean in result["by_task"].items():
        task, key_budget = key.rsplit("/", 1)
        if float(key_budget) != budget:
            continue
        scores = samples.get(key, []) if samples is not None else []
        out[task] = (scores, fractions.get(key, []), mean)
    return out


def _get(by_budget: dict, budget: float) -> Any:
    """by_budget[budget] whether its keys are floats or (read back from JSON) strings."""
    for key, value in by_budget.items():
        if float(key) == budget:
            return value
    return None


def _row(policy: str, budget: float, task: str, score: float | None, scores: list[float],
         fraction: float | None, infeasible: int | None) -> dict[str, Any]:
    """A table row, rounded for reading (scores to 0.01, fractions to 1e-4)."""
    low, high = bootstrap_interval(scores) if scores else (None, None)
    return {"policy": policy, "budget": budget, "task": task,
            "score": None if score is None else round(score, 2),
            "ci95_low": None if low is None else round(low, 2), "ci95_high": None if high is None else round(high, 2),
            "n": len(scores), "bytes_fraction": None if fraction is None else round(fraction, 4),
            "infeasible": infeasible}
