"""Flags of `adaptive-kv train` and `adaptive-kv quickstart` (imported by the CLI; light at import)."""

from __future__ import annotations

import argparse
import json

from adaptive_kv import cli_args


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """Where the work runs and is tracked (shared by `train` and `train-scorer`)."""
    p.add_argument("--workers", type=cli_args.positive, default=2, help="Ray workers (one model copy each)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI, or a folder for a local SQLite store (default: $MLFLOW_TRACKING_URI or ./mlruns)")


def add_train(sub: argparse._SubParsersAction) -> None:
    """Register `train`."""
    p = sub.add_parser("train", help="train the learned controller: labels and Optuna trials on Ray, tracked in MLflow")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--budgets", type=cli_args.budgets, default=None, help="target budgets (default 0.25,0.125,0.0625)")
    p.add_argument("--trials", type=cli_args.positive, default=None, help="finished Optuna trials the study should hold (default 8)")
    _add_cluster_flags(p)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUTPUT/optuna.db)")
    p.add_argument("--study", default="adaptive-kv", help="Optuna study name; rerun with the same name to resume")
    p.add_argument("--output", default="outputs/train", help="folder for labels, trials, the controller and figures")
    p.add_argument("--tasks", type=cli_args.csv, default=None, help="calibration task mix (comma-separated)")
    p.add_argument("--context-lengths", "--context-length", type=cli_args.csv_ints, default=None,
                   help="calibration context lengths in tokens, comma-separated (default 1024): the lengths the "
                        "controller is trained for (outside them, past a small margin, `learned` plans with kvzip's "
                        "allocation and says so in the plan's note)")
    p.add_argument("--train-per-task", type=cli_args.positive, default=None, help="calibration samples per task")
    p.add_argument("--valid-per-task", type=cli_args.positive, default=None, help="validation samples per task")
    p.add_argument("--space", choices=("network", "selection", "full"), default=None,
                   help="search space: network (layout fixed; default), selection (network + per-head vs shared "
                        "selection) or full (layout, scorer, selection, grid too)")
    p.add_argument("--scorer", default=None, help="a reconstruction predictor folder (train-scorer's OUTPUT/scorer) "
                                                "to ship and register with the controller")
    p.add_argument("--fit-scorer", action="store_true", help="fit a reconstruction predictor first (train-scorer's "
                                                               "step) and ship it with the controller")
    p.add_argument("--reconstruction", choices=("exact", "predicted"), default=None,
                   help="train the controller on exact reconstruction scores (default) or on the scorer's "
                        "predictions (no second pass at serving; needs --scorer or --fit-scorer)")
    p.add_argument("--objective", choices=("likelihood", "generated"), default=None,
                   help="how validation requests score a controller: the reference answer's likelihood relative "
                        "to the full cache (default), or the answer generated from the compressed cache, "
                        "scored as eval scores it")
    p.add_argument("--no-register", action="store_true", help="do not register the best controller")
    p.add_argument("--force", action="store_true", help="move @champion to the new controller even when it does "
                                                        "not beat the current champion on the validation requests")
    p.add_argument("--smoke-test", action="store_true", help="a tiny end-to-end run (short contexts, 2 small trials)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)


def train_config(args: argparse.Namespace):
    """The TrainConfig of parsed flags (flags left out keep the defaults, or the smoke test's)."""
    from adaptive_kv.training.train import TrainConfig

    given = dict(model=args.model, budgets=args.budgets, trials=args.trials, workers=args.workers,
                 ray_address=args.ray_address, storage=args.storage, study=args.study, mlflow_uri=args.mlflow_uri,
                 output=args.output, tasks=args.tasks, context_lengths=args.context_lengths,
                 train_per_task=args.train_per_task, valid_per_task=args.valid_per_task, register=not args.no_register,
                 force_champion=args.force or None,
                 scorer=args.scorer, fit_scorer=args.fit_scorer or None, reconstruction=args.reconstruction,
                 objective=args.objective)
    given = {k: v for k, v in given.items() if v is not None}
    if args.space is not None:
        from adaptive_kv.training.search import SearchSpace

        given["space"] = SearchSpace.named(args.space)
    return TrainConfig.smoke(**given) if args.smoke_test else TrainConfig(**given)


def cmd_train(args: argparse.Namespace) -> int:
    """Run `train` and print where everything went."""
    from adaptive_kv.training.train import run_train

    summary = run_train(train_config(args))
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    print(f"best trial {summary['best_trial']}: validation score {summary['best_score']:.1f} ({summary['best_params']})")
    print(f"controller: {summary['controller']}")
    if summary.get("model_version"):
        where = f"@{summary['alias']}" if summary["champion_moved"] else f"/{summary['model_version']}"
        print(f"registered: models:/{summary['registered_model']}{where} (version {summary['model_version']}; "
              f"{summary['champion_reason']})")
    if summary.get("tracking_pending"):  # MLflow was down at the end: what to rerun
        print(summary["tracking_pending"])
    print(f"figures: {summary['figures']}")
    print(f"inspect: {summary['ui']}")
    print(f"wall time: {summary['wall_time_s']} s")
    return 0


def add_train_scorer(sub: argparse._SubParsersAction) -> None:
    """Register `train-scorer`."""
    p = sub.add_parser("train-scorer", help="fit the reconstruction predictor (kvzap, learned scores) on Ray, "
                                            "tracked in MLflow")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--context-lengths", type=cli_args.csv_ints, default=None,
                   help="calibration context lengths in tokens (default 1024,2048)")
    p.add_argument("--tasks", type=cli_args.csv, default=None, help="calibration task mix (comma-separated)")
    p.add_argument("--train-per-task", type=cli_args.csv_ints, default=None,
                   help="training contexts per task and length: one count, or one per context length (e.g. 6,6,6,2)")
    p.add_argument("--valid-per-task", type=cli_args.positive, default=None, help="held-out contexts per task and length")
    p.add_argument("--sample-tokens", type=cli_args.positive, default=None, help="tokens per training context (default 512)")
    p.add_argument("--kinds", type=cli_args.csv, default=None, help="kinds to fit and compare: linear, mlp (default both)")
    p.add_argument("--hidden-only", action="store_true", help="read the hidden states alone, not where each token "
                                                              "sits in the context")
    _add_cluster_flags(p)
    p.add_argument("--output", default="outputs/scorer", help="folder for the scorer and its summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train_scorer)


def _one_or_many(counts: tuple[int, ...] | None) -> int | tuple[int, ...] | None:
    """A single count as an int (the same at every length), several as a tuple (one per length)."""
    return counts[0] if counts is not None and len(counts) == 1 else counts


def cmd_train_scorer(args: argparse.Namespace) -> int:
    """Run `train-scorer` and print where the scorer went."""
    from adaptive_kv.training.scorer import FitOptions
    from adaptive_kv.training.scorer_train import ScorerTrainConfig, run_train_scorer

    given = dict(model=args.model, context_lengths=args.context_lengths, tasks=args.tasks,
                 train_per_task=_one_or_many(args.train_per_task), valid_per_task=args.valid_per_task,
                 sample_tokens=args.sample_tokens, kinds=args.kinds, workers=args.workers,
                 ray_address=args.ray_address, mlflow_uri=args.mlflow_uri, output=args.output,
                 fit=FitOptions(position_features=()) if args.hidden_only else None)
    summary = run_train_scorer(ScorerTrainConfig(**{k: v for k, v in given.items() if v is not None}))
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    for kind, result in summary["by_kind"].items():
        mean = result["mean"]
        print(f"{kind}: held-out Spearman {mean['spearman']:.3f}, top-10% recall {mean['recall_top10']:.3f} "
              f"(fit {result['fit_s']} s)")
    print(f"scorer ({summary['kind']}): {summary['scorer']}")
    print(f"inspect: {summary['ui']}")
    return 0


def add_quickstart(sub: argparse._SubParsersAction) -> None:
    """Register `quickstart`."""
    p = sub.add_parser("quickstart", help="train a controller briefly, then compare it with the static policies")
    p.add_argument("--output", default="outputs/quickstart", help="folder for everything the run writes")
    p.add_argument("--samples", type=cli_args.positive, default=3, help="held-out samples per task and protocol")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The README's main command (see adaptive_kv.training.quickstart)."""
    from adaptive_kv.training.quickstart import run_quickstart

    run_quickstart(args.output, samples=args.samples)
    return 0
