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
