"""Issue 26: the MLflow UI tells the training story. One real `train` (tiny model, local Ray, SQLite Optuna,
a SQLite MLflow store in the test's tmp dir, 2 trials, registered) read back through MlflowClient: the
experiment's kind, the parent's winner and hyper-parameters, the summary table, the figures, each trial's run
(true duration, one metric naming pattern, JSON parameters) and the champion's link to its trial."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_training import _config, ray_local, tiny_model_dir  # noqa: F401  (fixtures)

# one pattern: <quantity>[/b<budget>[/<task>]] for scores and bytes, <loss>/<loss function> for losses
METRIC_NAME = re.compile(r"^((score|bytes_fraction)(/b[0-9.e-]+(/[a-z_]+)?)?|(train|valid)_loss/(mse|huber))$")


def _value(text: str):
    """A parameter as logged: JSON for numbers, lists and null; a string as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.fixture(scope="module")
def story(tiny_model_dir, ray_local, tmp_path_factory):  # noqa: F811
    """One registered training run; its summary, the store's client and the Optuna study."""
    import optuna
    from mlflow import MlflowClient

    from adaptive_kv.training.train import run_train

    import mlflow

    out = tmp_path_factory.mktemp("story")
    mlflow.set_system_metrics_sampling_interval(1)  # MLflow's 10 s would sample nothing in this short run
    try:
        summary = run_train(_config(tiny_model_dir, out, smoke_test=False), log=lambda *a: None)
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
    uri = f"sqlite:///{out}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["parent_run"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    study = optuna.load_study(study_name="adaptive-kv", storage=f"sqlite:///{(out / 'optuna.db').resolve()}")
    return SimpleNamespace(summary=summary, uri=uri, client=client, parent=parent, out=out, study=study,
                           model=str(tiny_model_dir),
                           children={int(c.data.params["trial_number"]): c for c in children})


def test_the_experiment_opens_on_its_training_runs_and_keeps_artifacts_beside_the_store(story):
    experiment = story.client.get_experiment(story.parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith((story.out / "artifacts").as_uri())


def test_the_parent_run_names_the_winner_with_its_hyper_parameters(story):
    params, best = story.parent.data.params, story.study.best_trial
    assert params["best_trial"] == str(best.number) == str(story.summary["best_trial"])
    for name, value in best.params.items():  # the searched knobs, under the names Optuna gives them
        assert _value(params[f"best/{name}"]) == (pytest.approx(value) if isinstance(value, float) else value)
    assert params["best/hidden"] == str(best.params["hidden"]) and params["best/scorer_path"] == "null"
    assert json.loads(params["budgets"]) == [0.5, 0.25] and params["ray_address"] == "null"  # JSON, not reprs
    tagged = [n for n, run in story.children.items() if run.data.tags.get("best_trial") == "true"]
    assert tagged == [best.number]
    assert story.parent.data.tags["best_trial_run_id"] == story.children[best.number].info.run_id


def test_the_parent_run_holds_the_summary_table_and_the_figures(story):
    import mlflow

    mlflow.set_tracking_uri(story.uri)
    table = mlflow.load_table("validation_summary.json", run_ids=[story.parent.info.run_id])
    assert {"learned", "kvzip", "snapkv", "kivi"} <= set(table["policy"])
    assert set(table["budget"]) == {0.5, 0.25} and {"all", "passkey", "fidelity"} <= set(table["task"])
    learned = table[(table["policy"] == "learned") & (table["task"] == "all")].set_index("budget")
    winner = story.children[story.summary["best_trial"]].data.metrics
    for budget in (0.5, 0.25):  # the winner's trial scored the same validation requests
        assert learned.loc[budget, "score"] == pytest.approx(winner[f"score/b{budget:g}"], abs=0.01)
        assert learned.loc[budget, "ci95_low"] <= learned.loc[budget, "score"] <= learned.loc[budget, "ci95_high"]
        assert 0 < learned.loc[budget, "bytes_fraction"] <= budget
    figures = {a.path for a in story.client.list_artifacts(story.parent.info.run_id, "figures")}
    assert {"figures/pareto.png", "figures/plans.png"} <= figures
    assert story.parent.data.metrics["score/b0.5"] == pytest.approx(winner["score/b0.5"])


def test_the_parent_run_shows_the_search_and_the_requests_it_learned_from(story):
    import pandas as pd

    run_id = story.parent.info.run_id
    optuna_files = {a.path for a in story.client.list_artifacts(run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/parallel_coordinate.png", "optuna/slice.png",
            "optuna/trials.csv"} <= optuna_files
    local = story.client.download_artifacts(run_id, "optuna/trials.csv", str(story.out / "read-back"))
    trials = pd.read_csv(local)
    assert sorted(trials["number"]) == sorted(story.children) and "params_lr" in trials.columns
    inputs = {i.tags[0].value: i.dataset for i in story.client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    schema = json.loads(inputs["training"].schema)["mlflow_colspec"]
    assert {"task", "protocol", "seed", "context_tokens"} <= {column["name"] for column in schema}
    assert json.loads(inputs["training"].profile)["num_rows"] == 3  # passkey x 2 protocols + fidelity
    assert any(name.startswith("system/") for name in story.parent.data.metrics)


def test_each_trial_run_spans_its_trial_and_logs_its_files_metrics_and_json_parameters(story):
    from optuna.trial import TrialState

    trials = {t.number: t for t in story.study.get_trials(states=(TrialState.COMPLETE,))}
    assert set(story.children) == set(trials)
    for number, run in story.children.items():
        trial = trials[number]
        completed_ms = trial.datetime_complete.timestamp() * 1000
        # opened as the trial started (before Optuna was told its value), closed after
        assert run.info.start_time < completed_ms - 100 <= run.info.end_time and run.info.status == "FINISHED"
        assert all(METRIC_NAME.match(name) for name in run.data.metrics), sorted(run.data.metrics)
        loss = trial.params.get("loss", "huber")
        assert len(story.client.get_metric_history(run.info.run_id, f"train_loss/{loss}")) == trial.params["epochs"]
        assert {"score/b0.5", "score/b0.5/passkey", "bytes_fraction/b0.25"} <= set(run.data.metrics)
        for name, value in trial.params.items():  # parameter names are the search space's
            assert _value(run.data.params[name]) == (pytest.approx(value) if isinstance(value, float) else value)
        files = {a.path for a in story.client.list_artifacts(run.info.run_id)}
        controller = {a.path for a in story.client.list_artifacts(run.info.run_id, "controller")}
        assert "metrics.json" in files
        # exactly the controller's files: the registered pyfunc (MLflow lists it by its name) stays apart
        assert controller == {"controller/controller.json", "controller/controller.safetensors"}


def test_the_champion_version_links_to_its_trial_and_describes_itself(story):
    import mlflow
    from mlflow.models import Model

    name = story.summary["registered_model"]
    version = story.client.get_model_version_by_alias(name, "champion")
    best = story.summary["best_trial"]
    assert version.run_id == story.children[best].info.run_id  # the UI's source-run link opens the trial
    tags = version.tags
    assert tags["trial_number"] == str(best) and tags["base_model"] == story.model
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", tags["base_model_revision"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert tags["git_commit"] == head
    winner = story.children[best].data.metrics
    assert float(tags["validation_score/b0.25"]) == pytest.approx(winner["score/b0.25"], abs=0.01)
    assert f"trial {best}" in version.description
    # installable requirements (no pin of the unpublished adaptive-kv) and an input example
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                     tracking_uri=story.uri))
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert not [r for r in requirements if r.startswith("adaptive-kv")] and any(r.startswith("torch") for r in requirements)
    assert (local / "code" / "adaptive_kv" / "policies" / "learned.py").is_file()  # the code travels with it
    assert Model.load(str(local)).load_input_example(str(local)) is not None


def test_trial_metrics_leave_out_what_the_controller_could_not_plan():
    from adaptive_kv.training.tracking import trial_metrics

    metrics = {"score": 40.0, "by_budget": {0.5: 80.0, 0.0625: None}, "bytes_fraction": {0.5: 0.49, 0.0625: None},
               "by_task": {"passkey/0.5": 80.0}}
    names = trial_metrics(metrics, [(0, 1.0, float("nan"))], "mse")
    assert set(names) == {"train_loss/mse", "score", "score/b0.5", "bytes_fraction/b0.5", "score/b0.5/passkey"}


def test_evaluate_policy_reports_an_infeasible_budget_as_absent_and_the_objective_as_zero(monkeypatch):
    from adaptive_kv.training import objective

    monkeypatch.setattr(objective, "score_plan", lambda model, item, plan: 60.0)
    plan = SimpleNamespace(nbytes=lambda *a: 50, full_nbytes=lambda *a: 100)

    def plan_for(stats, budget):
        if budget < 0.1:
            raise ValueError("below the minimum")
        return plan

    stats = SimpleNamespace(seq_len=10, head_dim=4, dtype_bytes=4)
    items = [SimpleNamespace(captured=SimpleNamespace(stats=stats), request=SimpleNamespace(task="passkey"))] * 2
    result = objective.evaluate_policy(None, items, plan_for, (0.5, 0.05))
    assert result["by_budget"] == {0.5: 60.0, 0.05: None} and result["infeasible"] == {0.5: 0, 0.05: 2}
    assert result["score"] == 30.0  # the search still counts an infeasible request as 0
    assert result["bytes_fraction"] == {0.5: 0.5, 0.05: None} and result["by_task"] == {"passkey/0.5": 60.0}


def test_pareto_points_per_task_use_that_tasks_bytes_and_skip_unreached_budgets():
    from adaptive_kv.training.plots import ALL_TASKS, _points

    result = {"by_budget": {0.5: 70.0, 0.25: None}, "bytes_fraction": {0.5: 0.45, 0.25: None},
              "by_task": {"passkey/0.5": 80.0}, "sample_bytes": {"passkey/0.5": [0.4, 0.42]}}
    assert _points(result, ALL_TASKS) == [(0.45, 70.0)]
    assert _points(result, "passkey") == [(pytest.approx(0.41), 80.0)]


def test_a_plan_heat_map_row_names_the_bytes_its_plan_uses():
    from adaptive_kv.plan import Plan
    from adaptive_kv.training.plots import plan_bytes_label

    plan = Plan.uniform(2, 2, keep=64, key_bits=4, value_bits=2, sink_tokens=4, recent_window=8, group_size=16)
    used, full = plan.nbytes(256, 16, 4), plan.full_nbytes(256, 16, 4)
    assert plan_bytes_label(plan, 256, 16, 4) == f" | {used / 1024:.1f} KiB = {used / full:.1%} of full"
    assert plan_bytes_label(plan, 256, None, None) == ""
