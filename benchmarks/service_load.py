"""The service under load with the embedded model: latency, throughput and peak memory per configuration.

Configurations: the full cache, `hybrid` and `learned` at budget 0.125 on uvicorn; `hybrid` at
0.125 on Ray Serve with 1 and with 2 replicas.

Each configuration is a real `adaptive-kv serve` process on loopback; a closed loop of
`--concurrency` clients sends `--requests` completions of ~1k-token prompts (token ids of seeded
passkey samples, so every prompt differs and has exactly the same length) after one warm-up per
replica. Reports end-to-end latency p50/p95, requests/s and generated tokens/s, the server's
compression ratio, and peak RSS (VmHWM) of the processes holding the model: the uvicorn server,
or each Ray Serve replica.

    python benchmarks/service_load.py [--requests 6] [--concurrency 3] [--max-tokens 24] [--skip-ray]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Scenario:
    """One server configuration."""

    name: str
    args: tuple[str, ...]
    replicas: int = 1


@dataclass(frozen=True)
class Measured:
    """The figures of one scenario."""

    scenario: str
    requests: int
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    p50_s: float
    p95_s: float
    mean_s: float
    requests_per_s: float
    tokens_per_s: float
    compression_ratio: float
    peak_rss_mib: list[float]
    replicas_seen: int
    wall_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with a handful of samples, report a real one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _peak_rss_mib(pid: int) -> float:
    """VmHWM of a process: its peak resident set, kept by the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _model_processes(server: psutil.Process) -> list[psutil.Process]:
    """The processes that hold a model: the server itself, or its Ray Serve replicas."""
    replicas = [p for p in server.children(recursive=True) if "ServeReplica" in " ".join(p.cmdline())]
    return replicas or [server]


def _prompts(count: int, length: int) -> list[list[int]]:
    from adaptive_kv import load_model
    from adaptive_kv.tasks import make_samples

    _, tokenizer = load_model("smollm2-135m")
    samples = make_samples("passkey", tokenizer, length, count, seed=1234)
    return [list(s.context_ids) + list(s.question_ids) for s in samples]


def _start(scenario: Scenario, port: int, workdir: Path) -> subprocess.Popen:
    log = (workdir / f"{scenario.name}.log").open("w")
    command = [sys.executable, "-m", "adaptive_kv.cli", "serve", "--model", "smollm2-135m", "--port", str(port),
               "--max-queue", "64", "--request-timeout", "600", *scenario.args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{scenario.name}: server exited; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{scenario.name}: not ready after 300 s")


async def _load(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                warmups: int) -> tuple[list[float], list[dict], float]:
    """Warm up, then run a closed loop; returns latencies, response bodies, wall seconds."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def one(ids: list[int]) -> tuple[float, dict, str]:
            start = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": "smollm2-135m", "prompt": ids,
                                                           "max_tokens": max_tokens})
            r.raise_for_status()
            return time.perf_counter() - start, r.json(), r.headers.get("x-adaptive-kv-replica", "")

        await asyncio.gather(*(one(prompts[-1 - i]) for i in range(warmups)))
        queue = list(prompts[: len(prompts) - warmups])
        results: list[tuple[float, dict, str]] = []

        async def client_loop() -> None:
            while queue:
                results.append(await one(queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    bodies = [{**body, "replica": replica} for _, body, replica in results]
    return [lat for lat, _, _ in results], bodies, wall


def run_scenario(scenario: Scenario, prompts: list[list[int]], args: argparse.Namespace, workdir: Path) -> Measured:
    """Start the server, load it, read peak memory, stop it."""
    port = _free_port()
    process = _start(scenario, port, workdir)
    try:
        warmups = scenario.replicas
        latencies, bodies, wall = asyncio.run(
            _load(f"http://127.0.0.1:{port}", prompts, args.concurrency, args.max_tokens, warmups))
        peaks = [round(_peak_rss_mib(p.pid), 1) for p in _model_processes(psutil.Process(process.pid))]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(180)
        except subprocess.TimeoutExpired:
            process.kill()
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    ratios = [b["kv_cache"]["ratio"] for b in bodies]
    return Measured(
        scenario=scenario.name, requests=len(latencies), concurrency=args.concurrency,
        prompt_tokens=bodies[0]["usage"]["prompt_tokens"], max_tokens=args.max_tokens,
        p50_s=round(_percentile(latencies, 50), 3), p95_s=round(_percentile(latencies, 95), 3),
        mean_s=round(statistics.mean(latencies), 3), requests_per_s=round(len(latencies) / wall, 3),
        tokens_per_s=round(tokens / wall, 2), compression_ratio=round(statistics.mean(ratios), 2),
        peak_rss_mib=peaks, replicas_seen=len({b["replica"] for b in bodies}), wall_s=round(wall, 1),
    )


def _table(rows: list[Measured]) -> str:
    head = ("| scenario | requests x conc. | prompt tok | p50 s | p95 s | req/s | gen tok/s | KV ratio | "
            "peak RSS MiB (per model process) | replicas seen |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {m.scenario} | {m.requests} x {m.concurrency} | {m.prompt_tokens} | {m.p50_s} | {m.p95_s} | "
        f"{m.requests_per_s} | {m.tokens_per_s} | {m.compression_ratio} | {', '.join(map(str, m.peak_rss_mib))} | "
        f"{m.replicas_seen} |\n" for m in rows)


def main() -> int:
    """Run every scenario and write benchmarks/results/service_load.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6, help="measured requests per scenario")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="passkey context length (question added)")
    # one core per model process everywhere, so uvicorn, 1 replica and 2 replicas compare like with like
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the uvicorn server")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    single = ("--threads", str(args.threads))
    scenarios = [
        Scenario("uvicorn full", ("--policy", "full", "--budget", "1.0", *single)),
        Scenario("uvicorn hybrid@0.125", ("--policy", "hybrid", "--budget", "0.125", *single)),
        Scenario("uvicorn learned@0.125", ("--policy", "learned", "--budget", "0.125", *single)),
    ]
    if not args.skip_ray:  # one CPU (and one torch thread) per replica, so 1 vs 2 replicas compares like with like
        ray = ("--policy", "hybrid", "--budget", "0.125", "--ray-serve", "--replica-cpus", "1", "--threads", "1")
        scenarios += [Scenario("ray serve 1 replica hybrid@0.125", (*ray, "--replicas", "1"), 1),
                      Scenario("ray serve 2 replicas hybrid@0.125", (*ray, "--replicas", "2"), 2)]
    prompts = _prompts(args.requests + 2, args.prompt_tokens)
    rows = []
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        for scenario in scenarios:
            rows.append(run_scenario(scenario, prompts[: args.requests + scenario.replicas], args, Path(tmp)))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]}
    (RESULTS / "service_load.json").write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]},
                                                          indent=2))
    table = _table(rows)
    (RESULTS / "service_load.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
