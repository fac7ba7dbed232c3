"""Entry points: one uvicorn process, or N Ray Serve replicas behind Ray Serve's HTTP proxy."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from adaptive_kv.services.engine import Engine, EngineConfig

logger = logging.getLogger(__name__)
# uvicorn waits this long beyond the request timeout for in-flight requests before it gives up
_DRAIN_MARGIN_S = 5.0


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve (the engine's own settings live in EngineConfig)."""

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    admin_key_env: str | None = None
    replicas: int = 1
    ray_address: str | None = None
    num_cpus: float = 1.0


def served_name(model: str) -> str:
    """The model id clients send: the known name, or a local folder's name."""
    path = Path(model)
    return path.name if path.is_dir() else model


def read_api_key(env_var: str | None, flag: str = "--api-key-env") -> str | None:
    """The key in `env_var` (None: no key); an unset or empty variable is an error, not an open server."""
    if env_var is None:
        return None
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise ValueError(f"{flag} {env_var}: the environment variable is unset or empty")
    if any(not part.strip() for part in key.split(",")):
        raise ValueError(f"{flag} {env_var}: an empty key in the comma-separated list (an empty bearer token "
                         "would pass)")
    return key


def read_admin_key(env_var: str | None, api_key: str | None) -> str | None:
    """The admin key in `env_var` (None: reload off); it must differ from the API key, or it adds nothing."""
    key = read_api_key(env_var, "--admin-key-env")
    if key is not None and api_key is not None and key in [k.strip() for k in api_key.split(",")]:
        raise ValueError(f"--admin-key-env {env_var}: the admin key must differ from the API key")
    return key


def build_app(engine_config: EngineConfig, api_key: str | None, engine: Engine | None = None,
              admin_key: str | None = None, reload_refusal: str | None = None):
    """The FastAPI app with a fresh engine (loaded in the app's lifespan)."""
    from adaptive_kv.services.app import AppConfig, create_app

    engine = engine or Engine(engine_config)
    return create_app(engine, AppConfig(served_model=served_name(engine_config.model), api_key=api_key,
                                        admin_key=admin_key, reload_refusal=reload_refusal))


def run_uvicorn(options: ServeOptions) -> None:
    """Serve with uvicorn until SIGINT/SIGTERM; in-flight requests finish before the engine stops."""
    import uvicorn

    api_key = read_api_key(options.api_key_env)
    app = build_app(options.engine, api_key, admin_key=read_admin_key(options.admin_key_env, api_key))
    uvicorn.run(app, host=options.host, port=options.port, log_level="info",
                timeout_graceful_shutdown=int(options.engine.request_timeout + _DRAIN_MARGIN_S))


class ServeReplica:
    """One Ray Serve replica: its own engine and app (the keys are read from the replica's environment,
    so they never enter Ray's deployment config)."""

    def __init__(self, engine_config: EngineConfig, api_key_env: str | None, admin_key_env: str | None = None,
                 replicas: int = 1) -> None:
        self.engine = Engine(engine_config)
        api_key = read_api_key(api_key_env)
        refusal = None
        if replicas > 1:  # Ray routes a request to one replica: a reload would leave the others on the old policy
            refusal = (f"reload is refused under Ray Serve with {replicas} replicas: it would reach one of them only; "
                       "redeploy with the new --policy/--policy-uri (a models:/ alias is re-resolved at start)")
        # not `self.app`: Ray Serve's ASGI wrapper owns that attribute
        self._asgi = build_app(engine_config, api_key, self.engine, read_admin_key(admin_key_env, api_key),
                               reload_refusal=refusal)

    def __serve_build_asgi_app__(self):
        """Ray Serve's hook: the ASGI app this replica serves."""
        return self._asgi

    def check_health(self) -> None:
        """Ray Serve's health probe: fail when the engine stopped."""
        if not self.engine.ready:
            raise RuntimeError("engine not ready")


def run_ray_serve(options: ServeOptions) -> None:
    """Deploy `replicas` engines on Ray Serve (a local Ray, or `ray_address`) and block until a signal."""
    import ray
    from ray import serve

    if options.ray_address:
        ray.init(address=options.ray_address)
    else:
        # a private local Ray (never an unrelated one found on this machine), stopped with this process
        ray.init(address="local", include_dashboard=False)
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        deployment = serve.deployment(
            name="adaptive-kv",
            num_replicas=options.replicas,
            # the engine queues and refuses beyond max_queue itself; Serve only needs to let that many through
            max_ongoing_requests=options.engine.max_queue + options.engine.max_batch,
            graceful_shutdown_timeout_s=options.engine.request_timeout + _DRAIN_MARGIN_S,
            ray_actor_options={"num_cpus": options.num_cpus},
        )(serve.ingress()(ServeReplica))
        serve.run(deployment.bind(options.engine, options.api_key_env, options.admin_key_env, options.replicas), name="adaptive-kv", route_prefix="/")
        logger.info("Ray Serve: %d replica(s) on http://%s:%d", options.replicas, options.host, options.port)
        _wait_for_signal()
    finally:
        serve.shutdown()  # drains replicas (graceful_shutdown_timeout_s)
        ray.shutdown()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait: signal handlers run between waits
        pass
