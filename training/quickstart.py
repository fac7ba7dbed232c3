"""`adaptive-kv quickstart`: the whole product on the embedded model, in minutes on a laptop CPU.

1. A short `train` (local Ray, SQLite Optuna, local MLflow): labels, a few Optuna trials, the best
   controller registered as models:/adaptive-kv-controller@champion.
2. The shipped controller and the new one against the static policies on held-out samples (seed 0,
   never used in training), budgets 0.25 and 0.125, both protocols.
3. A table, and the `mlflow ui` command that shows the runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from adaptive_kv.training.search import SearchSpace
from adaptive_kv.training.train import TrainConfig, run_train

STATIC = ("kvzip", "hybrid", "kivi", "knorm", "tova:selection=shared")
BUDGETS = (0.25, 0.125)
TASKS = ("passkey", "fidelity")
EVAL_LENGTH = 1024


def run_quickstart(output: str, samples: int = 3, model: str = "smollm2-135m") -> dict:
    """Train briefly, evaluate, print the table; returns the summary written to OUTPUT/quickstart.json."""
    from adaptive_kv import policies as catalog
    from adaptive_kv.evaluation import EvalConfig, Evaluator
    from adaptive_kv.models import load_model
    from adaptive_kv.report import write_outputs

    start = time.perf_counter()
    out = Path(output)
    space = SearchSpace(hidden=(32, 64), layers=(2, 3), epochs=(30, 80), recent_window=(32,),
                        scorer=("reconstruction",), selection=("per_head",), grid=("global",))
    # trained at the evaluation's length: a controller decides only near the lengths it was trained on
    train = TrainConfig(model=model, budgets=BUDGETS, trials=3, workers=2, output=str(out / "train"),
                        study="quickstart", tasks=("passkey", "fidelity"), context_lengths=(EVAL_LENGTH,),
                        train_per_task=2, valid_per_task=1, space=space)
    summary = run_train(train)
    trained = time.perf_counter() - start
    print(f"\ntrained in {trained:.0f} s; best trial {summary['best_trial']} (validation {summary['best_score']:.1f})")
    model_obj, tokenizer = load_model(model)
    policies = (*STATIC, "learned", f"learned:path={summary['controller']}")
    results = {}
    for protocol in ("query_agnostic", "query_aware"):
        config = EvalConfig(policies=policies, budgets=BUDGETS, tasks=TASKS, context_length=EVAL_LENGTH,
                            samples=samples, protocol=protocol, seed=0, max_new_tokens=10)
        results[protocol] = Evaluator(model_obj, tokenizer, config, catalog=catalog, model_name=model).run()
        write_outputs(results[protocol], out / "eval" / protocol)
    _print_table(results, summary["controller"])
    wall = round(time.perf_counter() - start, 1)
    report = {"train": summary, "eval": {p: str(out / "eval" / p) for p in results}, "wall_time_s": wall}
    (out / "quickstart.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwall time {wall} s; controller {summary['controller']}")
    print(f"registered: models:/{summary['registered_model']}@{summary['alias']} (version {summary['model_version']})")
    print(f"inspect the runs: {summary['ui']}")
    return report


def _print_table(results: dict, new_controller: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from adaptive_kv.report import plan_notes

    table = Table(title="held-out samples (seed 0): score / real bytes fraction")
    table.add_column("policy")
    columns = [(p, b) for p in results for b in BUDGETS]
    for protocol, budget in columns:
        table.add_column(f"{protocol.replace('query_', '')} @{budget:g}", justify="right")
    names = [r["policy"] for r in next(iter(results.values()))["records"]]
    for name in dict.fromkeys(names):
        label = "learned (new)" if name.endswith(new_controller) else ("learned (shipped)" if name == "learned" else name)
        cells = []
        for protocol, budget in columns:
            rows = [r for r in results[protocol]["records"] if r["policy"] == name and r["budget"] in (budget, 1.0)]
            scores = [r["score"] for r in rows if r["score"] is not None]
            fraction = [r["kv_bytes"] / r["full_kv_bytes"] for r in rows if r["kv_bytes"]]
            cells.append("infeasible" if not scores else f"{sum(scores) / len(scores):.1f} / {sum(fraction) / len(fraction):.3f}")
        table.add_row(label, *cells)
    Console().print(table)
    for protocol, result in results.items():
        for line in plan_notes(result):
            print(f"note ({protocol.replace('query_', '')}): {line}")
