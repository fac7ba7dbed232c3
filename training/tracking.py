"""MLflow tracking adapters (the training package is the only place that imports mlflow).

Default store: a local SQLite backend and artifact folder under ./mlruns (inspect with
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`); set MLFLOW_TRACKING_URI for a server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path("mlruns")
EXPERIMENT = "adaptive-kv-eval"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def _metric_name(*parts: Any) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", "/".join(str(p) for p in parts))


def log_eval(results: dict[str, Any], paths: dict[str, Path], *, experiment: str = EXPERIMENT) -> str:
    """Log one eval run: parameters, a metric per (policy, budget, task), and the report files. Returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"eval-{results['model']}-{results['protocol']}-{results['context_length']}") as run:
        mlflow.log_params({k: results.get(k) for k in ("model", "context_length", "protocol", "seed", "samples_per_task")})
        for r in results["records"]:
            if r["score"] is None:
                continue
            base = (r["policy"], f"b{r['budget']:g}", r["task"])
            mlflow.log_metric(_metric_name("score", *base), r["score"])
            mlflow.log_metric(_metric_name("bytes_fraction", *base), r["kv_bytes"] / r["full_kv_bytes"])
        mlflow.log_metric("wall_time_s", results.get("wall_time_s", 0.0))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id
