"""Figures logged with each training run: Pareto front and plan heat-maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptive_kv.plan import Plan


def pareto_png(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Score vs real bytes fraction, one line per policy; results[policy] = evaluate_policy output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy, res in sorted(results.items()):
        points = sorted((f, res["by_budget"][b]) for b, f in res["bytes_fraction"].items() if f is not None)
        if points:
            xs, ys = zip(*points)
            style = dict(linewidth=2.5, color="black") if policy.startswith("learned") else {}
            ax.plot(xs, ys, marker="o", label=policy, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real KV bytes / full-precision bytes")
    ax.set_ylabel("validation score (teacher-forced, 0-100)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plan_heatmap_png(plans: dict[str, Plan], seq_len: int, path: Path, title: str) -> Path:
    """Per request (rows of panels): keep fraction and key / value bits per (layer, head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(plans), 3, figsize=(9, 2.2 * len(plans)), squeeze=False)
    for row, (name, plan) in enumerate(plans.items()):
        keep = np.array([[1.0 if b.keep is None else min(1.0, b.keep / seq_len) for b in layer] for layer in plan.heads]).T
        kbits = np.array([[b.key_bits for b in layer] for layer in plan.heads]).T
        vbits = np.array([[b.value_bits for b in layer] for layer in plan.heads]).T
        for col, (data, label, vmax) in enumerate(((keep, "keep fraction", 1.0), (kbits, "key bits", 16), (vbits, "value bits", 16))):
            ax = axes[row][col]
            image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_title(f"{name}: {label}", fontsize=8)
            ax.set_xlabel("layer", fontsize=7)
            ax.set_ylabel("KV head", fontsize=7)
            fig.colorbar(image, ax=ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
