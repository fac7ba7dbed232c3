"""docker-compose.yml and the Dockerfile, validated without Docker: Debian's `docker-compose config` parses,
interpolates and checks the file against the Compose schema (it needs no daemon)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose not installed (.ci/run installs Debian's package before the tests)"
)
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "trainer", "service"}


def _config(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("ADAPTIVE_KV_API_KEY", "POSTGRES_PASSWORD")}
    return subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    done = _config(ADAPTIVE_KV_API_KEY="k", POSTGRES_PASSWORD="pw")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@needs_compose
def test_compose_has_every_role_with_a_healthcheck(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@needs_compose
def test_compose_wiring(compose):
    s = compose["services"]
    assert "models:/adaptive-kv-controller@champion" in s["service"]["command"]
    assert s["service"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert {"postgres", "mlflow", "ray-head"} <= set(s["trainer"]["depends_on"])
    assert all(d["condition"] == "service_healthy" for d in s["trainer"]["depends_on"].values())
    assert "postgresql+psycopg2://adaptive_kv:pw@postgres:5432/mlflow" in s["mlflow"]["command"]
    assert "--storage postgresql+psycopg2://adaptive_kv:pw@postgres:5432/optuna" in s["trainer"]["command"]
    assert s["ray-worker"]["deploy"]["replicas"] >= 1 and "--address=ray-head:6379" in s["ray-worker"]["command"]
    # the service is published on the host's loopback only
    (port,) = s["service"]["ports"]  # docker-compose 1.x prints the short form, 2.x the long one
    if isinstance(port, str):
        port = dict(zip(("host_ip", "published"), port.split(":")[:2]))
    assert port["host_ip"] == "127.0.0.1" and int(port["published"]) == 8000


@needs_compose
def test_compose_refuses_to_start_the_service_without_an_api_key():
    done = _config()
    assert done.returncode != 0 and "set ADAPTIVE_KV_API_KEY" in done.stderr


def test_dockerfile_pins_cpu_torch_and_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'--index-url https://download.pytorch.org/whl/cpu "torch==2\.13\.0"', text)
    # the project installs against the lock CI tested
    assert "COPY pyproject.toml README.md constraints.txt ./" in text
    assert 'pip install -c constraints.txt ".[train,serve,postgres]"' in text
    for folder in ("adaptive_kv", "policies", "training", "services"):
        assert f"COPY {folder} ./{folder}" in text
    assert (ROOT / "deploy" / "postgres-init.sql").read_text().count("CREATE DATABASE optuna") == 1


def test_dockerfile_default_command_needs_the_api_key():
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    argv = json.loads(cmd.group(1))
    assert argv[:2] == ["adaptive-kv", "serve"] and "0.0.0.0" in argv and "--insecure" not in argv
    # run as the image would with no key in its environment: refused before any model loads, in one line
    env = {k: v for k, v in os.environ.items() if k != "ADAPTIVE_KV_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "adaptive_kv.cli", *argv[1:]], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2
    assert "--api-key-env ADAPTIVE_KV_API_KEY: the environment variable is unset or empty" in done.stderr


@pytest.mark.parametrize("host, refused", [("0.0.0.0", True), ("192.168.1.5", True), ("example.org", True),
                                           ("127.0.0.1", False), ("localhost", False), ("::1", False)])
def test_serve_refuses_an_open_non_loopback_bind(host, refused, capsys, monkeypatch):
    from adaptive_kv.cli import main
    from adaptive_kv.services import serve

    started = []
    monkeypatch.setattr(serve, "run_uvicorn", lambda options: started.append(options.host))  # no server in this test
    code = main(["serve", "--host", host, "--policy", "full"])
    if refused:
        assert code == 2 and started == []
        assert f"--host {host} serves beyond this machine without an API key" in capsys.readouterr().err
        assert main(["serve", "--host", host, "--policy", "full", "--insecure"]) == 0 and started == [host]
    else:
        assert code == 0 and started == [host]
