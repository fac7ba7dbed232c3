"""What the training's parent run shows about the search itself (issue 26, item 4): Optuna's own plots, the
study's trials table, and the requests the controller learned from and was validated on, as MLflow datasets.

Logged into the active MLflow run; Optuna and pandas are imported only here, when a training ends.
"""

from __future__ import annotations

from typing import Any, Callable

from adaptive_kv.training.calibration import CalibrationRequest

# artifact name -> optuna.visualization.matplotlib function
OPTUNA_PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "slice": "plot_slice",
}
OPTUNA_FOLDER = "optuna"
TRIALS_TABLE = f"{OPTUNA_FOLDER}/trials.csv"
# dataset name -> MLflow input context
DATASETS = {"calibration": "training", "validation": "validation"}


def log_study(study, log: Callable[[str], Any] = print) -> list[str]:
    """Optuna's plots of `study` as optuna/<name>.png and `study.trials_dataframe()` as optuna/trials.csv in the
    active run; returns the plots logged. A plot Optuna cannot draw for this study (parameter importances
    need two finished trials and a searched parameter that varies) is skipped with a message, not an error."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import optuna.visualization.matplotlib as vis

    logged = []
    for name, function in OPTUNA_PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                axes = getattr(vis, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            log(f"optuna {name} plot skipped: {exc}")
            continue
        figure = _figure_of(axes)
        figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
        mlflow.log_figure(figure, f"{OPTUNA_FOLDER}/{name}.png")
        plt.close(figure)
        logged.append(name)
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), TRIALS_TABLE)
    return logged


def _figure_of(axes):
    """The figure of what an Optuna matplotlib plot returns (one Axes, or an array of them)."""
    import numpy as np

    return np.ravel(np.asarray(axes, dtype=object))[0].figure if not hasattr(axes, "figure") else axes.figure


def request_rows(requests: list[CalibrationRequest]) -> list[dict[str, Any]]:
    """One row per request: task, protocol, seed, sample index and its token counts."""
    return [{"task": r.task, "protocol": r.protocol, "seed": r.seed, "index": r.index,
             "context_tokens": len(r.context_ids), "follow_tokens": len(r.follow_ids),
             "answer_tokens": r.answer_tokens} for r in requests]


def log_requests(train: list[CalibrationRequest], valid: list[CalibrationRequest], model: str) -> None:
    """The calibration (training) and validation requests as MLflow dataset inputs of the active run: the UI
    lists them on the run with their tasks, context lengths, seeds and counts, and their digests tell two
    trainings on the same requests apart from two on different ones."""
    import mlflow
    import pandas as pd

    for (name, context), requests in zip(DATASETS.items(), (train, valid)):
        frame = pd.DataFrame(request_rows(requests))
        dataset = mlflow.data.from_pandas(frame, name=f"{name} ({model})")
        mlflow.log_input(dataset, context=context)
