"""`train` when the MLflow server dies mid-run (issue 24, item 9): a real `mlflow server` subprocess on
loopback (SQLite store in tmp_path) is SIGKILLed right after the first trial's run is complete; the other
trials run without it, and each trial ends up logged exactly once, when the server is back during the run or
when the same command resumes the output folder, which also registers the champion. Real local Ray, SQLite
Optuna, the tiny model of test_training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service_helpers import free_port
from test_training import _config, ray_local, tiny_model_dir  # noqa: F401  (fixtures)
from test_training_faults import _deadline, _study


class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` over one SQLite store and artifact folder, started and SIGKILLed
    (with its whole process group, which it was started in) as the test says."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        self.starts += 1
        log = (self.root / "mlflow.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not up after {timeout} s:\n{(self.root / 'mlflow.log').read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers; return once the port refuses connections."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only the processes it started
        self.process.wait()
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"port {self.port} still answers after the server was killed")


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.root.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _kill_after_first_logged_trial(monkeypatch, server: MlflowServer) -> list[int]:
    """Kill the server as soon as a trial's run is complete in MLflow (the record says logged): the hook is
    the trainer's own end of a trial, so no timing is guessed. Returns the trial numbers it fired on."""
    from adaptive_kv.training.trial_runs import TrialRuns

    fired: list[int] = []
    close = TrialRuns.close

    def close_then_kill(self, number, *args, **kwargs):
        close(self, number, *args, **kwargs)
        if not fired and (self.record(number) or {}).get("logged"):
            fired.append(number)
            server.kill()

    monkeypatch.setattr(TrialRuns, "close", close_then_kill)
    return fired


def _trial_runs(uri: str) -> dict[int, list]:
    """Every trial run of the training experiment by trial number (a list: a duplicate would show)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from adaptive_kv.training.tracking import TRAIN_EXPERIMENT

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(TRAIN_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.trial_number != ''", run_view_type=ViewType.ALL)
    out: dict[int, list] = {}
    for run in runs:
        out.setdefault(int(run.data.tags["trial_number"]), []).append(run)
    return out


def _records(out: Path) -> dict[int, dict]:
    folder = out / "trial_runs" / "adaptive-kv"
    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("[0-9]*.json")}


def _assert_each_trial_logged_once(uri: str, trials: int, first_parent: str) -> dict[int, object]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = _trial_runs(uri)
    assert sorted(runs) == list(range(trials)) and all(len(r) == 1 for r in runs.values()), \
        {n: [r.info.run_id for r in rs] for n, rs in runs.items()}
    for number, (run,) in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == first_parent
        assert "score" in run.data.metrics and run.data.params["trial_number"] == str(number)
        assert run.info.end_time > run.info.start_time  # the trial's own times, not the moment it was logged
        names = {a.path for a in client.list_artifacts(run.info.run_id, "controller")}
        assert "controller/controller.safetensors" in names, names
        assert len(client.get_metric_history(run.info.run_id, "score")) == 1  # a retry logs no second point
    return {n: rs[0] for n, rs in runs.items()}


def test_trials_go_on_while_mlflow_is_down_and_a_resume_logs_and_registers(tiny_model_dir, tmp_path, ray_local,
                                                                          mlflow_server, monkeypatch):
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    from adaptive_kv.training.train import run_train

    out = tmp_path / "out"
    config = _config(tiny_model_dir, out, mlflow_uri=mlflow_server.url, workers=1, trials=3, smoke_test=False)
    fired = _kill_after_first_logged_trial(monkeypatch, mlflow_server)
    logs: list[str] = []
    with _deadline(240):
        summary = run_train(config, log=logs.append)
    assert fired == [0]  # the fault happened, after trial 0's run was complete
    assert [t.state for t in _study(out).trials] == [TrialState.COMPLETE] * 3  # nothing lost
    assert summary["model_version"] is None and summary["controller"] in summary["tracking_pending"]
    assert Path(summary["controller"], "controller.safetensors").is_file()
    assert "Rerun the same command" in summary["tracking_pending"]
    assert sum("is unreachable (" in line for line in logs) == 1, logs  # one warning, not one per call
    assert json.loads((out / "summary.json").read_text())["tracking_pending"] == summary["tracking_pending"]
    records = _records(out)
    assert {n: r["logged"] for n, r in records.items()} == {0: True, 1: False, 2: False}

    mlflow_server.start()  # same port, same store
    with _deadline(240):
        resumed = run_train(config, log=logs.append)
    assert len(_study(out).trials) == 3  # the study was complete: no new trial
    runs = _assert_each_trial_logged_once(mlflow_server.url, 3, summary["parent_run"])
    assert all(r["logged"] for r in _records(out).values())
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_run(summary["parent_run"]).info.status == "FINISHED"  # ended late, not left RUNNING
    name = resumed["registered_model"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert resumed["champion_moved"] and champion.version == resumed["model_version"] == "1"
    assert champion.run_id == runs[resumed["best_trial"]].info.run_id  # the version links to its trial's run
    assert "tracking_pending" not in resumed


def test_a_server_back_during_the_run_gets_the_pending_trial_runs_and_the_registration(
        tiny_model_dir, tmp_path, ray_local, mlflow_server, monkeypatch):
    """Killed after trial 0's run, started again (same port and store) once trial 1 has ended without
    its run: trial 2's end logs trial 1's run and its own, and the run registers at its end. MLflow's own
    retries are turned off here by the user's environment, which training keeps."""
    from mlflow import MlflowClient

    from adaptive_kv.training.train import run_train
    from adaptive_kv.training.trial_runs import TrialRuns

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    fired = _kill_after_first_logged_trial(monkeypatch, mlflow_server)
    close = TrialRuns.close  # the killing close
    pending_at_restart: list[int] = []
    logged_after: dict[int, dict[int, bool]] = {}  # after each trial's end: which trials' runs are complete

    def close_then_restart(self, number, *args, **kwargs):
        close(self, number, *args, **kwargs)
        logged_after[number] = {n: bool((self.record(n) or {}).get("logged")) for n in range(number + 1)}
        if fired and mlflow_server.starts == 1 and not (self.record(number) or {}).get("logged"):
            pending_at_restart.append(number)
            mlflow_server.start()

    monkeypatch.setattr(TrialRuns, "close", close_then_restart)
    out = tmp_path / "out"
    logs: list[str] = []
    with _deadline(240):
        summary = run_train(_config(tiny_model_dir, out, mlflow_uri=mlflow_server.url, workers=1, trials=3,
                                    smoke_test=False), log=logs.append)
    assert fired == [0] and pending_at_restart == [1]  # both faults happened, in this order
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert any("reachable again" in line for line in logs), logs
    # trial 1's run was logged at trial 2's end (the next trial), not only at the end of the run
    assert logged_after[1] == {0: True, 1: False} and logged_after[2] == {0: True, 1: True, 2: True}
    runs = _assert_each_trial_logged_once(mlflow_server.url, 3, summary["parent_run"])
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_run(summary["parent_run"]).info.status == "FINISHED"
    assert summary["model_version"] == "1" and "tracking_pending" not in summary
    version = client.get_model_version(summary["registered_model"], "1")
    assert version.run_id == runs[summary["best_trial"]].info.run_id


# ------------------------------------------------------------------------------ no server needed
def test_what_counts_as_an_unreachable_server():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    from adaptive_kv.training.trial_runs import unreachable

    assert unreachable(MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed "
                                       "with exception HTTPConnectionPool(...): Max retries exceeded"))
    assert unreachable(MlflowException("API request to http://h/x failed with timeout exception read timed out."))
    assert unreachable(requests.ConnectionError("refused")) and unreachable(ConnectionRefusedError())
    assert unreachable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "later"}))
    # a request the server refused is a real error: training stops with it as before
    assert not unreachable(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not unreachable(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not unreachable(ValueError("API request to http://h/x failed with exception boom"))


def test_short_http_retries_keep_what_the_user_set(monkeypatch):
    from adaptive_kv.training.trial_runs import SHORT_HTTP_RETRIES, short_http_retries

    for name in SHORT_HTTP_RETRIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with short_http_retries():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == SHORT_HTTP_RETRIES["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
