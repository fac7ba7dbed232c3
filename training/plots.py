"""Figures logged with each training run: the Pareto plot and plan heat-maps (issue 26, item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptive_kv.plan import Plan

BIT_LEVELS = (2, 4, 8, 16)
# one colour per bit level (a continuous scale made 2, 4 and 8 bits look alike)
BIT_COLOURS = ("#d73027", "#fc8d59", "#91bfdb", "#4575b4")
ALL_TASKS = "all tasks"
FONT = 11


def _points(result: dict[str, Any], task: str) -> list[tuple[float, float]]:
    """(bytes fraction, score) per budget the policy reached, for one task or ALL_TASKS."""
    points = []
    for budget, score in result["by_budget"].items():
        key = f"{task}/{float(budget):g}"
        if task != ALL_TASKS:
            score = result.get("by_task", {}).get(key)
        fraction = _fraction(result, budget, key if task != ALL_TASKS else None)
        if score is not None and fraction is not None:
            points.append((fraction, score))
    return sorted(points)


def _fraction(result: dict[str, Any], budget: Any, key: str | None) -> float | None:
    """A task's mean byte fraction at `budget` (per-request bytes when recorded), else the budget's."""
    per_task = result.get("sample_bytes", {}).get(key) if key is not None else None
    if per_task:
        return sum(per_task) / len(per_task)
    for b, fraction in result["bytes_fraction"].items():
        if float(b) == float(budget):
            return fraction
    return None


def _tasks(results: dict[str, dict[str, Any]]) -> list[str]:
    """ALL_TASKS first, then every task any result scored."""
    found = {key.rsplit("/", 1)[0] for result in results.values() for key in result.get("by_task", {})}
    return [ALL_TASKS, *sorted(found)]


def pareto_png(results: dict[str, dict[str, Any]], path: Path, title: str,
               trials: dict[int, dict[str, Any]] | None = None) -> Path:
    """Validation score vs real bytes fraction, one panel per task (and one over all tasks).

    `results[policy]` is an `evaluate_policy` result ("learned" is the winner); `trials[number]` each trial's.
    The x axis is log2 with the budgets as ticks; every static policy is a line of points, each trial a small
    grey point, and the learned controller is a wide translucent band under the others with hollow stars on
    top: a policy it ties with stays visible on it, and it stays visible under them. A budget a policy could
    not reach has no point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(results)
    budgets = sorted({float(b) for result in results.values() for b in result["by_budget"]})
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    markers = "osD^v<>pXh"
    static = sorted(p for p in results if not p.startswith("learned"))
    for ax, task in zip(axes.flat, tasks):
        for number, trial in sorted((trials or {}).items()):
            points = _points(trial, task)
            if points:
                ax.scatter(*zip(*points), s=18, color="0.6", alpha=0.7, zorder=2,
                           label="trials" if number == min(trials) else None)
        for index, policy in enumerate(static):
            points = _points(results[policy], task)
            if points:
                ax.plot(*zip(*points), marker=markers[index % len(markers)], markersize=6, linewidth=1.3,
                        alpha=0.85, label=policy, zorder=3)
        for policy in (p for p in results if p.startswith("learned")):
            points = _points(results[policy], task)
            if points:
                ax.plot(*zip(*points), color="black", alpha=0.25, linewidth=8, solid_capstyle="round", zorder=1)
                ax.plot(*zip(*points), marker="*", markersize=16, markerfacecolor="none", markeredgecolor="black",
                        markeredgewidth=1.4, linestyle="none", label=f"{policy} (best trial)", zorder=6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("real KV bytes / full-precision bytes (budgets as ticks)", fontsize=FONT - 1)
        ax.set_ylabel("validation score (0-100)", fontsize=FONT - 1)
        ax.set_title(task, fontsize=FONT + 1)
        ax.tick_params(labelsize=FONT - 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=FONT - 1)
    fig.suptitle(title, fontsize=FONT + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plan_bytes_label(plan: Plan, seq_len: int, head_dim: int | None, dtype_bytes: int | None) -> str:
    """What a plan costs at `seq_len` tokens, for a panel title ('' without the model's head_dim and dtype)."""
    if head_dim is None or dtype_bytes is None:
        return ""
    used, full = plan.nbytes(seq_len, head_dim, dtype_bytes), plan.full_nbytes(seq_len, head_dim, dtype_bytes)
    return f" | {used / 1024:.1f} KiB = {used / full:.1%} of full"


def plan_heatmap_png(plans: dict[str, Plan], seq_len: int, path: Path, title: str, *, head_dim: int | None = None,
                     dtype_bytes: int | None = None) -> Path:
    """Per plan (a row of panels): keep fraction, key bits and value bits per (layer, KV head).

    Bits use one colour per level with a legend (they are four levels, not a scale); each row's title gives
    the bytes the plan uses at `seq_len` tokens when the model's head_dim and dtype size are given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    bit_map = ListedColormap(BIT_COLOURS)
    bit_norm = BoundaryNorm([1, 3, 6, 12, 20], bit_map.N)
    fig, axes = plt.subplots(len(plans), 3, figsize=(15, 3.2 * len(plans) + 0.8), squeeze=False)
    for row, (name, plan) in enumerate(plans.items()):
        keep = np.array([[1.0 if b.keep is None else min(1.0, b.keep / seq_len) for b in layer]
                         for layer in plan.heads]).T
        kbits = np.array([[b.key_bits for b in layer] for layer in plan.heads]).T
        vbits = np.array([[b.value_bits for b in layer] for layer in plan.heads]).T
        panels = ((keep, "keep fraction", dict(cmap="viridis", vmin=0, vmax=1)),
                  (kbits, "key bits", dict(cmap=bit_map, norm=bit_norm)),
                  (vbits, "value bits", dict(cmap=bit_map, norm=bit_norm)))
        for col, (data, label, style) in enumerate(panels):
            ax = axes[row][col]
            image = ax.imshow(data, aspect="auto", interpolation="nearest", **style)
            heading = f"{name}{plan_bytes_label(plan, seq_len, head_dim, dtype_bytes)}\n" if col == 0 else "\n"
            ax.set_title(heading + label, fontsize=FONT, loc="left")
            ax.set_xlabel("layer", fontsize=FONT - 1)
            ax.set_ylabel("KV head", fontsize=FONT - 1)
            ax.set_yticks(range(data.shape[0]))
            ax.tick_params(labelsize=FONT - 2)
            fig.colorbar(image, ax=ax, ticks=None if col == 0 else BIT_LEVELS).ax.tick_params(labelsize=FONT - 2)
    legend = [Patch(color=colour, label=f"{bits}-bit" + (" (as is)" if bits == 16 else ""))
              for bits, colour in zip(BIT_LEVELS, BIT_COLOURS)]
    fig.legend(handles=legend, loc="upper right", ncol=4, fontsize=FONT - 1, title="key / value bits")
    fig.suptitle(title, fontsize=FONT + 2, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
