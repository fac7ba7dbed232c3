"""MLflow tracking adapters of evaluation and training (the registry fetch lives in `policies.controller.registry`).

Default store: a local SQLite backend and artifact folder under ./mlruns (inspect with
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`); set MLFLOW_TRACKING_URI or pass a
URI for a server. Training: one parent run per `train`, a nested run per trial, the best
controller registered as `adaptive-kv-controller` with alias `champion`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from adaptive_kv.policies.controller.registry import tracking_uri

EXPERIMENT = "adaptive-kv-eval"
TRAIN_EXPERIMENT = "adaptive-kv-train"
REGISTERED_MODEL = "adaptive-kv-controller"
CHAMPION = "champion"


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _metric_name(*parts: Any) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", "/".join(str(p) for p in parts))


def redact_credentials(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the password of every URL value replaced by ***: parameters are shown to anyone who can
    read the tracking server, and a storage URL may carry the database password."""
    from urllib.parse import urlsplit, urlunsplit

    def redact(value: Any) -> Any:
        if not isinstance(value, str) or "://" not in value:
            return value
        parts = urlsplit(value)
        if parts.password is None:
            return value
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    return {key: redact(value) for key, value in params.items()}


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


def log_trial_metrics(metrics: dict[str, Any], history: list[tuple[int, float, float]]) -> None:
    """Per-epoch losses and per-budget / per-task validation scores of one trial (inside its run)."""
    import mlflow

    for epoch, train_loss, valid_loss in history:
        mlflow.log_metric("train_loss", train_loss, step=epoch)
        if valid_loss == valid_loss:  # NaN when there is no validation label set
            mlflow.log_metric("valid_loss", valid_loss, step=epoch)
    mlflow.log_metric("score", metrics["score"])
    for budget, score in metrics["by_budget"].items():
        mlflow.log_metric(_metric_name("score", f"b{float(budget):g}"), score)
    for budget, fraction in metrics["bytes_fraction"].items():
        if fraction is not None:
            mlflow.log_metric(_metric_name("bytes_fraction", f"b{float(budget):g}"), fraction)
    for key, score in metrics["by_task"].items():
        mlflow.log_metric(_metric_name("score", key), score)


def champion_folder() -> Path | None:
    """A local copy of the current @champion controller, or None when there is none yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from adaptive_kv.policies.controller.registry import fetch_controller

    try:
        MlflowClient().get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return fetch_controller(f"models:/{REGISTERED_MODEL}@{CHAMPION}", tracking_uri())


def register_controller(folder: Path, example: dict[str, Any], make_champion: bool = True) -> str:
    """Log the controller folder as a pyfunc in the active run and register it; alias it champion only when
    `make_champion` (the caller compared it with the current one). Returns the version."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    frame = pd.DataFrame([example])
    signature = infer_signature(frame, pd.DataFrame({"plan": ["{}"]}))
    info = mlflow.pyfunc.log_model(
        name="controller",
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"controller": str(folder)},
        signature=signature,
        registered_model_name=REGISTERED_MODEL,
    )
    version = str(info.registered_model_version)
    if make_champion:
        MlflowClient().set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    return version


def example_input(stats, budget: float) -> dict[str, Any]:
    """One pyfunc input row for these statistics."""
    return {
        "features": json.dumps(stats.features.tolist()),
        "feature_names": json.dumps(list(stats.feature_names)),
        "seq_len": int(stats.seq_len),
        "budget": float(budget),
        "head_dim": int(stats.head_dim),
        "dtype_bytes": int(stats.dtype_bytes),
    }
