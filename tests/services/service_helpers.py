"""Helpers for the service tests: a tiny model saved as a local HF folder, and real servers in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydoc_data.topics

from conftest import build_tiny_model

# A minimal ChatML-like template, so /v1/chat/completions has something to render.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
# ~300 tiny-BPE tokens: long enough that budget 0.25 is feasible (sinks + window stay in full precision)
PROMPT = pydoc_data.topics.topics["assert"][:1200]
API_KEY = "test-key-123"
API_KEY_ENV = "ADAPTIVE_KV_TEST_API_KEY"
ADMIN_KEY = "test-admin-456"
ADMIN_KEY_ENV = "ADAPTIVE_KV_TEST_ADMIN_KEY"


def save_tiny_model(folder: Path, tokenizer) -> Path:
    """Save the tiny random Llama (GQA) and a copy of `tokenizer` with a chat template; load_model(folder) works."""
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    build_tiny_model("llama_gqa").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `adaptive-kv serve` subprocess."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, and return the exit code (killed after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start_server(workdir: Path, args: list[str], *, env: dict[str, str] | None = None, port: int | None = None,
                 ready_timeout: float = 120.0) -> Server:
    """Start `python -m adaptive_kv.cli serve ARGS --port P` in `workdir` and wait for /readyz."""
    port = port or free_port()
    log = workdir / f"server-{port}.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    process = subprocess.Popen(
        # one torch thread: the tiny model gains nothing from more, and CI's 2 cores are shared
        [sys.executable, "-m", "adaptive_kv.cli", "serve", *args, "--port", str(port), "--threads", "1"],
        cwd=workdir, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log_tail()}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus exposition text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
