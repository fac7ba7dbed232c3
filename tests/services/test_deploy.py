"""docker-compose.yml and the Dockerfile, validated without Docker: Debian's `docker-compose config` parses,
interpolates and checks the file against the Compose schema (it needs no daemon)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

from service_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose not installed (.ci/run installs Debian's package before the tests)"
)
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "trainer", "service"}


REQUIRED = {"POSTGRES_PASSWORD": "pw-0f9e", "ADAPTIVE_KV_API_KEY": "api-7c1d", "ADAPTIVE_KV_ADMIN_KEY": "admin-3b8a"}


def _config(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    return subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    done = _config(**REQUIRED)
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
    assert "--backend-store-uri postgresql+psycopg2://adaptive_kv@postgres:5432/mlflow" in s["mlflow"]["command"]
    assert "--storage postgresql+psycopg2://adaptive_kv@postgres:5432/optuna" in s["trainer"]["command"]
    assert s["ray-worker"]["deploy"]["replicas"] >= 1 and "--address=ray-head:6379" in s["ray-worker"]["command"]
    # the service is published on the host's loopback only
    (port,) = s["service"]["ports"]  # docker-compose 1.x prints the short form, 2.x the long one
    if isinstance(port, str):
        port = dict(zip(("host_ip", "published"), port.split(":")[:2]))
    assert port["host_ip"] == "127.0.0.1" and int(port["published"]) == 8000


@needs_compose
@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_start_without_each_secret(missing):
    done = _config(**{k: v for k, v in REQUIRED.items() if k != missing})
    assert done.returncode != 0 and f"set {missing} to" in done.stderr, done.stderr
    # set but empty is refused too (`:?`), never a silent default
    done = _config(**{**REQUIRED, missing: ""})
    assert done.returncode != 0 and f"set {missing} to" in done.stderr, done.stderr


@needs_compose
def test_compose_database_password_reaches_only_the_database_clients_by_environment(compose):
    password = REQUIRED["POSTGRES_PASSWORD"]
    holders = set()
    for name, service in compose["services"].items():
        assert password not in json.dumps(service.get("command", "")), f"{name}: password on its command line"
        assert password not in json.dumps(service.get("healthcheck", {})), f"{name}: password in its healthcheck"
        environment = service.get("environment", {})
        if any(password in str(value) for value in environment.values()):
            holders.add(name)
            # in a variable of its own, never inside a URL that would be logged or shown
            assert [k for k, v in environment.items() if password in str(v)] in (["PGPASSWORD"], ["POSTGRES_PASSWORD"])
    assert holders == {"postgres", "mlflow", "trainer"}
    # no database URL at all in the service container (it used to carry an unused OPTUNA_STORAGE)
    assert not any("postgres" in str(v) for v in compose["services"]["service"]["environment"].values())
    # the admin key reaches the service alone
    assert {n for n, s in compose["services"].items()
            if REQUIRED["ADAPTIVE_KV_ADMIN_KEY"] in json.dumps(s.get("environment", {}))} == {"service"}


@needs_compose
def test_compose_restarts_long_running_services_and_not_the_trainer(compose):
    services = compose["services"]
    for name in SERVICES - {"trainer"}:
        assert services[name].get("restart") in ("unless-stopped", "always"), name
    assert services["trainer"].get("restart") == "no"


@needs_compose
def test_compose_ray_has_no_dashboard_and_the_service_no_route_to_ray_or_the_database(compose):
    services = compose["services"]
    head = services["ray-head"]["command"]
    assert "--include-dashboard=false" in head and "--dashboard-host" not in head
    networks = {name: set(service["networks"]) for name, service in services.items()}
    for reachable_only_from_training in ("ray-head", "ray-worker", "postgres"):
        assert not networks["service"] & networks[reachable_only_from_training], reachable_only_from_training
    assert networks["service"] & networks["mlflow"]  # it fetches the champion


@needs_compose
def test_compose_trainer_output_is_on_a_named_volume(compose):
    """The study lives in PostgreSQL and outlives the trainer container, so the trial folders must too."""
    trainer = compose["services"]["trainer"]
    output = re.search(r"--output (\S+)", trainer["command"]).group(1)
    assert trainer_output_volume(compose) is not None, f"--output {output} is on the container's own filesystem"
    assert trainer_output_volume(compose) in compose["volumes"]


def trainer_output_volume(compose: dict) -> str | None:
    """The named volume holding the trainer's --output folder (None: the container's own filesystem)."""
    trainer = compose["services"]["trainer"]
    output = PurePosixPath(re.search(r"--output (\S+)", trainer["command"]).group(1))
    for volume in trainer.get("volumes", []):
        if isinstance(volume, str):  # docker-compose 1.x: "name:/path[:mode]"
            source, target = volume.split(":")[:2]
            volume = {"type": "volume" if not source.startswith((".", "/")) else "bind", "source": source,
                      "target": target}
        if volume["type"] == "volume" and output.is_relative_to(volume["target"]):
            return volume["source"]
    return None


@needs_compose
def test_mlflow_accepts_the_compose_host_header_only_with_allowed_hosts(compose, tmp_path):
    """MLflow 3.5+ answers 403 to a Host header outside --allowed-hosts (default: localhost and private IPs),
    except on /health: the healthcheck passes while every client of `http://mlflow:5000` is refused. A real
    `mlflow server` on loopback, with the value compose passes, and without it."""
    command = compose["services"]["mlflow"]["command"]
    allowed = re.search(r"--allowed-hosts (\S+)", command)
    assert allowed, f"mlflow has no --allowed-hosts: {command}"
    client_host = compose["services"]["service"]["environment"]["MLFLOW_TRACKING_URI"].removeprefix("http://")
    assert client_host == compose["services"]["trainer"]["environment"]["MLFLOW_TRACKING_URI"].removeprefix("http://")
    assert client_host == "mlflow:5000"
    for flags, want in (([], 403), (["--allowed-hosts", allowed.group(1)], 200)):
        with _mlflow_server(tmp_path / str(want), flags) as url:
            assert httpx.get(f"{url}/health", headers={"Host": client_host}, timeout=10).status_code == 200
            search = httpx.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                               headers={"Host": client_host}, timeout=30)
            assert search.status_code == want, (flags, search.status_code, search.text[:200])
            # the healthcheck's own Host is still accepted
            local = httpx.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                              headers={"Host": "localhost:5000"}, timeout=30)
            assert local.status_code == 200


@contextlib.contextmanager
def _mlflow_server(work: Path, flags: list[str]):
    """`mlflow server` on loopback (SQLite backend, one worker), stopped with its process group."""
    work.mkdir(parents=True)
    port, log = free_port(), work / "mlflow.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "art"),
         *flags], cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"mlflow not up:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
