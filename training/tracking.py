"""MLflow tracking adapters of evaluation and training (the registry fetch lives in `policies.controller.registry`).

Default store: a local SQLite backend under ./mlruns, with each experiment's artifacts in
./mlruns/artifacts/<experiment> (inspect with `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`);
set MLFLOW_TRACKING_URI or pass a URI for a server. Training: one parent run per `train`, a nested run
per trial (opened when the trial starts), the best controller registered as `adaptive-kv-controller`
(its version's run is the trial that produced it) with alias `champion`.

Metric names follow one pattern: `<quantity>[/<policy>]/b<budget>[/<task>]` (`score/b0.125`,
`score/b0.125/passkey`, `score/snapkv/b0.5/passkey`); losses are named by their loss function
(`train_loss/huber`), so losses of different functions never share a chart. A budget a policy cannot
reach logs nothing (absent, not 0). Parameters are JSON (`[0.25, 0.125]`, `null`), strings as they are.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptive_kv.policies.controller.registry import tracking_uri

EXPERIMENT = "adaptive-kv-eval"
TRAIN_EXPERIMENT = "adaptive-kv-train"
REGISTERED_MODEL = "adaptive-kv-controller"
CHAMPION = "champion"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, all empty here);
# "custom_model_development" makes it open on the runs table (mlflow/server/js: experimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# one log_batch call takes at most 1000 metrics (MLflow's limit)
BATCH_METRICS = 1000


def use_experiment(name: str, uri: str) -> str:
    """Make `name` the active experiment of the store at `uri`; returns its id.

    A new experiment on a local SQLite store keeps its artifacts beside the database
    (`artifact_location`): MLflow's default is ./mlruns under whatever folder the process runs in,
    which scatters run folders into working trees. Every experiment is tagged to open on its runs.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException as exc:  # another trainer created it a moment ago
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: <database folder>/artifacts/<experiment> for a SQLite file
    store; None (the server's own root) for anything else."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.endswith(":memory:"):
        return None
    database = Path(uri[len(prefix):].split("?", 1)[0])
    return (database.resolve().parent / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)).as_uri()


def json_params(params: dict[str, Any]) -> dict[str, str]:
    """Parameter values as the UI shows them: strings as they are, anything else as JSON (a tuple of
    budgets reads `[0.25, 0.125]`, not Python's `(0.25, 0.125)`; None reads `null`)."""
    return {key: value if isinstance(value, str) else json.dumps(value, default=str) for key, value in params.items()}


def run_in_store(run_id: str | None) -> str | None:
    """`run_id` when the active store holds that run, else None: trainers sharing a study may track into
    different stores, and a trial's run (recorded in the study) then lives in the other trainer's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return None
    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run_id


def budget_key(budget: float | str) -> str:
    """A budget's part of a metric name: `b0.125`."""
    return f"b{float(budget):g}"


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

    use_experiment(experiment, tracking_uri())
    with mlflow.start_run(run_name=f"eval-{results['model']}-{results['protocol']}-{results['context_length']}") as run:
        mlflow.log_params(json_params({k: results.get(k) for k in ("model", "context_length", "protocol", "seed",
                                                                   "samples_per_task")}))
        for r in results["records"]:
            if r["score"] is None:
                continue
            base = (r["policy"], budget_key(r["budget"]), r["task"])
            mlflow.log_metric(_metric_name("score", *base), r["score"])
            mlflow.log_metric(_metric_name("bytes_fraction", *base), r["kv_bytes"] / r["full_kv_bytes"])
        mlflow.log_metric("wall_time_s", results.get("wall_time_s", 0.0))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id


def trial_metrics(metrics: dict[str, Any], history: list[tuple[int, float, float]], loss: str) -> dict[str, Any]:
    """One trial's metrics by name: per-epoch losses `train_loss/<loss>` and `valid_loss/<loss>` (name -> list
    of (epoch, value)), the objective `score`, and per budget `score/b<budget>`, `bytes_fraction/b<budget>`,
    `score/b<budget>/<task>`; a budget or task the controller could not plan for is absent."""
    out: dict[str, Any] = {f"train_loss/{loss}": [(epoch, train) for epoch, train, _ in history]}
    valid = [(epoch, value) for epoch, _, value in history if value == value]  # NaN: no validation label set
    if valid:
        out[f"valid_loss/{loss}"] = valid
    out["score"] = metrics["score"]
    for budget, score in metrics["by_budget"].items():
        if score is not None:
            out[_metric_name("score", budget_key(budget))] = score
    for budget, fraction in metrics["bytes_fraction"].items():
        if fraction is not None:
            out[_metric_name("bytes_fraction", budget_key(budget))] = fraction
    for key, score in metrics["by_task"].items():
        task, budget = key.rsplit("/", 1)
        out[_metric_name("score", budget_key(budget), task)] = score
    return out


def log_metrics(client, run_id: str, metrics: dict[str, Any], timestamp_ms: int | None = None) -> None:
    """Log `metrics` (name -> value, or name -> [(step, value)]) into run `run_id` in batches, stamped
    `timestamp_ms` (default now; a retry with the same stamp adds no rows: MLflow drops identical ones)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    rows = []
    for name, value in metrics.items():
        steps = value if isinstance(value, list) else [(0, value)]
        rows.extend(Metric(name, float(v), now, int(step)) for step, v in steps)
    for start in range(0, len(rows), BATCH_METRICS):
        client.log_batch(run_id, metrics=rows[start : start + BATCH_METRICS])


def champion_folder(name: str = REGISTERED_MODEL) -> Path | None:
    """A local copy of registered model `name`'s current @champion controller, or None when there is none yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from adaptive_kv.policies.controller.registry import fetch_controller

    try:
        MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # no such registered model, or (INVALID_PARAMETER_VALUE) one that has no champion alias yet
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return fetch_controller(f"models:/{name}@{CHAMPION}", tracking_uri())


@dataclass(frozen=True)
class VersionCard:
    """What a registered controller version says about itself: the trial run that produced it (the version's
    run, so the UI links to it), its base model, its validation scores and the code that trained it."""

    trial_number: int
    trial_run_id: str | None  # None for a trial of an older trainer that recorded no run id
    parent_run_id: str
    base_model: str
    base_model_revision: str  # SHA-256 of the base model's config and weights (local folders carry no hub revision)
    validation: dict[float, float | None]  # mean validation score per budget; None: the budget was out of reach
    params: dict[str, Any]  # the winning trial's hyper-parameters
    git_commit: str | None = None

    def tags(self) -> dict[str, str]:
        """Version tags (strings, as the registry stores them)."""
        tags = {"base_model": self.base_model, "base_model_revision": self.base_model_revision,
                "git_commit": self.git_commit or "unknown", "trial_number": str(self.trial_number),
                "parent_run_id": self.parent_run_id}
        if self.trial_run_id:
            tags["trial_run_id"] = self.trial_run_id
        for budget, score in sorted(self.validation.items(), reverse=True):
            tags[f"validation_score/{budget_key(budget)}"] = "infeasible" if score is None else f"{score:.2f}"
        return tags

    def description(self) -> str:
        """Markdown shown on the version's page."""
        scores = ", ".join(f"{float(b):g}: {'infeasible' if s is None else f'{s:.1f}'}"
                           for b, s in sorted(self.validation.items(), reverse=True))
        params = ", ".join(f"{k}={v}" for k, v in sorted(json_params(self.params).items()))
        return (f"Learned KV-cache controller for `{self.base_model}` (weights {self.base_model_revision[:12]}), "
                f"from trial {self.trial_number} of training run `{self.parent_run_id}`.\n\n"
                f"Validation score (0-100, teacher-forced) per budget: {scores}.\n\n"
                f"Hyper-parameters: {params}.\n\nCode: git commit {self.git_commit or 'unknown'}.")


def source_commit() -> str | None:
    """The git commit of the checkout this package runs from, or None (an installed wheel, no git)."""
    folder = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def pyfunc_requirements() -> list[str]:
    """What the registered pyfunc needs, all from public indexes: adaptive-kv's own runtime dependencies
    (its code travels with the model, `_stage_code`) and this MLflow. A pin of adaptive-kv itself would
    name a package no index serves."""
    from importlib.metadata import requires, version

    runtime = [r for r in requires("adaptive-kv") or [] if "extra ==" not in r]
    return [*runtime, f"mlflow=={version('mlflow')}"]


def _stage_code(root: Path) -> Path:
    """A copy of the `adaptive_kv` package as the pyfunc imports it (core + policies; no training or
    services, no shipped controllers) under `root`, for the model's code_paths."""
    import shutil

    import adaptive_kv
    import adaptive_kv.policies

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "shipped")
    target = root / "adaptive_kv"
    shutil.copytree(Path(adaptive_kv.__file__).parent, target, ignore=ignore)
    shutil.rmtree(target / "policies", ignore_errors=True)  # a source checkout has none here; an install has it
    shutil.copytree(Path(adaptive_kv.policies.__file__).parent, target / "policies", ignore=ignore)
    return target


def register_controller(folder: Path, example: dict[str, Any], make_champion: bool = True,
                        card: VersionCard | None = None, name: str = REGISTERED_MODEL) -> str:
    """Log the controller folder as a pyfunc of the trial run that produced it (else the active run) and
    register it, with the card's description and tags; alias it champion only when `make_champion` (the
    caller compared it with the current one). `name`: the registered model of the controller's base model
    (`registered_model_name`). Returns the version."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import Model, infer_signature

    frame = pd.DataFrame([example])
    signature = infer_signature(frame, pd.DataFrame({"plan": ["{}"]}))
    run_id = card.trial_run_id if card is not None and card.trial_run_id else None
    with tempfile.TemporaryDirectory(prefix="akv-pyfunc-") as tmp:
        # Model.log with run_id: the logged model's source run, and so the version's run, is the trial's
        # named "pyfunc": MLflow 3 lists a run's logged models beside its artifacts, under the model's name,
        # and the trial run's own controller files are already under controller/
        info = Model.log(artifact_path=None, name="pyfunc", flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                         artifacts={"controller": str(folder)}, signature=signature, input_example=frame,
                         pip_requirements=pyfunc_requirements(), code_paths=[str(_stage_code(Path(tmp)))])
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, name, tags=card.tags() if card else None)
    if card is not None:
        client.update_model_version(name, version.version, description=card.description())
    if make_champion:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return str(version.version)


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
