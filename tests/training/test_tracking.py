"""MLflow logging of an eval run into a local SQLite store."""

import pytest

mlflow = pytest.importorskip("mlflow", reason="mlflow is part of the test extra; install .[test]")

from adaptive_kv.report import write_outputs  # noqa: E402
from adaptive_kv.training.tracking import log_eval  # noqa: E402


def test_log_eval_records_metrics_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    results = {
        "model": "tiny", "context_length": 256, "protocol": "query_agnostic", "seed": 0, "samples_per_task": 1,
        "wall_time_s": 1.5,
        "records": [
            {"policy": "full", "budget": 1.0, "task": "passkey", "score": 100.0, "n_samples": 1, "kv_bytes": 1000, "full_kv_bytes": 1000},
            {"policy": "snapkv", "budget": 0.5, "task": "passkey", "score": 50.0, "n_samples": 1, "kv_bytes": 480, "full_kv_bytes": 1000},
        ],
    }
    monkeypatch.chdir(tmp_path)
    run_id = log_eval(results, write_outputs(results, tmp_path / "out"), experiment="test-eval")
    run = mlflow.get_run(run_id)
    assert run.data.metrics["score/snapkv/b0.5/passkey"] == 50.0
    assert run.data.metrics["bytes_fraction/snapkv/b0.5/passkey"] == pytest.approx(0.48)
    assert run.data.params["protocol"] == "query_agnostic"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"results.json", "summary.md", "pareto.png"} <= artifacts


def test_a_folder_given_as_tracking_uri_is_a_sqlite_store_in_it(tmp_path, monkeypatch):
    # MLflow 3 refuses a bare folder as a file store; the folder holds a SQLite store instead
    from adaptive_kv.policies.controller.registry import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(str(tmp_path / "runs"))
    assert uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment("folder-store")
    assert mlflow.get_experiment(experiment.experiment_id).name == "folder-store"
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "env"))
    assert tracking_uri() == f"sqlite:///{(tmp_path / 'env' / 'mlflow.db').resolve()}"
