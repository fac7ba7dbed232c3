"""`train` under real faults (issue 24, items 5-8): a Ray worker killed mid-trial, workers that keep dying,
label and trial files damaged on disk, a rerun with other requests in the same output folder, a second
trainer on the same Optuna study, and the @champion alias of repeated runs. Real local Ray, SQLite
Optuna and MLflow stores, a tiny model saved as a local HF folder (fixtures of test_training)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import build_tiny_model
from test_training import _config, ray_local, tiny_model_dir  # noqa: F401  (fixtures)


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail the test instead of hanging when `train` loops forever."""
    def expire(*_):
        raise TimeoutError(f"train did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _WorkerKiller:
    """SIGKILLs this test's own Ray worker processes whose title names `target` (by default those running
    `TrainingWorker.trial`; found among this process's descendants, so no other Ray on the machine is
    touched): the first one, or every one."""

    def __init__(self, every: bool, target: str = "TrainingWorker.trial") -> None:
        self.every, self.target, self.killed = every, target, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "_WorkerKiller":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for process in me.children(recursive=True):
                try:
                    running_target = self.target in " ".join(process.cmdline())
                except psutil.Error:
                    continue
                if running_target and process.pid not in self.killed:
                    os.kill(process.pid, signal.SIGKILL)
                    self.killed.append(process.pid)
                    if not self.every:
                        return
            time.sleep(0.05)


def _study(tmp_path, name: str = "adaptive-kv"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")


# ------------------------------------------------------------------------------ item 5: dead workers
def test_a_worker_killed_mid_trial_is_replaced_and_training_finishes(tiny_model_dir, tmp_path, ray_local):
    from optuna.trial import TrialState

    from adaptive_kv.training.train import run_train

    logs: list[str] = []
    with _deadline(300), _WorkerKiller(every=False) as killer:
        summary = run_train(_config(tiny_model_dir, tmp_path, trials=3, register=False), log=logs.append)
    assert len(killer.killed) == 1  # the fault really happened
    states = [t.state for t in _study(tmp_path).trials]
    assert states.count(TrialState.COMPLETE) == 3  # the killed trial was asked again: nothing lost
    assert states.count(TrialState.FAIL) == 1
    assert any("ActorDiedError" in line or "actor" in line.lower() for line in logs if "failed" in line)
    assert Path(summary["controller"], "controller.safetensors").is_file()


def test_a_dead_progress_queue_neither_fails_trials_nor_stops_training(tiny_model_dir, tmp_path, ray_local):
    """The epoch bar's Ray queue actor killed (as an out-of-memory kill takes it with the workers)."""
    from optuna.trial import TrialState

    from adaptive_kv.training.train import run_train

    logs: list[str] = []
    with _deadline(300), _WorkerKiller(every=False, target="_QueueActor") as killer:
        summary = run_train(_config(tiny_model_dir, tmp_path, trials=3, register=False), log=logs.append)
    assert len(killer.killed) == 1  # the fault really happened
    assert [t.state for t in _study(tmp_path).trials] == [TrialState.COMPLETE] * 3  # no trial failed for it
    assert any("progress queue died" in line for line in logs)
    assert Path(summary["controller"], "controller.safetensors").is_file()


def test_workers_that_keep_dying_stop_training_with_the_error(tiny_model_dir, tmp_path, ray_local):
    from adaptive_kv.training.pool import TrainingFailed
    from adaptive_kv.training.train import run_train

    with _deadline(300), _WorkerKiller(every=True) as killer, \
            pytest.raises(TrainingFailed, match=r"3 tasks failed in a row \(max_consecutive_failures=3\).*Actor"):
        run_train(_config(tiny_model_dir, tmp_path, trials=3, register=False, max_consecutive_failures=3),
                  log=lambda *a: None)
    # two workers run trials side by side, so the trial in flight on the other worker when the third
    # failure stops training may have been killed too; more than that would mean training kept going
    assert 3 <= len(killer.killed) <= 3 + 1


def test_bad_failure_limit_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="max_consecutive_failures must be >= 1, got 0"):
        _config(tiny_model_dir, tmp_path, max_consecutive_failures=0)


# ------------------------------------------------------------------------------ item 7: label cache, atomic writes
def test_label_fingerprint_covers_model_requests_layout_and_counts(tiny_tokenizer_bos):
    from adaptive_kv.training.calibration import CALIBRATION_SEED, make_requests
    from adaptive_kv.training.label_cache import fingerprint, model_digest
    from adaptive_kv.training.objective import TrialConfig

    def requests(tasks=("passkey", "fidelity"), context_length=200, per_task=1):
        made = make_requests(tiny_tokenizer_bos, tasks=tasks, context_length=context_length, per_task=per_task,
                             seed=CALIBRATION_SEED)
        return {"train": made, "valid": made[:1]}

    model = model_digest(build_tiny_model("llama_gqa", seed=0))
    base = fingerprint(model, TrialConfig(), requests())
    assert fingerprint(model_digest(build_tiny_model("llama_gqa", seed=0)), TrialConfig(), requests()) == base
    changed = {
        "model": fingerprint(model_digest(build_tiny_model("llama_gqa", seed=1)), TrialConfig(), requests()),
        "tasks": fingerprint(model, TrialConfig(), requests(tasks=("passkey",))),
        "context length": fingerprint(model, TrialConfig(), requests(context_length=160)),
        "samples": fingerprint(model, TrialConfig(), requests(per_task=2)),
        "layout": fingerprint(model, TrialConfig(recent_window=8), requests()),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed


def test_an_interrupted_write_keeps_the_previous_files(tmp_path):
    from adaptive_kv.training import atomic

    def fill(text):
        def write(folder):
            (folder / "a.txt").write_text(text)
            if text == "new":
                raise KeyboardInterrupt  # killed half way: b.txt never written
            (folder / "b.txt").write_text(text)
        return write

    atomic.write_folder(tmp_path / "controller", fill("old"))
    with pytest.raises(KeyboardInterrupt):
        atomic.write_folder(tmp_path / "controller", fill("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controller"]  # no half folder left beside it
    assert [(tmp_path / "controller" / n).read_text() for n in ("a.txt", "b.txt")] == ["old", "old"]
    atomic.write_text(tmp_path / "x.json", "1")

    def half_then_full_disk(tmp):
        tmp.write_text("{trunc")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_file(tmp_path / "x.json", half_then_full_disk)
    assert (tmp_path / "x.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["controller", "x.json"]


def test_damaged_files_are_redone_and_other_requests_get_their_own_labels(tiny_model_dir, tmp_path, ray_local):
    from optuna.trial import TrialState

    from adaptive_kv.training.labels import load_labels
    from adaptive_kv.training.train import run_train

    quiet = lambda *a: None  # noqa: E731
    run_train(_config(tiny_model_dir, tmp_path, trials=2, register=False), log=quiet)
    (folder,) = [p for p in (tmp_path / "labels").iterdir()]
    best = _study(tmp_path).best_trial.number
    before = [x.distortion.clone() for x in load_labels(folder / "train.safetensors")]  # a copy, not a map of the file
    # a crash mid-write of old: a truncated label file and a truncated controller of the best trial
    for path in (folder / "train.safetensors", tmp_path / "trials" / str(best) / "controller.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    logs: list[str] = []
    summary = run_train(_config(tiny_model_dir, tmp_path, trials=3, register=False), log=logs.append)
    assert summary["best_trial"] != best and any(f"trial {best} skipped as best" in line for line in logs)
    after = load_labels(folder / "train.safetensors")  # recomputed, not read half
    assert len(after) == len(before) and all(torch.equal(a.distortion, b) for a, b in zip(after, before))
    assert [t.state for t in _study(tmp_path).trials].count(TrialState.COMPLETE) == 3
    # the same output folder, other requests (shorter contexts): new labels, not the cached ones
    run_train(_config(tiny_model_dir, tmp_path, trials=1, register=False, context_lengths=(120,), study="short"),
              log=quiet)
    folders = sorted((tmp_path / "labels").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(folders) == 2 and folders[0] == folder
    lengths = {x.seq_len for x in load_labels(folders[1] / "train.safetensors")}
    assert max(lengths) < min(x.seq_len for x in load_labels(folder / "train.safetensors"))


# ------------------------------------------------------------------------------ item 8: @champion
def test_champion_moves_only_for_a_better_controller_or_force_and_never_for_smoke(tiny_model_dir, tmp_path, ray_local):
    from mlflow import MlflowClient

    from adaptive_kv.training.train import run_train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = lambda out, **kw: run_train(_config(tiny_model_dir, tmp_path / out, mlflow_uri=uri, trials=1, **kw),  # noqa: E731
                                      log=lambda *a: None)
    first = run("a", smoke_test=False)
    name = first["registered_model"]  # the tiny model's own registered model
    champion = lambda: str(client.get_model_version_by_alias(name, "champion").version)  # noqa: E731
    versions = lambda: len(client.search_model_versions(f"name='{name}'"))  # noqa: E731
    assert first["champion_moved"] and champion() == first["model_version"] == "1"
    # the same trial again (same seeds, labels and worker): equal on the same validation requests, so kept
    second = run("b", smoke_test=False)
    assert second["candidate_score"] == pytest.approx(second["champion_score"])
    assert not second["champion_moved"] and champion() == "1" and versions() == 2
    forced = run("b", smoke_test=False, force_champion=True)  # resumes b: its trial is reused
    assert forced["champion_moved"] and champion() == forced["model_version"] == "3"
    smoke = run("b")  # a smoke run: no version at all, the alias stays
    assert smoke["model_version"] is None and versions() == 3 and champion() == "3"


def test_force_flag_reaches_the_config():
    import argparse

    from adaptive_kv.training.cli import add_train, train_config

    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    assert train_config(parser.parse_args(["train", "--force"])).force_champion is True
    assert train_config(parser.parse_args(["train"])).force_champion is False


# ------------------------------------------------------------------------------ item 6: two trainers, one study
TRAINER = """
import sys
from adaptive_kv.training.search import SearchSpace
from adaptive_kv.training.train import TrainConfig, run_train
folder, out, mlflow_db, storage = sys.argv[1:5]
space = SearchSpace.smoke().__class__(**{**SearchSpace.smoke().__dict__, "epochs": (1500, 2000)})  # seconds per trial: they overlap
run_train(TrainConfig.smoke(model=folder, output=out, mlflow_uri=f"sqlite:///{mlflow_db}", workers=1, trials=4,
                            space=space, context_lengths=(200,), group_size=16, storage=storage, register=False,
                            heartbeat_s=1), log=print)
"""


def test_two_trainers_on_one_study_share_the_trials(tiny_model_dir, tmp_path):
    """Two trainers (one worker each) on one SQLite study and one output folder, the second started while
    the first runs a trial: neither fails the other's live trials, and the study ends with its 4 trials."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{(tmp_path / 'shared.db').resolve()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = lambda name: subprocess.Popen(  # noqa: E731
        [sys.executable, "-c", TRAINER, str(tiny_model_dir), str(tmp_path / "out"), str(tmp_path / f"{name}.db"),
         storage], stdout=(tmp_path / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
    first = start("first")
    second = None
    try:
        deadline = time.monotonic() + 240
        while True:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            with contextlib.suppress(KeyError):
                study = optuna.load_study(study_name="adaptive-kv", storage=storage)
                if study.get_trials(states=(TrialState.RUNNING,)):
                    break
            time.sleep(0.2)
        second = start("second")
        for name, process in (("first", first), ("second", second)):
            assert process.wait(400) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    study = optuna.load_study(study_name="adaptive-kv", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4  # not 8: the target is shared
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all("skipped" in t.user_attrs for t in failed), [t.number for t in failed]  # no live trial failed
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # both trainers ran trials of the study (each logged its own trial runs)
    assert all((tmp_path / f"{name}.db").is_file() for name in ("first", "second"))
