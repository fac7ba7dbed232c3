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


def suggest(trial, space: SearchSpace, group_size: int, seed: int) -> TrialConfig:
    """A TrialConfig from an Optuna trial (suggestions only)."""
    pick = lambda name, choices: choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))  # noqa: E731
    fit = FitConfig(
        epochs=trial.suggest_int("epochs", *space.epochs),
        lr=trial.suggest_float("lr", *space.lr, log=True),
        loss=pick("loss", space.loss),
        seed=seed,
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


def open_study(name: str, storage_url: str):
    """Create or resume the study; trials left running by a killed driver are marked failed.

    Finished trials stay as they are, so rerunning the same command continues the count.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(stale._trial_id, state=TrialState.FAIL)
    return study


def finished(study) -> int:
    """Number of completed trials."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


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


def make_workers(ray, model_name: str, count: int):
    """`count` TrainingWorker actors, one CPU each."""
    from adaptive_kv.training.workers import TrainingWorker

    actor = ray.remote(num_cpus=1)(TrainingWorker)
    return [actor.remote(model_name) for _ in range(count)]
