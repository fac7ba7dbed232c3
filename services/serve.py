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
    replicas: int = 1
    ray_address: str | None = None
    num_cpus: float = 1.0


def served_name(model: str) -> str:
    """The model id clients send: the known name, or a local folder's name."""
    path = Path(model)
    return path.name if path.is_dir() else model


def read_api_key(env_var: str | None) -> str | None:
    """The API key from `env_var` (None: no key); an unset or empty variable is an error, not an open server."""
    if env_var is None:
        return None
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise ValueError(f"--api-key-env {env_var}: the environment variable is unset or empty")
    return key


def build_app(engine_config: EngineConfig, api_key: str | None, engine: Engine | None = None):
    """The FastAPI app with a fresh engine (loaded in the app's lifespan)."""
    from adaptive_kv.services.app import AppConfig, create_app

    engine = engine or Engine(engine_config)
    return create_app(engine, AppConfig(served_model=served_name(engine_config.model), api_key=api_key))


def run_uvicorn(options: ServeOptions) -> None:
    """Serve with uvicorn until SIGINT/SIGTERM; in-flight requests finish before the engine stops."""
    import uvicorn

    app = build_app(options.engine, read_api_key(options.api_key_env))
    uvicorn.run(app, host=options.host, port=options.port, log_level="info",
                timeout_graceful_shutdown=int(options.engine.request_timeout + _DRAIN_MARGIN_S))


class ServeReplica:
    """One Ray Serve replica: its own engine and app (the API key is read from the replica's environment,
    so it never enters Ray's deployment config)."""

    def __init__(self, engine_config: EngineConfig, api_key_env: str | None) -> None:
        self.engine = Engine(engine_config)
        # not `self.app`: Ray Serve's ASGI wrapper owns that attribute
        self._asgi = build_app(engine_config, read_api_key(api_key_env), self.engine)

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
        serve.run(deployment.bind(options.engine, options.api_key_env), name="adaptive-kv", route_prefix="/")
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
