"""The service under load with the embedded model: continuous batching under one KV memory limit.

Scenarios (uvicorn, one process, every one under the same `--kv-memory`): the full cache, `hybrid`,
`learned` (on predicted reconstruction scores, its default, and on exact ones) and `kvzap` at budget
0.125 (batched), and `hybrid` at 0.125 with `--max-batch 1` (one request
at a time, as the engine ran before batching). Optionally `hybrid` on Ray Serve with 1 and 2
replicas (`--ray`).

Each scenario is a real `adaptive-kv serve` process on loopback. At each concurrency level, that
many clients send streamed completions at once (closed loop, `--rounds` requests per client) of
~1k-token prompts (token ids of seeded passkey samples: every prompt differs, all have the same
length), after one warm-up. Reports generated tokens/s, time to first token and latency p50/p95,
the largest batch the server reached and the most KV bytes it held (its own metrics), and peak
RSS (VmHWM) of the process holding the model.

    python benchmarks/service_load.py [--concurrency 1 4 16 32] [--max-tokens 64] [--kv-memory 350MiB]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
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
    """The figures of one scenario at one concurrency level."""

    scenario: str
    concurrency: int
    requests: int
    prompt_tokens: int
    max_tokens: int
    kv_memory_bytes: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    requests_per_s: float
    peak_batch: int
    peak_kv_bytes: int
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


def _start(scenario: Scenario, port: int, workdir: Path, kv_memory: str) -> subprocess.Popen:
    log = (workdir / f"{scenario.name}.log").open("w")
    command = [sys.executable, "-m", "adaptive_kv.cli", "serve", "--model", "smollm2-135m", "--port", str(port),
               "--max-queue", "64", "--request-timeout", "1800", "--kv-memory", kv_memory, *scenario.args]
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


@dataclass(frozen=True)
class _Response:
    latency_s: float
    ttft_s: float
    completion_tokens: int
    ratio: float
    replica: str


async def _one(client: httpx.AsyncClient, ids: list[int], max_tokens: int) -> _Response:
    """One streamed completion: time to its first text, to its end, its usage and KV ratio."""
    body = {"model": "smollm2-135m", "prompt": ids, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    ttft, usage, kv = None, None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-adaptive-kv-replica", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start  # the first streamed text
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                kv = choice.get("kv_cache") or kv
            kv = chunk.get("kv_cache") or kv
    return _Response(time.perf_counter() - start, ttft, usage["completion_tokens"], kv["ratio"], replica)


async def _load(url: str, prompts: list[list[int]], concurrency: int, rounds: int,
                max_tokens: int) -> tuple[list[_Response], float]:
    """`concurrency` clients send `rounds` requests each, all at once; returns the responses and wall seconds."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        queue = list(prompts[: concurrency * rounds])
        results: list[_Response] = []

        async def client_loop() -> None:
            while queue:
                results.append(await _one(client, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def run_scenario(scenario: Scenario, prompts: list[list[int]], args: argparse.Namespace,
                 workdir: Path) -> list[Measured]:
    """Start the server, warm it up, load it at every concurrency level, stop it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(scenario, port, workdir, args.kv_memory)
    rows = []
    try:
        asyncio.run(_load(url, prompts[-scenario.replicas:], scenario.replicas, 1, args.max_tokens))  # warm-up
        limit = int(_metric(url, "adaptive_kv_kv_limit_bytes"))
        for concurrency in args.concurrency:
            # the server's peak gauges count from its start: levels run in rising concurrency, so each
            # level reads the largest batch and KV bytes reached so far, its own or a lower level's
            responses, wall = asyncio.run(_load(url, prompts, concurrency, args.rounds, args.max_tokens))
            peaks = [round(_peak_rss_mib(p.pid), 1) for p in _model_processes(psutil.Process(process.pid))]
            latencies, ttfts = [r.latency_s for r in responses], [r.ttft_s for r in responses]
            rows.append(Measured(
                scenario=scenario.name, concurrency=concurrency, requests=len(responses),
                prompt_tokens=len(prompts[0]), max_tokens=args.max_tokens, kv_memory_bytes=limit,
                tokens_per_s=round(sum(r.completion_tokens for r in responses) / wall, 2),
                ttft_p50_s=round(_percentile(ttfts, 50), 2), ttft_p95_s=round(_percentile(ttfts, 95), 2),
                latency_p50_s=round(_percentile(latencies, 50), 2), latency_p95_s=round(_percentile(latencies, 95), 2),
                requests_per_s=round(len(responses) / wall, 3),
                peak_batch=int(_metric(url, "adaptive_kv_batch_size_peak")),
                peak_kv_bytes=int(_metric(url, "adaptive_kv_kv_in_use_peak_bytes")),
                compression_ratio=round(statistics.mean(r.ratio for r in responses), 2),
                peak_rss_mib=peaks, replicas_seen=len({r.replica for r in responses}), wall_s=round(wall, 1),
            ))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(180)
        except subprocess.TimeoutExpired:
            process.kill()
    return rows


def _table(rows: list[Measured]) -> str:
    head = ("| scenario | concurrency | requests | gen tok/s | TTFT p50 s | TTFT p95 s | latency p50 s | "
            "latency p95 s | batch reached | peak KV MiB / limit MiB | KV ratio | peak RSS MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {m.scenario} | {m.concurrency} | {m.requests} | {m.tokens_per_s} | {m.ttft_p50_s} | {m.ttft_p95_s} | "
        f"{m.latency_p50_s} | {m.latency_p95_s} | {m.peak_batch} | {m.peak_kv_bytes / 2**20:.0f} / "
        f"{m.kv_memory_bytes / 2**20:.0f} | {m.compression_ratio} | {', '.join(map(str, m.peak_rss_mib))} |\n"
        for m in rows)


def main() -> int:
    """Run every scenario and write benchmarks/results/OUTPUT.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=1, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="passkey context length (question added)")
    # 350 MiB: the full cache's bound for a 1k prompt and 64 new tokens is ~100 MiB, so it holds 3
    parser.add_argument("--kv-memory", default="350MiB")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    parser.add_argument("--scenarios", nargs="+", help="run only these scenario names")
    parser.add_argument("--ray", action="store_true", help="add hybrid on Ray Serve with 1 and 2 replicas")
    parser.add_argument("--output", default="service_load", help="results name under benchmarks/results/")
    args = parser.parse_args()
    threads = ("--threads", str(args.threads))
    scenarios = [
        Scenario("full", ("--policy", "full", "--budget", "1.0", *threads)),
        Scenario("hybrid@0.125", ("--policy", "hybrid", "--budget", "0.125", *threads)),
        Scenario("learned@0.125", ("--policy", "learned", "--budget", "0.125", *threads)),
        Scenario("learned@0.125 exact", ("--policy", "learned", "--reconstruction", "exact", "--budget", "0.125",
                                         *threads)),
        Scenario("kvzap@0.125", ("--policy", "kvzap", "--budget", "0.125", *threads)),
        Scenario("hybrid@0.125 one at a time", ("--policy", "hybrid", "--budget", "0.125", "--max-batch", "1",
                                                *threads)),
    ]
    if args.ray:  # one CPU (and one torch thread) per replica, so 1 vs 2 replicas compares like with like
        ray = ("--policy", "hybrid", "--budget", "0.125", "--ray-serve", "--replica-cpus", "1", "--threads", "1")
        scenarios += [Scenario("ray serve 1 replica hybrid@0.125", (*ray, "--replicas", "1"), 1),
                      Scenario("ray serve 2 replicas hybrid@0.125", (*ray, "--replicas", "2"), 2)]
    if args.scenarios:
        scenarios = [s for s in scenarios if s.name in args.scenarios]
    prompts = _prompts(max(args.concurrency) * args.rounds + 2, args.prompt_tokens)
    rows: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        for scenario in scenarios:
            rows += run_scenario(scenario, prompts, args, Path(tmp))
            _write(rows, args)
    print(_table(rows))
    return 0


def _write(rows: list[Measured], args: argparse.Namespace) -> None:
    """Write what is measured so far (a long run keeps its finished scenarios)."""
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1m_at_end": os.getloadavg()[0]}
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]},
                                                            indent=2))
    command = shlex.join(["python", "benchmarks/service_load.py", *sys.argv[1:]])
    header = (f"`{command}`: SmolLM2-135M-Instruct (fp32) on "
              f"{os.cpu_count()} CPUs, {args.threads} torch threads; ~{args.prompt_tokens}-token prompts, max_tokens "
              f"{args.max_tokens}, `--kv-memory {args.kv_memory}`; at each level that many streamed requests are sent "
              f"at once ({args.rounds} per client). TTFT: time to the first streamed text. Batch reached and peak KV: "
              "the server's own gauges since its start (levels run in rising concurrency).\n\n")
    (RESULTS / f"{args.output}.md").write_text(header + _table(rows))


if __name__ == "__main__":
    sys.exit(main())
