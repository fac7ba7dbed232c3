"""docker-compose's topology without containers, all on loopback and started/stopped here: PostgreSQL (a
temporary data directory) as MLflow's backend and Optuna's storage, `mlflow server`, `ray start --head`,
then a small `adaptive-kv train` against them and `adaptive-kv serve` loading the registered champion."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from service_helpers import ADMIN_KEY, ADMIN_KEY_ENV, API_KEY, API_KEY_ENV, PROMPT, free_port, save_tiny_model, start_server

pytestmark = pytest.mark.slow
# Ray's GCS listens on every interface whatever --node-ip-address says: a per-test token keeps it closed
# (and keeps it apart from any ~/.ray/auth_token of other Rays on this machine).
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


PG_CTL, INITDB = _postgres_bin("pg_ctl"), _postgres_bin("initdb")
needs_postgres = pytest.mark.skipif(
    PG_CTL is None or INITDB is None, reason="PostgreSQL not installed (.ci/run installs Debian's postgresql)"
)


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as `nobody` then."""
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


def _wait_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop_tree(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM a process we started, then make sure its descendants are gone too (by pid)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for leftover in alive:
        leftover.kill()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL on 127.0.0.1 in a temporary data directory with databases `mlflow` and `optuna`.

    URLs name the psycopg2 driver: SQLAlchemy 2.1 defaults `postgresql://` to psycopg 3, which we do not install.
    """
    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="akv-pg-"))  # outside pytest's root-only tmp tree, for `nobody`
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
    data, port = root / "data", free_port()
    subprocess.run(_as_postgres_user([INITDB, "-D", str(data), "-U", "adaptive_kv", "--auth=trust"]), check=True,
                   capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    subprocess.run(_as_postgres_user([PG_CTL, "-D", str(data), "-o", options, "-l", str(root / "pg.log"), "-w",
                                      "start"]), check=True, capture_output=True)
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="adaptive_kv", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
            cursor.execute("CREATE DATABASE optuna")
        connection.close()
        yield f"postgresql+psycopg2://adaptive_kv@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres_user([PG_CTL, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on loopback with the PostgreSQL backend and a local artifact folder."""
    work = tmp_path_factory.mktemp("mlflow")
    port, log = free_port(), work / "mlflow.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"{postgres}/mlflow", "--artifacts-destination", str(work / "artifacts")],
        cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, 180, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_tree(process)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback; stopping it reaps its processes (never `ray stop`: other Rays)."""
    log, port = tmp_path_factory.mktemp("ray") / "ray.log", free_port()
    env = {**os.environ, **RAY_ENV}
    process = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "false", "--num-cpus", "2", "--disable-usage-stats"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["ray", "health-check", "--address", address], capture_output=True,
                             env=env).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield address
    finally:
        _stop_tree(process)


@needs_postgres
def test_train_against_the_cluster_then_serve_the_champion(postgres, mlflow_server, ray_head, tmp_path,
                                                           tiny_tokenizer_bos):
    model_dir = save_tiny_model(tmp_path / "tiny-model", tiny_tokenizer_bos)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **RAY_ENV}
    train = subprocess.run(
        # a small real run (a smoke run never registers, and this one serves what it registers)
        [sys.executable, "-m", "adaptive_kv.cli", "train", "--model", str(model_dir), "--trials", "2",
         "--tasks", "passkey,fidelity", "--train-per-task", "1", "--valid-per-task", "1", "--budgets", "0.5,0.25",
         "--ray-address", ray_head, "--workers", "2", "--storage", f"{postgres}/optuna",
         "--mlflow-uri", mlflow_server, "--output", str(tmp_path / "train"), "--context-length", "200", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    # the champion of this model's own registered model (one per base model), as `train` reports it
    champion = f"models:/{json.loads(train.stdout.splitlines()[-1])['registered_model']}@champion"

    server = start_server(tmp_path, ["--model", str(model_dir), "--policy-uri", champion, "--budget", "0.5",
                                     "--api-key-env", API_KEY_ENV, "--admin-key-env", ADMIN_KEY_ENV],
                          env={"MLFLOW_TRACKING_URI": mlflow_server, API_KEY_ENV: API_KEY, ADMIN_KEY_ENV: ADMIN_KEY})
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        response = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=4)
        kv = response.model_extra["kv_cache"]
        assert kv["policy"] == f"learned:{champion}" and 0 < kv["bytes"] <= 0.5 * kv["full_bytes"], kv
        reload = httpx.post(f"{server.url}/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
        assert reload.status_code == 200 and reload.json()["policy"] == f"learned:{champion}", reload.text
    finally:
        server.stop()
