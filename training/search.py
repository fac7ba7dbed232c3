"""Optuna search space and study, and Ray glue (thin adapters; the objective lives in objective.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from adaptive_kv.training.fit import FitConfig
from adaptive_kv.training.objective import TrialConfig


@dataclass(frozen=True)
class SearchSpace:
    """Choices per searched knob; a knob with one choice is fixed."""

    hidden: tuple[int, ...] = (32, 64, 128)
    layers: tuple[int, ...] = (1, 2, 3)
    lr: tuple[float, float] = (1e-3, 1e-2)
    epochs: tuple[int, int] = (30, 120)
    loss: tuple[str, ...] = ("mse", "huber")
    layer_weight_slope: tuple[float, float] = (-1.5, 1.5)  # < 0: later layers (where retrieval heads sit) weigh more
    length_weight: tuple[float, float] = (-1.0, 1.0)  # searched only when training spans several lengths
    sink_tokens: tuple[int, ...] = (4,)
    recent_window: tuple[int, ...] = (16, 32)
    scorer: tuple[str, ...] = ("reconstruction", "snapkv")
    selection: tuple[str, ...] = ("per_head", "shared")
    grid: tuple[str, ...] = ("global", "default")
    label_rows: tuple[str, ...] = ("answer",)
    label_error: tuple[str, ...] = ("residual",)

    @classmethod
    def network(cls) -> "SearchSpace":
        """The cache layout fixed at its measured best (reconstruction scores, per-head, window 32, the
        grid with global options): one label set, so every trial costs a fit and a validation only."""
        return cls(recent_window=(32,), scorer=("reconstruction",), selection=("per_head",), grid=("global",))

    @classmethod
    def network_and_selection(cls) -> "SearchSpace":
        """'network' plus per-head vs shared token selection (two label sets)."""
        return cls(recent_window=(32,), scorer=("reconstruction",), grid=("global",))

    @classmethod
    def named(cls, name: str) -> "SearchSpace":
        """'network' (layout fixed), 'selection' (network + selection), 'full' (layout searched too:
        a label set per layout) or 'smoke'."""
        spaces = {"network": cls.network, "selection": cls.network_and_selection, "full": cls, "smoke": cls.smoke}
        if name not in spaces:
            raise ValueError(f"search space must be one of {tuple(spaces)}, got {name!r}")
        return spaces[name]()

    @classmethod
    def smoke(cls) -> "SearchSpace":
        """A space whose every trial shares one label set (seconds per trial)."""
        return cls(hidden=(16, 32), layers=(1, 2), epochs=(3, 6), recent_window=(8,), scorer=("reconstruction",),
                   selection=("per_head",), grid=("global",))


def suggest(trial, space: SearchSpace, group_size: int, seed: int, several_lengths: bool = False) -> TrialConfig:
    """A TrialConfig from an Optuna trial (suggestions only); how requests of different lengths weigh in the
    fit is searched when the training requests have `several_lengths`."""
    pick = lambda name, choices: choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))  # noqa: E731
    fit = FitConfig(
        epochs=trial.suggest_int("epochs", *space.epochs),
        lr=trial.suggest_float("lr", *space.lr, log=True),
        loss=pick("loss", space.loss),
        seed=seed,
        length_weight=trial.suggest_float("length_weight", *space.length_weight) if several_lengths else 0.0,
    )
    return TrialConfig(
        sink_tokens=pick("sink_tokens", space.sink_tokens),
        recent_window=pick("recent_window", space.recent_window),
        group_size=group_size,
        scorer=pick("scorer", space.scorer),
        selection=pick("selection", space.selection),
        grid=pick("grid", space.grid),
        hidden=pick("hidden", space.hidden),
        layers=pick("layers", space.layers),
        layer_weight_slope=trial.suggest_float("layer_weight_slope", *space.layer_weight_slope),
        label_rows=pick("label_rows", space.label_rows),
        label_error=pick("label_error", space.label_error),
        fit=fit,
    )


def open_study(name: str, storage_url: str, heartbeat_s: int = 20):
    """Create or resume the study, with Optuna heartbeats: a running trial whose trainer has been silent
    for 3 heartbeats (a killed driver) is failed, and its parameters are asked again once
    (RetryFailedTrialCallback); trials that a live trainer keeps beating are left alone.

    Finished trials stay as they are, so rerunning the same command continues the count.
    """
    import optuna
    from optuna.storages import RetryFailedTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                                         failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0))
    optuna.storages.fail_stale_trials(study)
    return study


class TrialHeartbeat:
    """A thread recording an Optuna heartbeat for each trial this trainer runs (labels and trials block
    the driver for minutes; the heartbeat must not)."""

    def __init__(self, study, interval_s: int) -> None:
        import threading

        self.study, self.interval_s = study, interval_s
        self._ids: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial) -> None:
        self.study._storage.record_heartbeat(trial._trial_id)
        with self._lock:
            self._ids.add(trial._trial_id)

    def remove(self, trial) -> None:
        with self._lock:
            self._ids.discard(trial._trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                ids = list(self._ids)
            for trial_id in ids:
                self.study._storage.record_heartbeat(trial_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def finished(study) -> int:
    """Number of completed trials."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def counted(study) -> int:
    """Trials that count toward the target: completed ones and those running now (any trainer's), after
    failing the running trials whose trainer stopped beating."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


def start_ray(address: str | None, workers: int):
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray with `workers` CPUs."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        # address="local": a new single-machine Ray on loopback, never a cluster someone else started here
        ray.init(address="local", num_cpus=workers, include_dashboard=False, runtime_env=env, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    return ray


def make_worker(ray, model_name: str):
    """One TrainingWorker actor on one CPU (not restarted by Ray: `pool.WorkerPool` replaces a dead one)."""
    from adaptive_kv.training.workers import TrainingWorker

    return ray.remote(num_cpus=1)(TrainingWorker).remote(model_name)


def make_workers(ray, model_name: str, count: int):
    """`count` TrainingWorker actors, one CPU each."""
    return [make_worker(ray, model_name) for _ in range(count)]
