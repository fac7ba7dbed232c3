"""Issue 24, item 4: the Optuna storage URL (it carries the database password when one is given) is logged
as a parameter of the training's MLflow run, readable by anyone who can read the tracking server. The real
parent-run code (`train._run`) against a real local MLflow store, with stand-in trials."""

from __future__ import annotations

import time
from types import SimpleNamespace

PASSWORD = "s3cret-9d2f"


class _NoTrials:
    """A pipeline whose study is already finished: only the parent run's own logging runs."""

    def __init__(self, runs) -> None:
        self.runs = runs  # the real trial-run records (none pending)

    def run_trials(self, study, tqdm) -> None:
        pass

    def best_trial(self, study):
        return SimpleNamespace(number=0, value=50.0, params={}, user_attrs={})

    def finish(self, best, tracking) -> dict:
        return {}

    def log_search(self, study) -> None:
        pass


def test_train_run_parameters_carry_no_password(tmp_path):
    from mlflow import MlflowClient

    from adaptive_kv.training import tracking, train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"postgresql+psycopg2://adaptive_kv:{PASSWORD}@postgres:5432/optuna"
    config = train.TrainConfig(model="tiny", output=str(tmp_path / "out"), storage=storage, mlflow_uri=uri)
    tracking.use_experiment(tracking.TRAIN_EXPERIMENT, uri)  # artifacts beside the store in tmp_path
    from adaptive_kv.training.trial_runs import TrialRuns

    runs = TrialRuns(tmp_path / "out", config.study, uri)
    summary = train._run(config, _NoTrials(runs), None, tracking, uri, time.perf_counter())
    params = MlflowClient(tracking_uri=uri).get_run(summary["parent_run"]).data.params
    assert not [k for k, v in params.items() if PASSWORD in v], params
    # still says where the study lives
    assert params["storage"] == "postgresql+psycopg2://adaptive_kv:***@postgres:5432/optuna"


def test_redaction_leaves_other_values_alone():
    from adaptive_kv.training.tracking import redact_credentials

    params = {"a": "sqlite:///x/optuna.db", "b": "http://mlflow:5000", "c": 3, "d": "https://u:p@h/x?q=1"}
    assert redact_credentials(params) == {**params, "d": "https://u:***@h/x?q=1"}
