"""The `adaptive-kv train` flow: requests -> labels (Ray) -> Optuna trials (Ray) -> MLflow + registry."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adaptive_kv.training.calibration import CALIBRATION_SEED, DEFAULT_MIX, VALIDATION_SEED, make_requests
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
    context_length: int = 1024
    train_per_task: int = 4
    valid_per_task: int = 2
    group_size: int = 32
    space: SearchSpace = field(default_factory=SearchSpace.network)
    smoke_test: bool = False
    register: bool = True
    # a reconstruction predictor's folder (`train-scorer`): copied beside the controller, so the folder
    # and the registered version carry both (`learned:reconstruction=predicted` reads it)
    scorer: str | None = None
    # fit a scorer first (`train-scorer` on the same workers, contexts and MLflow) and ship that one
    fit_scorer: bool = False
    # what the controller reads its reconstruction features from: "exact" (the second pass) or
    # "predicted" (the shipped scorer, no second pass; needs scorer or fit_scorer)
    reconstruction: str = "exact"

    def __post_init__(self) -> None:
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets must be in (0, 1], got {b}")
        for name in ("trials", "workers", "train_per_task", "valid_per_task", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scorer is not None and self.fit_scorer:
            raise ValueError("give scorer (a fitted scorer's folder) or fit_scorer, not both")
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
        base = dict(trials=2, tasks=("passkey", "fidelity"), context_length=256, train_per_task=1, valid_per_task=1,
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

    start = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    if config.fit_scorer:
        config = replace(config, scorer=_fit_scorer(config, log), fit_scorer=False)
    _, tokenizer = load_model(config.model)
    train_requests = make_requests(tokenizer, tasks=config.tasks, context_length=config.context_length,
                                   per_task=config.train_per_task, seed=CALIBRATION_SEED)
    valid_requests = make_requests(tokenizer, tasks=config.tasks, context_length=config.context_length,
                                   per_task=config.valid_per_task, seed=VALIDATION_SEED)
    study = search.open_study(config.study, config.storage_url())
    uri = tracking.tracking_uri(config.mlflow_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(tracking.TRAIN_EXPERIMENT)
    owns_ray = not _ray.is_initialized()
    ray = search.start_ray(config.ray_address, config.workers)
    workers = search.make_workers(ray, config.model, config.workers)
    pipeline = _Pipeline(config, ray, workers, train_requests, valid_requests, out, log)
    try:
        summary = _run(config, pipeline, study, tracking, uri, start)
    finally:  # actors hold a CPU each: free them, and the Ray this call started
        for worker in workers:
            ray.kill(worker)
        if owns_ray:
            ray.shutdown()
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _run(config: TrainConfig, pipeline: "_Pipeline", study, tracking, uri: str, start: float) -> dict[str, Any]:
    """The MLflow parent run around the trials and the final artifacts."""
    import mlflow
    from tqdm import tqdm

    with mlflow.start_run(run_name=f"train-{Path(config.model).name}") as parent:
        mlflow.log_params({k: v for k, v in asdict(config).items() if k != "space"})
        mlflow.log_dict(asdict(config.space), "search_space.json")
        pipeline.run_trials(study, tqdm)
        best = study.best_trial
        summary = pipeline.finish(best, tracking)
        mlflow.log_metric("best_score", best.value)
        summary.update(parent_run=parent.info.run_id, tracking_uri=uri, ui=tracking.ui_command(uri),
                       best_trial=best.number, best_score=best.value, best_params=best.params,
                       wall_time_s=round(time.perf_counter() - start, 1))
    return summary


class _Pipeline:
    """Driver-side state of one `train`: label sets per layout, trials in flight, MLflow logging."""

    def __init__(self, config, ray, workers, train_requests, valid_requests, out: Path, log) -> None:
        self.config, self.ray, self.workers, self.out, self.log = config, ray, workers, out, log
        self.train_requests, self.valid_requests = train_requests, valid_requests
        self.labels: dict[str, tuple[list, list]] = {}

    # ------------------------------------------------------------------ labels
    def labels_for(self, trial_config, tqdm) -> tuple[list, list]:
        """Train/valid labels of a layout: from disk, else computed in shards over the workers."""
        from adaptive_kv.training.labels import load_labels, save_labels

        key = trial_config.layout_key()
        if key in self.labels:
            return self.labels[key]
        folder = self.out / "labels" / key
        if (folder / "train.safetensors").is_file() and (folder / "valid.safetensors").is_file():
            self.labels[key] = (load_labels(folder / "train.safetensors"), load_labels(folder / "valid.safetensors"))
            return self.labels[key]
        requests = self.train_requests + self.valid_requests
        futures = [self.workers[i % len(self.workers)].labels.remote([r], trial_config) for i, r in enumerate(requests)]
        results = []
        for future in tqdm(futures, desc=f"labels {key}", unit="request"):
            results.extend(self.ray.get(future))
        train, valid = results[: len(self.train_requests)], results[len(self.train_requests) :]
        save_labels(folder / "train.safetensors", train)
        save_labels(folder / "valid.safetensors", valid)
        self.labels[key] = (train, valid)
        return train, valid

    # ------------------------------------------------------------------ trials
    def run_trials(self, study, tqdm) -> None:
        """Ask, run on free workers, tell, until the study holds `trials` finished trials."""
        import mlflow

        from adaptive_kv.training import search, tracking

        from ray.util.queue import Queue

        todo = self.config.trials - search.finished(study)
        bar = tqdm(total=self.config.trials, initial=self.config.trials - max(todo, 0), desc="trials", unit="trial")
        epochs = tqdm(total=0, desc="epochs", unit="epoch")
        progress = Queue(actor_options={"num_cpus": 0})  # no CPU of its own: the workers hold them all
        running: dict[Any, tuple] = {}
        free = list(self.workers)
        while todo > 0 or running:
            while free and todo > 0:
                trial = study.ask()
                trial_config = self._reading(search.suggest(trial, self.config.space, self.config.group_size,
                                                            seed=trial.number))
                train, valid = self.labels_for(trial_config, tqdm)
                worker = free.pop()
                future = worker.trial.remote(trial_config, train, valid, self.valid_requests, self.config.budgets, progress)
                running[future] = (trial, trial_config, worker)
                epochs.total += trial_config.fit.epochs
                epochs.refresh()
                todo -= 1
            done, _ = self.ray.wait(list(running), num_returns=1, timeout=0.5)
            epochs.update(len(progress.get_nowait_batch(progress.qsize())) if progress.qsize() else 0)
            if not done:
                continue
            trial, trial_config, worker = running.pop(done[0])
            free.append(worker)
            try:
                result = self.ray.get(done[0])
            except Exception as exc:  # a failed trial is recorded as failed, the study goes on
                from optuna.trial import TrialState

                study.tell(trial, state=TrialState.FAIL)
                self.log(f"trial {trial.number} failed: {exc}")
                todo += 1
                continue
            self._save_trial(trial.number, result)
            study.tell(trial, result["metrics"]["score"])
            with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
                mlflow.log_params(trial_config.to_params())
                mlflow.log_param("trial_number", trial.number)
                tracking.log_trial_metrics(result["metrics"], result["history"])
            bar.set_postfix(score=f"{result['metrics']['score']:.1f}")
            bar.update(1)
        epochs.close()
        bar.close()

    def _save_trial(self, number: int, result: dict) -> Path:
        from adaptive_kv.policies.controller.files import ControllerConfig, save_controller

        config = ControllerConfig.from_json(result["config"])
        net = config.build()
        net.load_state_dict(result["state"])
        folder = save_controller(self.out / "trials" / str(number), config, net)
        (folder / "metrics.json").write_text(json.dumps(result["metrics"], indent=1, default=str))
        return folder

    def _reading(self, trial_config):
        """The trial with this training's reconstruction source."""
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

        from adaptive_kv.plan import Plan
        from adaptive_kv.policies.controller.files import load_controller
        from adaptive_kv.training.objective import TrialConfig
        from adaptive_kv.training.plots import pareto_png, plan_heatmap_png

        source = self.out / "trials" / str(best.number)
        target = self.out / "controller"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        if self.config.scorer is not None:
            self._add_scorer(target)
        config, net = load_controller(target)
        trial_config = TrialConfig(**config.layout.keywords())
        worker = self.workers[0]
        baselines = self.ray.get(worker.baselines.remote(STATIC_BASELINES, self.valid_requests, trial_config,
                                                         self.config.budgets))
        baselines["learned"] = json.loads((source / "metrics.json").read_text())
        baselines["learned"]["by_budget"] = {float(k): v for k, v in baselines["learned"]["by_budget"].items()}
        baselines["learned"]["bytes_fraction"] = {float(k): v for k, v in baselines["learned"]["bytes_fraction"].items()}
        figures = self.out / "figures"
        figures.mkdir(exist_ok=True)
        (figures / "validation_scores.json").write_text(json.dumps(baselines, indent=1, default=str))
        pareto_png(baselines, figures / "pareto.png", f"{Path(self.config.model).name}: validation, learned vs static")
        budget = sorted(self.config.budgets)[len(self.config.budgets) // 2]
        plans_json = self.ray.get(worker.plans.remote(config.to_json(), {k: v for k, v in net.state_dict().items()},
                                                      self.valid_requests, self._reading(trial_config), budget))
        examples = _one_per_task(plans_json)
        seq_len = self.config.context_length
        plan_heatmap_png({k: Plan.from_json(v) for k, v in examples.items()}, seq_len, figures / "plans.png",
                         f"learned plans at budget {budget:g}")
        label_stats = _label_statistics(self.labels, config)
        (figures / "label_statistics.json").write_text(json.dumps(label_stats, indent=1))
        for path in figures.iterdir():
            mlflow.log_artifact(str(path), "figures")
        mlflow.log_artifacts(str(target), "controller")
        for name, res in baselines.items():
            for b, score in res["by_budget"].items():
                mlflow.log_metric(f"validation/{name}/b{float(b):g}", score)
        version = None
        if self.config.register:
            version = tracking.register_controller(target, tracking.example_input(_example_stats(config), budget))
        return {"controller": str(target.resolve()), "registered_model": tracking.REGISTERED_MODEL,
                "model_version": version, "alias": tracking.CHAMPION, "figures": str(figures.resolve())}


def _fit_scorer(config: TrainConfig, log) -> str:
    """Run the `train-scorer` step for this training's model, workers, task mix and tracking; its folder."""
    from adaptive_kv.training.scorer_train import ScorerTrainConfig, run_train_scorer

    lengths = (config.context_length,) if config.smoke_test else ScorerTrainConfig().context_lengths
    step = ScorerTrainConfig(model=config.model, tasks=config.tasks, context_lengths=lengths, workers=config.workers,
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
