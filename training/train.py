"""The `adaptive-kv train` flow: requests -> labels (Ray) -> Optuna trials (Ray) -> MLflow + registry."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adaptive_kv.model_identity import ModelIdentity
from adaptive_kv.training import atomic, trial_runs
from adaptive_kv.training.calibration import DEFAULT_MIX, MAX_CONTEXT, MIN_CONTEXT, make_split
from adaptive_kv.training.objective import OBJECTIVES
from adaptive_kv.training.search import SearchSpace

STATIC_BASELINES: dict[str, dict] = {
    "hybrid": {"name": "hybrid"},
    "kivi": {"name": "kivi"},
    "knorm": {"name": "knorm"},
    "tova": {"name": "tova"},
    "ada_kv": {"name": "ada_kv"},
    "snapkv": {"name": "snapkv"},
    "kvzip": {"name": "kvzip"},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `adaptive-kv train` takes; validated before anything starts."""

    model: str = "smollm2-135m"
    budgets: tuple[float, ...] = (0.25, 0.125, 0.0625)
    trials: int = 8
    workers: int = 2
    ray_address: str | None = None
    storage: str | None = None  # SQLAlchemy URL; default sqlite:///<output>/optuna.db
    study: str = "adaptive-kv"
    mlflow_uri: str | None = None
    output: str = "outputs/train"
    tasks: tuple[str, ...] = DEFAULT_MIX
    # calibration and validation requests are made at each length (the controller's trained range)
    context_lengths: tuple[int, ...] = (1024,)
    train_per_task: int = 4
    valid_per_task: int = 2
    group_size: int = 32
    space: SearchSpace = field(default_factory=SearchSpace.network)
    smoke_test: bool = False  # a smoke run never registers a controller
    register: bool = True
    # move @champion to the new controller even when it does not beat the current champion
    force_champion: bool = False
    # trial or label tasks failing in a row (a dead worker is replaced each time) before `train` stops
    max_consecutive_failures: int = 3
    # seconds between Optuna heartbeats of running trials; a trial silent for 3 intervals is failed by
    # whichever trainer opens the study next, so a killed trainer's trials do not block the count
    heartbeat_s: int = 20
    # a reconstruction predictor's folder (`train-scorer`): copied beside the controller, so the folder
    # and the registered version carry both (`learned:reconstruction=predicted` reads it)
    scorer: str | None = None
    # fit a scorer first (`train-scorer` on the same workers, contexts and MLflow) and ship that one
    fit_scorer: bool = False
    # what the controller reads its reconstruction features from: "exact" (the second pass) or
    # "predicted" (the shipped scorer, no second pass; needs scorer or fit_scorer)
    reconstruction: str = "exact"
    # how validation requests score a controller (`objective.OBJECTIVES`): the answer's likelihood
    # relative to the full cache, or the answer generated from the compressed cache as `eval` scores it
    objective: str = "likelihood"

    def __post_init__(self) -> None:
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets must be in (0, 1], got {b}")
        for name in ("trials", "workers", "train_per_task", "valid_per_task", "max_consecutive_failures",
                     "heartbeat_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        lengths = self.context_lengths
        if not lengths or len(set(lengths)) != len(lengths) or any(not MIN_CONTEXT <= n <= MAX_CONTEXT for n in lengths):
            raise ValueError(f"context_lengths must be distinct lengths in [{MIN_CONTEXT}, {MAX_CONTEXT}] tokens, "
                             f"got {lengths}")
        if self.scorer is not None and self.fit_scorer:
            raise ValueError("give scorer (a fitted scorer's folder) or fit_scorer, not both")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.reconstruction not in ("exact", "predicted"):
            raise ValueError(f"reconstruction must be 'exact' or 'predicted', got {self.reconstruction!r}")
        if self.reconstruction == "predicted" and self.scorer is None and not self.fit_scorer:
            raise ValueError("reconstruction='predicted' trains on a scorer's predictions: give scorer or fit_scorer")
        if self.scorer is not None:
            from adaptive_kv.predicted_reconstruction import load_predictor

            load_predictor(self.scorer)  # a missing or broken scorer fails before any work starts

    @classmethod
    def smoke(cls, **overrides: Any) -> "TrainConfig":
        """A tiny end-to-end run: short contexts, two tasks, one sample each, two small trials."""
        base = dict(trials=2, tasks=("passkey", "fidelity"), context_lengths=(256,), train_per_task=1, valid_per_task=1,
                    budgets=(0.5, 0.25), space=SearchSpace.smoke(), smoke_test=True)
        return cls(**{**base, **overrides})

    def storage_url(self) -> str:
        """Optuna storage URL."""
        if self.storage:
            return self.storage
        Path(self.output).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(Path(self.output) / 'optuna.db').resolve()}"


def run_train(config: TrainConfig, log=print) -> dict[str, Any]:
    """Run the whole pipeline; returns a summary (best trial, controller folder, model version, UI command)."""
    import mlflow
    import ray as _ray  # fails early with a clear ImportError if the train extra is missing

    from adaptive_kv.models import load_model
    from adaptive_kv.training import search, tracking
    from adaptive_kv.training.label_cache import model_digest
    from adaptive_kv.training.trial_runs import TrialRuns, short_http_retries

    start = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(config.model)
    base_model = _base_model(model, config)  # a model train cannot serve, or another model's scorer: refused now
    model_sha = model_digest(model)  # the label cache key reads the weights themselves
    del model
    if config.fit_scorer:
        config = replace(config, scorer=_fit_scorer(config, log), fit_scorer=False)
    train_requests, valid_requests = make_split(tokenizer, tasks=config.tasks, context_lengths=config.context_lengths,
                                                train_per_task=config.train_per_task,
                                                valid_per_task=config.valid_per_task)
    study = search.open_study(config.study, config.storage_url(), heartbeat_s=config.heartbeat_s)
    uri = tracking.tracking_uri(config.mlflow_uri)
    tracking.use_experiment(tracking.TRAIN_EXPERIMENT, uri)
    from adaptive_kv.training.pool import WorkerPool

    owns_ray = not _ray.is_initialized()
    ray = search.start_ray(config.ray_address, config.workers)
    pool = WorkerPool(ray, config.model, config.workers, config.max_consecutive_failures)
    pipeline = _Pipeline(config, ray, pool, train_requests, valid_requests, out, log, model_sha)
    pipeline.base_model = base_model
    pipeline.runs = TrialRuns(out, config.study, uri, log)
    try:
        with short_http_retries():  # a dead tracking server costs seconds per call, not minutes
            summary = _run(config, pipeline, study, tracking, uri, start)
    finally:  # actors hold a CPU each: free them, and the Ray this call started
        pool.shutdown()
        if owns_ray:
            ray.shutdown()
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def _run(config: TrainConfig, pipeline: "_Pipeline", study, tracking, uri: str, start: float) -> dict[str, Any]:
    """The MLflow parent run around the trials and the final artifacts.

    The tracking server must answer at the start; if it stops answering later, trials go on (their runs are
    logged when it is back: `trial_runs.TrialRuns`), and if it is still down at the end the controller is
    saved and the summary says that rerunning the same command logs and registers it."""
    import mlflow
    from tqdm import tqdm

    from adaptive_kv.training.trial_runs import unreachable

    runs = pipeline.runs  # read before the run starts: the finally below must always reach end_run
    parent = mlflow.start_run(run_name=f"train-{Path(config.model).name}", log_system_metrics=_system_metrics())
    status = "FAILED"
    try:
        config_params = {k: v for k, v in asdict(config).items() if k != "space"}
        mlflow.log_params(tracking.json_params(tracking.redact_credentials(config_params)))
        mlflow.log_dict(asdict(config.space), "search_space.json")
        pipeline.runs.adopt(study)  # trial runs an earlier run of this command could not log
        pipeline.run_trials(study, tqdm)
        best = pipeline.best_trial(study)
        try:
            if not pipeline.runs.sync():  # still down: no call of the end would get through
                raise pipeline.runs.down
            _log_winner(best, pipeline.runs)
            summary = pipeline.finish(best, tracking)
            pipeline.log_search(study)
            mlflow.log_metric("best_score", best.value)
        except Exception as exc:  # noqa: BLE001  only an unreachable server is survived here
            if not unreachable(exc):
                raise
            summary = pipeline.untracked_end(best, uri, exc)
        else:
            pipeline.runs.sync()  # a last try for trial runs that failed while the end was logged
        summary.update(parent_run=parent.info.run_id, tracking_uri=uri, ui=tracking.ui_command(uri),
                       best_trial=best.number, best_score=best.value, best_params=best.params,
                       wall_time_s=round(time.perf_counter() - start, 1))
        status = "FINISHED"
    finally:
        _end_parent(parent.info.run_id, status, runs)
    return summary


def _end_parent(run_id: str, status: str, runs) -> None:
    """End the parent run; when the server is unreachable it is ended at the next sync (a resume) instead,
    and its system-metrics sampler is stopped here."""
    import mlflow
    from mlflow.tracking import fluent

    from adaptive_kv.training.trial_runs import unreachable

    try:
        mlflow.end_run(status)  # takes the run off MLflow's active stack before it calls the server
    except Exception as exc:  # noqa: BLE001
        if not unreachable(exc):
            raise
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
        runs.defer_parent(run_id, status, "MLflow was unreachable at the end of this run: the figures, summary "
                                          "table and registration are in the run of the command that resumed it")


def _system_metrics() -> bool:
    """Record the parent run's CPU, memory and disk use (MLflow's system metrics) when psutil, which
    MLflow samples them with, is installed."""
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def trial_params(trial) -> dict[str, Any]:
    """The hyper-parameters of an Optuna trial: the whole trial config this trainer recorded when it started
    the trial (`TRIAL_CONFIG_ATTR`), else (a trial of an older trainer) its Optuna suggestions."""
    return dict(trial.user_attrs.get(TRIAL_CONFIG_ATTR) or trial.params)


def _log_winner(best, runs) -> None:
    """The parent run names its winning trial (`best_trial`, and its hyper-parameters as `best/<name>`
    parameters); the winning trial's run is tagged `best_trial=true`."""
    import mlflow
    from mlflow import MlflowClient

    from adaptive_kv.training import tracking

    mlflow.log_param("best_trial", best.number)
    mlflow.log_params(tracking.json_params({f"best/{k}": v for k, v in trial_params(best).items()}))
    run_id = runs.run_id(best)  # None: another trainer's store
    if run_id is not None:
        mlflow.set_tag("best_trial_run_id", run_id)
        MlflowClient().set_tag(run_id, "best_trial", "true")


# the parent run's policy x budget x task table (the UI's artifact view shows it as a table)
SUMMARY_TABLE = "validation_summary.json"
# requests of distinct tasks shown in figures/plans.png, each at every budget
HEATMAP_REQUESTS = 3
# Optuna user attributes of a trial: its MLflow run, and its whole trial config (another trainer sharing
# the study, or a rerun, finds both there)
RUN_ID_ATTR = trial_runs.RUN_ID_ATTR
TRIAL_CONFIG_ATTR = "config"


class _Pipeline:
    """Driver-side state of one `train`: label sets per layout, trials in flight, MLflow logging."""

    def __init__(self, config, ray, pool, train_requests, valid_requests, out: Path, log, model_sha: str) -> None:
        self.config, self.ray, self.pool, self.out, self.log = config, ray, pool, out, log
        self.train_requests, self.valid_requests, self.model_sha = train_requests, valid_requests, model_sha
        self.labels: dict[str, tuple[list, list]] = {}
        self.base_model: ModelIdentity | None = None  # the model trained for (registry name, trial checks)
        self.runs = None  # trial_runs.TrialRuns: every MLflow call about a trial run goes through it

    # ------------------------------------------------------------------ labels
    def labels_for(self, trial_config, tqdm) -> tuple[list, list]:
        """Train/valid labels of a layout: from the cache folder of their fingerprint (`label_cache`), else
        computed one request per task over the pool's workers (a dead worker's request is redone)."""
        from adaptive_kv.training import label_cache

        requests = {"train": self.train_requests, "valid": self.valid_requests}
        key = label_cache.fingerprint(self.model_sha, trial_config, requests)
        if key in self.labels:
            return self.labels[key]
        folder = label_cache.folder_for(self.out / "labels", trial_config, key)
        cached = label_cache.load(folder, requests)
        if cached is not None:
            self.labels[key] = (cached["train"], cached["valid"])
            return self.labels[key]
        every = self.train_requests + self.valid_requests
        results = self._map_labels(every, trial_config, tqdm(total=len(every), desc=f"labels {folder.name}",
                                                              unit="request"))
        train, valid = results[: len(self.train_requests)], results[len(self.train_requests) :]
        label_cache.store(folder, {"train": train, "valid": valid}, key)
        self.labels[key] = (train, valid)
        return train, valid

    def _map_labels(self, requests: list, trial_config, bar) -> list:
        """Labels of each request in order, one task per request on a lent worker."""
        results: list = [None] * len(requests)
        waiting, running = list(range(len(requests))), {}
        while waiting or running:
            while waiting and self.pool.free:
                index, worker = waiting.pop(0), self.pool.take()
                running[worker.labels.remote([requests[index]], trial_config)] = (index, worker)
            done, _ = self.ray.wait(list(running), num_returns=1)
            index, worker = running.pop(done[0])
            try:
                (results[index],) = self.ray.get(done[0])
            except Exception as exc:  # noqa: BLE001  the pool replaces a dead worker or stops after too many
                self.log(f"labels of {requests[index].key} failed, redoing them: {exc}")
                waiting.append(index)
                self.pool.failed(worker, exc)
                continue
            self.pool.succeeded(worker)
            bar.update(1)
        bar.close()
        return results

    # ------------------------------------------------------------------ trials
    def run_trials(self, study, tqdm) -> None:
        """Ask, run on free workers, tell, until the study holds `trials` finished or running trials.

        Running trials of other trainers on the same study count too (so two trainers do not overshoot
        the total); ours send Optuna heartbeats, and trials whose trainer went silent are failed
        (`search.open_study`) and asked again. A failed trial is recorded as failed and asked again;
        a worker that died is replaced (`pool.WorkerPool`), which stops after too many failures in a row.
        """
        from adaptive_kv.training import search
        from adaptive_kv.training.progress import EpochTicks

        target = self.config.trials
        bar = tqdm(total=target, initial=min(target, search.finished(study)), desc="trials", unit="trial")
        epochs = tqdm(total=0, desc="epochs", unit="epoch")
        ticks = EpochTicks(self.log)
        running: dict[Any, tuple] = {}
        heartbeat = search.TrialHeartbeat(study, self.config.heartbeat_s)
        try:
            while True:
                while self.pool.free and (trial := self._ask(study, target)) is not None:
                    heartbeat.add(trial)
                    trial_config = self._reading(search.suggest(
                        trial, self.config.space, self.config.group_size, seed=trial.number,
                        several_lengths=len(self.config.context_lengths) > 1))
                    train, valid = self.labels_for(trial_config, tqdm)
                    worker = self.pool.take()
                    run_id = self._open_trial_run(trial, trial_config)
                    future = worker.trial.remote(trial_config, train, valid, self.valid_requests,
                                                 self.config.budgets, ticks.queue)
                    running[future] = (trial, trial_config, worker, run_id)
                    epochs.total += trial_config.fit.epochs
                    epochs.refresh()
                if not running:
                    break
                done, _ = self.ray.wait(list(running), num_returns=1, timeout=0.5)
                epochs.update(ticks.drain())
                if done:
                    self._collect(study, running.pop(done[0]), done[0], heartbeat, bar)
        finally:
            for trial, _, _, _ in running.values():  # interrupted: their runs end now, not as RUNNING forever
                self.runs.close(trial.number, "KILLED")
            heartbeat.stop()
            epochs.close()
            bar.close()

    def _open_trial_run(self, trial, trial_config) -> str | None:
        """The trial's MLflow run, nested under the active (parent) run and opened as the trial starts, so
        its duration is the trial's; its parameters are the whole trial config, named as Optuna names the
        searched ones. The config, and the run id when the server answered, go into the Optuna trial too
        (`TRIAL_CONFIG_ATTR`, `RUN_ID_ATTR`); a run the server could not take is created later (`self.runs`)."""
        import mlflow

        from adaptive_kv.training import tracking

        trial.set_user_attr(TRIAL_CONFIG_ATTR, trial_config.to_params())
        parent = mlflow.active_run()
        experiment_id = parent.info.experiment_id if parent is not None else mlflow.get_experiment_by_name(
            tracking.TRAIN_EXPERIMENT).experiment_id
        params = {**trial_config.to_params(), "trial_number": trial.number}
        run_id = self.runs.open(trial, params, parent.info.run_id if parent is not None else None, experiment_id)
        if run_id is not None:
            trial.set_user_attr(RUN_ID_ATTR, run_id)
        return run_id

    def _ask(self, study, target: int):
        """A new trial, or None when the study's finished and running trials already make `target`."""
        from optuna.trial import TrialState

        from adaptive_kv.training import search

        if search.counted(study) >= target:
            return None
        trial = study.ask()
        # another trainer may have asked at the same moment: the later trial gives way
        ahead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                 if t.number < trial.number]
        if len(ahead) >= target:
            trial.set_user_attr("skipped", "the study already held its trials when this one was asked")
            study.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def _collect(self, study, entry: tuple, future, heartbeat, bar) -> None:
        """Record one finished trial task: saved, told, logged; or failed, with the worker given back or replaced."""
        from optuna.trial import TrialState

        from adaptive_kv.training import tracking

        trial, trial_config, worker, _ = entry
        heartbeat.remove(trial)
        try:
            result = self.ray.get(future)
        except Exception as exc:  # noqa: BLE001  a failed trial is recorded as failed, the study goes on
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self.log(f"trial {trial.number} failed: {exc}")
            self.runs.close(trial.number, "FAILED", f"failed: {exc}")
            self.pool.failed(worker, exc)
            return
        self.pool.succeeded(worker)
        folder = self._save_trial(trial.number, result)
        told = study.tell(trial, result["metrics"]["score"], skip_if_finished=True)
        if told.state != TrialState.COMPLETE:  # another trainer failed it while its heartbeat lagged
            self.log(f"trial {trial.number} was marked {told.state.name} by another trainer; its result is not counted")
            self.runs.close(trial.number, "KILLED", f"marked {told.state.name} by another trainer; not counted")
            return
        # its metrics, and its folder's files as artifacts; kept on disk until the server has them
        self.runs.close(trial.number, "FINISHED", metrics=tracking.trial_metrics(
            result["metrics"], result["history"], trial_config.fit.loss), folder=folder)
        bar.set_postfix(score=f"{result['metrics']['score']:.1f}")
        bar.update(1)

    def best_trial(self, study):
        """The best finished trial whose folder here holds every file intact (another trainer's trials, and
        a folder damaged on disk, are skipped with a message)."""
        from optuna.trial import TrialState

        complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
        for trial in complete:
            problem = self._trial_files_problem(trial.number)
            if problem is None:
                return trial
            self.log(f"trial {trial.number} skipped as best: {problem}")
        raise RuntimeError(f"none of the study's {len(complete)} finished trials has intact files under "
                           f"{self.out / 'trials'}; rerun with a new --study or --output")

    def _trial_files_problem(self, number: int) -> str | None:
        """Why trial `number`'s folder cannot be used (a missing or corrupt file), or None."""
        from adaptive_kv.policies.controller.files import load_controller

        folder = self.out / "trials" / str(number)
        try:
            trained_for = load_controller(folder)[0].base_model
            json.loads((folder / "metrics.json").read_text())["by_budget"]
        except (ValueError, OSError, KeyError, TypeError) as exc:
            return str(exc)
        if trained_for is not None and self.base_model is not None and not trained_for.same_model(self.base_model):
            # a study resumed with another --model: that model's trials must not become this model's controller
            return f"it was trained for {trained_for.describe()}, not {self.base_model.describe()}"
        return None

    def _save_trial(self, number: int, result: dict) -> Path:
        from adaptive_kv.policies.controller.files import ControllerConfig, save_controller

        config = ControllerConfig.from_json(result["config"])
        net = config.build()
        net.load_state_dict(result["state"])

        def fill(folder: Path) -> None:
            save_controller(folder, config, net)
            (folder / "metrics.json").write_text(json.dumps(result["metrics"], indent=1, default=str))

        return atomic.write_folder(self.out / "trials" / str(number), fill)  # a killed run leaves no half folder

    def _reading(self, trial_config):
        """The trial with this training's reconstruction source and validation objective."""
        trial_config = replace(trial_config, objective=self.config.objective)
        if self.config.reconstruction == "exact":
            return trial_config
        return replace(trial_config, reconstruction="predicted", scorer_path=str(Path(self.config.scorer).resolve()))

    def _add_scorer(self, target: Path) -> None:
        """Copy the configured scorer's files into the controller folder, after checking its shape."""
        from adaptive_kv.policies.controller.files import load_controller
        from adaptive_kv.predicted_reconstruction import SCORER_JSON, SCORER_WEIGHTS

        _check_scorer_shape(self.config.scorer, load_controller(target)[0])
        for name in (SCORER_JSON, SCORER_WEIGHTS):
            shutil.copyfile(Path(self.config.scorer) / name, target / name)

    # ------------------------------------------------------------------ the end
    def finish(self, best, tracking) -> dict[str, Any]:
        """Copy the best controller, log figures and artifacts, register the champion."""
        import mlflow
        import pandas as pd

        from adaptive_kv.plan import Plan
        from adaptive_kv.policies.controller.files import load_controller
        from adaptive_kv.training.objective import TrialConfig
        from adaptive_kv.training.plots import pareto_png, plan_heatmap_png
        from adaptive_kv.training.summary_table import COLUMNS as SUMMARY_COLUMNS
        from adaptive_kv.training.summary_table import summary_rows

        source = self.out / "trials" / str(best.number)
        target = self._save_controller(best)
        config, net = load_controller(target)
        # static policies read exact scores (their own); scored with this training's objective
        trial_config = TrialConfig(**config.layout.keywords(), objective=self.config.objective)
        worker = self.pool.any_worker()
        baselines = self.ray.get(worker.baselines.remote(STATIC_BASELINES, self.valid_requests, trial_config,
                                                         self.config.budgets))
        baselines["learned"] = json.loads((source / "metrics.json").read_text())
        baselines["learned"]["by_budget"] = {float(k): v for k, v in baselines["learned"]["by_budget"].items()}
        baselines["learned"]["bytes_fraction"] = {float(k): v for k, v in baselines["learned"]["bytes_fraction"].items()}
        figures = self.out / "figures"
        figures.mkdir(exist_ok=True)
        (figures / "validation_scores.json").write_text(json.dumps(baselines, indent=1, default=str))
        pareto_png(baselines, figures / "pareto.png", f"{Path(self.config.model).name}: validation, learned vs static",
                   trials=self._trial_results())
        budget = sorted(self.config.budgets)[len(self.config.budgets) // 2]  # the registered input example's
        seq_len = max(self.config.context_lengths)  # the heatmaps show plans at the longest trained length
        shown = [r for r in self.valid_requests if r.length == seq_len]
        examples = {}
        for each in sorted(self.config.budgets, reverse=True):  # every budget, a few requests of distinct tasks
            plans_json = self.ray.get(worker.plans.remote(config.to_json(), {k: v for k, v in net.state_dict().items()},
                                                          shown, self._reading(trial_config), each))
            distinct = {name.split(" (")[0]: (name, plan) for name, plan in reversed(_one_per_task(plans_json).items())}
            for name, plan in list(reversed(distinct.values()))[:HEATMAP_REQUESTS]:
                examples[f"{name} @ budget {each:g}"] = Plan.from_json(plan)
        stats = _example_stats(config)
        plan_heatmap_png(examples, seq_len, figures / "plans.png", f"learned plans at {seq_len} tokens",
                         head_dim=stats.head_dim, dtype_bytes=stats.dtype_bytes)
        label_stats = _label_statistics(self.labels, config)
        (figures / "label_statistics.json").write_text(json.dumps(label_stats, indent=1))
        for path in figures.iterdir():
            mlflow.log_artifact(str(path), "figures")
        mlflow.log_artifacts(str(target), "controller")
        mlflow.log_table(pd.DataFrame(summary_rows(baselines), columns=list(SUMMARY_COLUMNS)), SUMMARY_TABLE)
        # the winner's validation metrics under the names its trial run uses: parent and trials chart together
        learned = baselines["learned"]
        tracking.log_metrics(mlflow.MlflowClient(), mlflow.active_run().info.run_id, {
            **{f"score/{tracking.budget_key(b)}": v for b, v in learned["by_budget"].items() if v is not None},
            **{f"bytes_fraction/{tracking.budget_key(b)}": v for b, v in learned["bytes_fraction"].items()
               if v is not None}})
        summary = {"controller": str(target.resolve()), "registered_model": self.registered_model,
                   "model_version": None, "alias": tracking.CHAMPION, "champion_moved": False,
                   "figures": str(figures.resolve())}
        if self.config.register and not self.config.smoke_test:
            from adaptive_kv.policies.controller.registry import bind_registered_model

            bind_registered_model(self.registered_model, self.base_model)  # another model's registered model refuses
            decision = self._champion_decision(target, worker, self._reading(trial_config))
            self.log(decision.reason)
            card = tracking.VersionCard(
                trial_number=best.number, trial_run_id=self.runs.run_id(best),
                parent_run_id=mlflow.active_run().info.run_id, base_model=self.config.model,
                base_model_revision=f"sha256:{self.model_sha}", validation=dict(learned["by_budget"]),
                params=trial_params(best), git_commit=tracking.source_commit())
            version = tracking.register_controller(target, tracking.example_input(_example_stats(config), budget),
                                                   make_champion=decision.move, card=card, name=self.registered_model)
            summary.update(model_version=version, champion_moved=decision.move, champion_reason=decision.reason,
                           candidate_score=decision.candidate_score, champion_score=decision.champion_score)
        return summary

    def _save_controller(self, best) -> Path:
        """Copy the best trial's folder (and the scorer) to <output>/controller; its path."""
        source, target = self.out / "trials" / str(best.number), self.out / "controller"

        def fill(folder: Path) -> None:
            shutil.copytree(source, folder, dirs_exist_ok=True)
            if self.config.scorer is not None:
                self._add_scorer(folder)

        return atomic.write_folder(target, fill)  # the previous controller stays until the new one is complete

    def untracked_end(self, best, uri: str, error: BaseException) -> dict[str, Any]:
        """The end of a run whose tracking server is unreachable: the controller saved, a summary that says
        what is missing from MLflow and how it gets there (the same command again, which resumes)."""
        from adaptive_kv.training import tracking

        target = self._save_controller(best).resolve()
        registers = self.config.register and not self.config.smoke_test
        message = (f"MLflow at {uri} is unreachable at the end of training ({type(error).__name__}); the controller "
                   f"is saved at {target}. Rerun the same command (same --output and --study) when the server is back: "
                   f"it runs no new trial, logs the pending trial runs"
                   + (f" and registers the controller as {self.registered_model}." if registers else "."))
        self.log(message)
        figures = self.out / "figures"
        return {"controller": str(target), "registered_model": self.registered_model, "model_version": None,
                "alias": tracking.CHAMPION, "champion_moved": False,
                "figures": str(figures.resolve()) if figures.is_dir() else None, "tracking_pending": message}

    @property
    def registered_model(self) -> str:
        """The registered model of this base model's controllers (one per base model: `registered_model_name`)."""
        from adaptive_kv.policies.controller.registry import registered_model_name

        return registered_model_name(self.base_model)

    def _trial_results(self) -> dict[int, dict[str, Any]]:
        """Every intact trial folder's validation results (metrics.json) by trial number, for the Pareto plot."""
        out = {}
        for folder in (self.out / "trials").iterdir():
            try:
                out[int(folder.name)] = json.loads((folder / "metrics.json").read_text())
            except (ValueError, OSError):  # a temporary or damaged folder: not a point
                continue
        return out

    def log_search(self, study) -> None:
        """The search itself on the parent run: Optuna's plots and trials table, and the calibration and
        validation requests as dataset inputs (`study_report`)."""
        from adaptive_kv.training import study_report

        study_report.log_requests(self.train_requests, self.valid_requests, Path(self.config.model).name)
        study_report.log_study(study, self.log)

    def _champion_decision(self, target: Path, worker, trial_config) -> "ChampionDecision":
        """Whether the controller in `target` should become @champion: it beats the current champion on this
        run's validation requests and budgets (both scored on one worker, same prefills), or force_champion."""
        from adaptive_kv.training import tracking

        candidate = self.ray.get(worker.score_controller.remote(_folder_files(target), self.valid_requests,
                                                                trial_config, self.config.budgets))["score"]
        current = tracking.champion_folder(self.registered_model)
        if current is None:
            return ChampionDecision(True, candidate, None, "no champion yet: the new controller becomes @champion")
        try:
            champion = self.ray.get(worker.score_controller.remote(_folder_files(current), self.valid_requests,
                                                                   trial_config, self.config.budgets))["score"]
        except Exception as exc:  # noqa: BLE001  e.g. a champion of another model's shape
            if self.config.force_champion:
                return ChampionDecision(True, candidate, None, f"@champion moved (--force); it could not be scored: {exc}")
            return ChampionDecision(False, candidate, None, f"@champion kept: it cannot be scored on these validation "
                                                            f"requests ({exc}); pass --force to replace it")
        if candidate > champion or self.config.force_champion:
            how = "beats" if candidate > champion else "does not beat, moved anyway (--force)"
            return ChampionDecision(True, candidate, champion, f"@champion moved: new controller {how} it "
                                                               f"({candidate:.2f} vs {champion:.2f})")
        return ChampionDecision(False, candidate, champion, f"@champion kept: new controller {candidate:.2f} does not "
                                                            f"beat it ({champion:.2f}); pass --force to move it")


@dataclass(frozen=True)
class ChampionDecision:
    """Whether @champion moves to the new controller, the two validation scores and why."""

    move: bool
    candidate_score: float
    champion_score: float | None
    reason: str


def _folder_files(folder: Path) -> dict[str, bytes]:
    """A controller folder's files by name (sent to a worker, which may run on another machine)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def _base_model(model, config: TrainConfig) -> ModelIdentity:
    """The identity of the model trained for (recorded in the controller, names its registered model); ValueError
    before any work for a scorer fitted for another model."""
    from adaptive_kv.predicted_reconstruction import load_predictor

    identity = ModelIdentity.of(model.config, config.model)
    if config.scorer is not None:
        load_predictor(config.scorer).check_model(model.config)
    return identity


def _fit_scorer(config: TrainConfig, log) -> str:
    """Run the `train-scorer` step for this training's model, workers, task mix and tracking; its folder."""
    from adaptive_kv.training.scorer_train import ScorerTrainConfig, run_train_scorer

    step = ScorerTrainConfig(model=config.model, tasks=config.tasks, context_lengths=config.context_lengths,
                             workers=config.workers,
                             ray_address=config.ray_address, mlflow_uri=config.mlflow_uri,
                             output=str(Path(config.output) / "scorer_step"))
    return run_train_scorer(step, log=log)["scorer"]


def _check_scorer_shape(scorer: str, config) -> None:
    """Raise ValueError unless the scorer was fitted for the controller's model shape."""
    from adaptive_kv.predicted_reconstruction import load_predictor

    shape, model = load_predictor(scorer).shape, config.model_shape
    if (shape.num_layers, shape.num_kv_heads) != (model["num_layers"], model["num_kv_heads"]):
        raise ValueError(f"scorer {scorer} was fitted for {shape}, the controller's model has {model}")


def _one_per_task(plans: dict[str, str]) -> dict[str, str]:
    """One example plan per (task, protocol)."""
    out: dict[str, str] = {}
    for key, plan in plans.items():
        task, protocol = key.split("/")[:2]
        out.setdefault(f"{task} ({protocol.replace('query_', '')})", plan)
    return out


def _label_statistics(labels: dict, config) -> dict[str, Any]:
    """Mean log10 distortion per option and task over the training labels (logged as JSON)."""
    import torch

    out = {}
    for key, (train, _) in labels.items():
        per_task: dict[str, list] = {}
        for item in train:
            per_task.setdefault(item.task, []).append(item.distortion.clamp_min(1e-8).log10().mean((0, 1)))
        out[key] = {task: dict(zip([o.label() for o in config.grid], torch.stack(v).mean(0).tolist()))
                    for task, v in per_task.items() if len(v[0]) == len(config.grid)}
    return out


def _example_stats(config):
    """Zero-feature statistics of the controller's shape, fp32 states (the registered model's input example)."""
    import torch

    from adaptive_kv.stats import AttentionStats

    shape = config.model_shape
    features = torch.zeros(shape["num_layers"], shape["num_kv_heads"], len(config.feature_names))
    return AttentionStats(features, {}, 1024, tuple(config.feature_names), head_dim=shape["head_dim"],
                          dtype_bytes=torch.empty((), dtype=torch.float32).element_size())
