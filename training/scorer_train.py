"""`adaptive-kv train-scorer`: examples on Ray workers -> linear and MLP fits -> held-out metrics -> MLflow.

The examples are calibration contexts (the task generators and natural text, seeds disjoint from
evaluation) at each of `context_lengths`; each worker prefills its contexts once with the exact
reconstruction pass. Both kinds are fitted on growing shares of the training requests (how much
data the scorer needs), and the kind with the best held-out Spearman correlation on all of them
is saved as `OUTPUT/scorer` (scorer.json + scorer.safetensors, with the context lengths it saw),
with the metrics in MLflow: per layer as a metric stepped by layer index, the learning curve
stepped by training requests.
Each example is kept in `OUTPUT/examples` as soon as it is made (`example_cache`): a stopped
collection resumes, and a rerun with more lengths or contexts computes only the new ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adaptive_kv.model_identity import ModelIdentity
from adaptive_kv.predicted_reconstruction import FittedLengths
from adaptive_kv.training import example_cache, label_cache
from adaptive_kv.training.calibration import DEFAULT_MIX, MAX_CONTEXT, MIN_CONTEXT, make_split
from adaptive_kv.training.scorer import KINDS, FitOptions

SCORER_EXPERIMENT = "adaptive-kv-scorer"


@dataclass(frozen=True)
class ScorerTrainConfig:
    """Everything `train-scorer` takes; validated before anything starts."""

    model: str = "smollm2-135m"
    tasks: tuple[str, ...] = DEFAULT_MIX
    context_lengths: tuple[int, ...] = (1024, 2048)
    # one count for every length, or one per length (long contexts cost the most exact-pass time)
    train_per_task: int | tuple[int, ...] = 2
    valid_per_task: int = 1
    sample_tokens: int = 512  # tokens per training context and layer
    valid_tokens: int = 1024  # tokens per held-out context and layer
    kinds: tuple[str, ...] = KINDS
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    workers: int = 2
    ray_address: str | None = None
    mlflow_uri: str | None = None
    output: str = "outputs/scorer"
    fit: FitOptions = field(default_factory=FitOptions)

    def __post_init__(self) -> None:
        for name in ("valid_per_task", "sample_tokens", "valid_tokens", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.context_lengths or any(not MIN_CONTEXT <= n <= MAX_CONTEXT for n in self.context_lengths):
            raise ValueError(f"context_lengths must be in [{MIN_CONTEXT}, {MAX_CONTEXT}], got {self.context_lengths}")
        counts = self.train_counts()
        if len(counts) != len(self.context_lengths) or any(not isinstance(n, int) or n < 1 for n in counts):
            raise ValueError(f"train_per_task must be an integer >= 1 or one per context length "
                             f"({len(self.context_lengths)}), got {self.train_per_task!r}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if not self.kinds or unknown:
            raise ValueError(f"kinds must be among {KINDS}, got {self.kinds}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise ValueError(f"fractions must be in (0, 1] and include 1.0, got {self.fractions}")

    def train_counts(self) -> tuple[int, ...]:
        """Training contexts per task at each of `context_lengths`."""
        if isinstance(self.train_per_task, tuple):
            return self.train_per_task
        return (self.train_per_task,) * len(self.context_lengths)

    def requests(self, tokenizer) -> tuple[list, list]:
        """Training and held-out calibration requests (query-agnostic contexts) at every length, in the
        order of `context_lengths` (a request's place in its list seeds its token draw)."""
        train: list = []
        valid: list = []
        for length, count in zip(self.context_lengths, self.train_counts()):
            more_train, more_valid = make_split(tokenizer, tasks=self.tasks, context_lengths=(length,),
                                                train_per_task=count, valid_per_task=self.valid_per_task,
                                                protocols=("query_agnostic",))
            train += more_train
            valid += more_valid
        return train, valid


def run_train_scorer(config: ScorerTrainConfig, log=print) -> dict[str, Any]:
    """Run the whole step; returns a summary (chosen kind, its metrics, the scorer folder, the MLflow run)."""
    import mlflow
    import ray as _ray  # fails early with a clear ImportError if the train extra is missing

    from adaptive_kv.models import load_model
    from adaptive_kv.training import search, tracking

    start = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(config.model)
    base_model = ModelIdentity.of(model.config, config.model)  # recorded in the scorer: refused on other models
    model_sha = label_cache.model_digest(model)  # the example cache's key reads the weights themselves
    del model
    train_requests, valid_requests = config.requests(tokenizer)
    owns_ray = not _ray.is_initialized()
    ray = search.start_ray(config.ray_address, config.workers)
    workers = search.make_workers(ray, config.model, config.workers)
    try:
        cache = _ExampleCache(out / "examples", model_sha)
        train = _examples(ray, workers, train_requests, config.sample_tokens, cache)
        valid = _examples(ray, workers, valid_requests, config.valid_tokens, cache)
        shape = ray.get(workers[0].predictor_shape.remote())
    finally:
        for worker in workers:
            ray.kill(worker)
        if owns_ray:
            ray.shutdown()
    collect_s = time.perf_counter() - start
    uri = tracking.tracking_uri(config.mlflow_uri)
    tracking.use_experiment(SCORER_EXPERIMENT, uri)  # artifacts beside a local store, opens on its runs
    with mlflow.start_run(run_name=f"scorer-{Path(config.model).name}") as run:
        mlflow.log_params(tracking.json_params({k: v for k, v in asdict(config).items() if k not in ("fit", "mlflow_uri")}))
        mlflow.log_params(tracking.json_params({f"fit.{k}": v for k, v in asdict(config.fit).items()}))
        mlflow.log_metric("collect_s", collect_s)
        chosen, results = _fit_all(config, shape, train, valid)
        # the lengths it saw: plans from its scores at other lengths say they are extrapolated
        fitted = FittedLengths.of([len(r.context_ids) for r in train_requests + valid_requests])
        folder = replace(results[chosen]["predictor"], base_model=base_model, fitted_lengths=fitted).save(out / "scorer")
        mlflow.log_artifacts(str(folder), "scorer")
        summary = {
            "kind": chosen, "scorer": str(folder.resolve()), "run_id": run.info.run_id, "tracking_uri": uri,
            "ui": tracking.ui_command(uri), "train_requests": len(train), "valid_requests": len(valid),
            "by_kind": {k: {key: v for key, v in r.items() if key != "predictor"} for k, r in results.items()},
            "collect_s": round(collect_s, 1), "examples_reused": cache.reused,
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        mlflow.log_dict(summary, "summary.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"scorer: {chosen}, held-out Spearman {summary['by_kind'][chosen]['mean']['spearman']:.3f} -> {folder}")
    return summary


@dataclass
class _ExampleCache:
    """Where examples are kept between runs (`example_cache`), and how many this run read from there."""

    folder: Path
    model_sha: str
    reused: int = 0


def _examples(ray, workers, requests, sample_tokens: int, cache: _ExampleCache) -> list:
    """Every request's example: read from the cache where it is there, else computed over the workers (one
    request per task) and stored as soon as it is done, so a stopped run keeps every example it finished."""
    from tqdm import tqdm

    keys = [example_cache.example_key(cache.model_sha, r, sample_tokens, i) for i, r in enumerate(requests)]
    out = [example_cache.load(cache.folder, key, r.key) for key, r in zip(keys, requests)]
    missing = [i for i, example in enumerate(out) if example is None]
    cache.reused += len(requests) - len(missing)
    pending = {workers[n % len(workers)].scorer_example.remote(requests[i], sample_tokens, i): i
               for n, i in enumerate(missing)}
    with tqdm(total=len(requests), initial=len(requests) - len(missing), desc="scorer examples", unit="request") as bar:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done)
            out[index] = ray.get(done)
            example_cache.store(cache.folder, keys[index], out[index])
            bar.update(1)
    return out


def _fit_all(config: ScorerTrainConfig, shape, train: list, valid: list) -> tuple[str, dict[str, Any]]:
    """Fit every kind on every data share, log metrics; the kind with the best held-out Spearman on all data."""
    import mlflow

    from adaptive_kv.training.scorer import fit_predictor, heldout_metrics

    results: dict[str, dict[str, Any]] = {}
    for kind in config.kinds:
        curve = {}
        for fraction in sorted(config.fractions):
            count = max(1, round(fraction * len(train)))
            began = time.perf_counter()
            predictor = fit_predictor(train[::max(1, len(train) // count)][:count], kind, shape, config.fit)
            fit_s = time.perf_counter() - began
            metrics = heldout_metrics(predictor, valid)
            mean = {name: sum(values) / len(values) for name, values in metrics.items()}
            curve[count] = mean
            for name, value in mean.items():
                mlflow.log_metric(f"{kind}/curve/{name}", value, step=count)
        predictor.metrics = {"heldout": metrics, "mean": mean, "train_requests": count, "fit_s": round(fit_s, 2)}
        for name, values in metrics.items():
            for layer, value in enumerate(values):
                mlflow.log_metric(f"{kind}/layer/{name}", value, step=layer)
            mlflow.log_metric(f"{kind}/{name}", mean[name])
        results[kind] = {"predictor": predictor, "mean": mean, "per_layer": metrics, "curve": curve,
                         "fit_s": round(fit_s, 2)}
    chosen = max(results, key=lambda k: results[k]["mean"]["spearman"])
    mlflow.set_tag("chosen_kind", chosen)
    return chosen, results
