"""Trial runs that outlive an MLflow outage (issue 24, item 9).

A trial's result lives in Optuna and in its folder under `<output>/trials`; its MLflow run is a record of
it. Every MLflow call about a trial run goes through `TrialRuns`, which first writes what the run should hold
to a small JSON record (`<output>/trial_runs/<study>/<number>.json`: key, parent run, parameters, start and end
time, status, note, metrics, the trial folder) and then tries to make the run say it. When the tracking
server cannot be reached (`unreachable`), the trial and the training go on: the record stays `logged: false`,
one warning is printed, and the pending records are tried again after every later trial, at the end of the
run, and when a later `train` resumes the same output folder and study (`adopt`).

Completing a run is idempotent, so a retry never makes a second run: the run is found by its record's run id,
else by its `trial_key` tag (a create whose answer was lost), else created; parameters are logged with their
same values, metrics with the record's end time (MLflow drops identical metric rows), artifacts overwrite
themselves, and the run is terminated with the record's status and end time. `logged: true` is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from adaptive_kv.training import atomic

# MLflow's own HTTP retries in training, unless the user set them: a dead server costs seconds per call
# (MLflow's defaults retry 7 times with a doubling backoff and wait 120 s per request: minutes per call)
SHORT_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# the Optuna user attribute in which a trial records its MLflow run id, when the server answered as it started
RUN_ID_ATTR = "mlflow_run_id"
# the MLflow run tag that names a trial run uniquely (the record's key): a retry finds the run it created
TRIAL_KEY_TAG = "trial_key"


@contextlib.contextmanager
def short_http_retries() -> Iterator[None]:
    """Set `SHORT_HTTP_RETRIES` for the duration (each one the environment does not set already)."""
    added = [name for name in SHORT_HTTP_RETRIES if name not in os.environ]
    for name in added:
        os.environ[name] = SHORT_HTTP_RETRIES[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the tracking server could not be reached or answered 5xx after MLflow's retries
    (connection refused or reset, timeout, too many retries), as opposed to a request it refused."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code >= 500
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        # MLflow's REST client wraps connection errors, timeouts and exhausted 5xx retries this way
        return bool(re.match(r"API request to \S+ failed with (timeout )?exception", exc.message))
    return False


def now_ms() -> int:
    return int(time.time() * 1000)


class TrialRuns:
    """The MLflow runs of one trainer's trials (tracking store `uri`), kept on disk under `folder` until
    each is complete in MLflow."""

    def __init__(self, output: Path, study: str, uri: str, log: Callable[[str], Any] = print) -> None:
        self.folder = Path(output) / "trial_runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", study)
        self.trials = Path(output) / "trials"  # the trial folders (`_Pipeline._save_trial`)
        self.uri, self.log = uri, log
        self.mine: set[str] = set()  # record names this trainer completes: its own trials and adopted ones
        self.down: BaseException | None = None  # the last failure while the server is unreachable
        self._warned = False

    # ------------------------------------------------------------------ records
    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return None

    def _write(self, record: dict[str, Any]) -> None:
        atomic.write_text(self._path(record["name"]), json.dumps(record, indent=1))

    def record(self, number: int) -> dict[str, Any] | None:
        """Trial `number`'s record, or None when this output folder holds none."""
        return self._read(str(number))

    def run_id(self, trial) -> str | None:
        """The MLflow run of an Optuna trial in this store: its record's, once complete, else the run id the
        trial recorded when it started (None when that run lives in another trainer's store)."""
        from adaptive_kv.training import tracking

        record = self.record(trial.number)
        if record is not None and record["store"] == self.uri and record.get("logged") and record.get("run_id"):
            return record["run_id"]
        return tracking.run_in_store(trial.user_attrs.get(RUN_ID_ATTR))

    def pending(self) -> list[dict[str, Any]]:
        """This trainer's records not yet complete in MLflow, trials in order, parent runs last."""
        records = [r for r in map(self._read, self.mine) if r is not None and not r.get("logged")]
        return sorted(records, key=lambda r: (r["kind"] != "trial", r.get("trial", 0), r["name"]))

    # ------------------------------------------------------------------ a trial's life
    def open(self, trial, params: dict[str, Any], parent_run_id: str | None, experiment_id: str) -> str | None:
        """Record trial `trial` as started and create its run (nested under `parent_run_id`); its run id, or
        None while the server is unreachable (the run is created when it is back)."""
        from adaptive_kv.training import tracking

        record = {"name": str(trial.number), "kind": "trial", "trial": trial.number, "key": uuid.uuid4().hex,
                  "store": self.uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                  "run_name": f"trial-{trial.number}", "params": tracking.json_params(params), "start_ms": now_ms(),
                  "status": "RUNNING", "run_id": None, "logged": False}
        self._write(record)
        self.mine.add(record["name"])
        if self.down is None:
            with self._guard():
                self._create(record)
        return record["run_id"]

    def close(self, number: int, status: str, note: str | None = None, metrics: dict[str, Any] | None = None,
              folder: Path | None = None) -> None:
        """Record trial `number` as ended (FINISHED, FAILED, KILLED) with its metrics and files, then bring
        every pending run of this trainer up to date (in trial order)."""
        record = self.record(number)
        if record is None or record["store"] != self.uri:
            return
        record.update(status=status, note=note, end_ms=now_ms(), metrics=metrics,
                      folder=None if folder is None else str(Path(folder).resolve()))
        self._write(record)
        self.sync()

    def defer_parent(self, run_id: str, status: str, note: str) -> None:
        """The parent run could not be ended: end it with `status` and `note` at the next sync."""
        self._write({"name": f"parent-{run_id}", "kind": "parent", "run_id": run_id, "store": self.uri,
                     "status": status, "note": note, "end_ms": now_ms(), "logged": False})
        self.mine.add(f"parent-{run_id}")

    def adopt(self, study) -> None:
        """Take over the records an earlier trainer on this output folder, study and store left incomplete
        (MLflow was down, or the trainer was killed) whose Optuna trials are over, and complete them now."""
        from optuna.trial import TrialState

        if not self.folder.is_dir():
            return
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for path in sorted(self.folder.glob("*.json")):
            record = self._read(path.stem)
            if record is None or record.get("logged") or record["store"] != self.uri:
                continue
            if record["kind"] == "trial":
                trial = trials.get(record["trial"])
                if trial is None or trial.state == TrialState.RUNNING:  # a live trial of another trainer
                    continue
                if record["status"] == "RUNNING":  # the trainer stopped before it wrote the end
                    self._ended_by_optuna(record, trial)
            self.mine.add(record["name"])
        if self.mine:
            self.sync()

    def _ended_by_optuna(self, record: dict[str, Any], trial) -> None:
        """A RUNNING record of a finished Optuna trial: its end as Optuna and the trial folder tell it."""
        from optuna.trial import TrialState

        folder = self.trials / str(record["trial"])
        record["end_ms"] = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else now_ms()
        if trial.state == TrialState.COMPLETE and folder.is_dir():
            record.update(status="FINISHED", metrics={"score": trial.value}, folder=str(folder.resolve()))
        else:
            record.update(status="KILLED", note="the trainer stopped before this trial's run was ended")
        self._write(record)

    # ------------------------------------------------------------------ MLflow
    def sync(self) -> bool:
        """Complete every pending run, in order, stopping at the first sign the server is still down.
        True when none is left."""
        pending = self.pending()
        if not pending:
            return True
        done = 0
        for record in pending:
            with self._guard():
                self._complete(record)
                done += 1
            if self.down is not None:
                return False
        if self._warned:
            self.log(f"MLflow at {self.uri} is reachable again: {done} pending run(s) logged")
            self._warned = False
        return True

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Run MLflow calls; an unreachable server marks the outage (one warning) instead of raising."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001  anything else is a real error and propagates
            if not unreachable(exc):
                raise
            self.down = exc
            if not self._warned:
                self._warned = True
                self.log(f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {exc}); training goes on and "
                         f"its trial runs are logged when the server is back, or when the same command resumes "
                         f"this output folder (records in {self.folder})")
        else:
            self.down = None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _create(self, record: dict[str, Any]) -> str:
        """Create the record's run (its parameters logged) and write its run id into the record."""
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = self._client()
        tags = {"trial_number": str(record["trial"]), TRIAL_KEY_TAG: record["key"]}
        if record["parent_run_id"]:
            tags[MLFLOW_PARENT_RUN_ID] = record["parent_run_id"]
        run = client.create_run(record["experiment_id"], start_time=record["start_ms"], tags=tags,
                                run_name=record["run_name"])
        record["run_id"] = run.info.run_id
        self._write(record)
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in record["params"].items()])
        return run.info.run_id

    def _find(self, record: dict[str, Any]) -> str | None:
        """The run created for this record whose creation was not recorded (its answer was lost)."""
        from mlflow.entities import ViewType

        runs = self._client().search_runs([record["experiment_id"]], f"tags.{TRIAL_KEY_TAG} = '{record['key']}'",
                                          run_view_type=ViewType.ALL, max_results=1)
        if not runs:
            return None
        record["run_id"] = runs[0].info.run_id
        self._write(record)
        return record["run_id"]

    def _complete(self, record: dict[str, Any]) -> None:
        """Make the record's run complete in MLflow (idempotent), then mark the record logged."""
        from mlflow.entities import Param

        from adaptive_kv.training import tracking

        if record["status"] == "RUNNING":
            return  # still running here: completed when it ends
        client = self._client()
        if record["kind"] == "trial":
            run_id = record["run_id"] or self._find(record)
            if run_id is None:
                run_id = self._create(record)
            else:  # the same values again: a no-op when the first try logged them
                client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
            if record.get("metrics"):
                tracking.log_metrics(client, run_id, record["metrics"], timestamp_ms=record["end_ms"])
            folder = Path(record["folder"]) if record.get("folder") else None
            if folder is not None and folder.is_dir():  # the controller's files under controller/, metrics.json beside
                for path in sorted(folder.iterdir()):
                    client.log_artifact(run_id, str(path), None if path.name == "metrics.json" else "controller")
        else:
            run_id = record["run_id"]
        if record.get("note"):
            client.set_tag(run_id, "mlflow.note.content", record["note"])
        client.set_terminated(run_id, record["status"], end_time=record["end_ms"])
        record["logged"] = True
        self._write(record)
