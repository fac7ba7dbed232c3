"""Issue 24, item 2: `docker-compose run --rm trainer` after a finished study. The study lives in PostgreSQL
and outlives the trainer container; the trial folders live under --output. Two trainer "containers" are
emulated from docker-compose.yml itself: --output maps to one shared folder when compose mounts a named
volume there, else to a fresh folder per container (its own filesystem). The Optuna store is shared, as
PostgreSQL is. The second run must find the finished trials' folders."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from test_training import _config, ray_local, tiny_model_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (.ci/run installs Debian's package)")
def test_a_second_trainer_container_finds_the_finished_trials(tiny_model_dir, tmp_path, ray_local):
    from test_deploy import REQUIRED, trainer_output_volume

    from adaptive_kv.training.train import run_train

    env = {**os.environ, **REQUIRED}
    done = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    compose = yaml.safe_load(done.stdout)
    volume = trainer_output_volume(compose)

    def output_of(container: int) -> Path:
        if volume is not None:
            return tmp_path / "volumes" / volume
        return tmp_path / f"container-{container}" / "fs"  # the container's own filesystem, gone with --rm

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # stands in for PostgreSQL: it outlives the containers
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_train(_config(tiny_model_dir, output_of(1), storage=storage, mlflow_uri=uri), log=lambda *a: None)
    second = run_train(_config(tiny_model_dir, output_of(2), storage=storage, mlflow_uri=uri), log=lambda *a: None)
    assert second["best_trial"] == first["best_trial"] and Path(second["controller"]).is_dir()
