"""The `adaptive-kv serve` subcommand. FastAPI, uvicorn and Ray are imported only when it runs."""

from __future__ import annotations

import argparse
from typing import Callable

from adaptive_kv import cli_args


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    value = _positive(int)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return value


def _kv_memory(text: str) -> int | float:
    from adaptive_kv.services.admission import parse_kv_memory

    try:
        return parse_kv_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves only this machine (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model and its KV policy over HTTP (uvicorn, or Ray Serve replicas)."""
    from adaptive_kv.services.engine import EngineConfig
    from adaptive_kv.services.policy_source import PolicySpec, resolve_policy
    from adaptive_kv.services.serve import ServeOptions, read_admin_key, read_api_key, run_ray_serve, run_uvicorn

    if args.policy and args.policy_uri:
        raise ValueError("give at most one of --policy and --policy-uri")
    name = args.policy or "hybrid"
    if args.reconstruction != "auto" and not (args.policy_uri or name == "learned"):
        raise ValueError("--reconstruction applies to the learned controller: give --policy learned or --policy-uri")
    spec = (PolicySpec(uri=args.policy_uri, reconstruction=args.reconstruction) if args.policy_uri
            else PolicySpec(name=name, reconstruction=args.reconstruction))
    if spec.uri is None:
        resolve_policy(spec)  # an unknown name fails here, before any model loads
    key = read_api_key(args.api_key_env)  # likewise an unset key variable
    read_admin_key(args.admin_key_env, key)
    if key is None and not is_loopback(args.host) and not args.insecure:
        raise ValueError(f"--host {args.host} serves beyond this machine without an API key: give --api-key-env VAR "
                         "(the bearer key clients must send), or --insecure to serve it open")
    engine = EngineConfig(model=args.model, policy=spec, budget=args.budget, max_queue=args.max_queue,
                          request_timeout=args.request_timeout, max_tokens_cap=args.max_tokens_cap,
                          threads=args.threads, kv_memory=args.kv_memory, max_batch=args.max_batch,
                          reuse_contexts=args.reuse_contexts)
    options = ServeOptions(engine=engine, host=args.host, port=args.port, api_key_env=args.api_key_env,
                           admin_key_env=args.admin_key_env,
                           replicas=args.replicas, ray_address=args.ray_address, num_cpus=args.replica_cpus)
    if args.ray_serve:
        run_ray_serve(options)
    else:
        if args.replicas != 1 or args.ray_address:
            raise ValueError("--replicas and --ray-address need --ray-serve")
        run_uvicorn(options)
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Register `serve` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve a model with its KV policy behind an OpenAI-compatible HTTP API")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--policy", help="registered policy name (default: hybrid)")
    p.add_argument("--policy-uri", help="learned controller: a local folder or models:/adaptive-kv-controller@champion")
    p.add_argument("--reconstruction", choices=("auto", "exact", "predicted"), default="auto",
                   help="learned controller: reconstruction scores from the exact second pass, from the scorer shipped "
                        "with it (no second pass), or what it was trained on (auto, the default)")
    p.add_argument("--budget", type=cli_args.fraction, default=0.25, help="default KV bytes as a fraction of the full cache")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-queue", type=_positive(int), default=16, help="requests waiting per replica before 429")
    p.add_argument("--request-timeout", type=_positive(float), default=120.0, help="seconds, queue wait included")
    p.add_argument("--max-tokens-cap", type=_positive(int), default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--kv-memory", type=_kv_memory,
                   help="KV cache memory per replica: bytes (512MiB, 2GB) or a fraction of free memory "
                        "(default 0.5); requests wait until their cache fits")
    p.add_argument("--max-batch", type=_positive(int), default=64,
                   help="requests decoding together per replica (1: one request at a time)")
    p.add_argument("--reuse-contexts", action="store_true",
                   help="store compressed contexts under --kv-memory and decode requests that start with one over it: "
                        "a chat's earlier messages are compressed on their own (without its last message) and "
                        "kept, and so is every finished request (the next turn starts with it)")
    p.add_argument("--threads", type=_positive(int), help="torch CPU threads per replica (default: torch's choice)")
    p.add_argument("--api-key-env", help="environment variable holding the bearer API key, or several comma-separated "
                                         "(one per tenant: stored contexts are never shared between keys; unset: no key)")
    p.add_argument("--admin-key-env", help="environment variable holding the bearer key of /v1/admin/reload, "
                                           "distinct from the API key (unset: reload is off)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who reaches the port may use it)")
    p.add_argument("--ray-serve", action="store_true", help="deploy on Ray Serve instead of one uvicorn process")
    p.add_argument("--replicas", type=_positive(int), default=1, help="Ray Serve replicas (each loads the model)")
    p.add_argument("--ray-address", help="existing Ray cluster (default: start a local Ray)")
    p.add_argument("--replica-cpus", type=_positive(float), default=1.0, help="CPUs reserved per Ray Serve replica")
    p.set_defaults(func=cmd_serve)
