"""Tier 2: the embedded SmolLM2-135M behind the real server, one short completion."""

from __future__ import annotations

import openai
import pytest

from service_helpers import start_server

pytestmark = pytest.mark.slow

# ~250 tokens of plain prose, so budget 0.5 is feasible (sinks + recent window stay in full precision)
DOCUMENT = " ".join(
    f"Station {i} on the northern line opened in {1900 + 3 * i} and serves {100 * i + 7} passengers a day."
    for i in range(1, 13)
)


def test_embedded_model_completion_through_the_server(tmp_path):
    server = start_server(tmp_path, ["--model", "smollm2-135m", "--policy", "hybrid", "--budget", "0.5"],
                          ready_timeout=300)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        response = client.completions.create(model="smollm2-135m", prompt=DOCUMENT + "\nStation 4 opened in",
                                             max_tokens=6)
        kv = response.model_extra["kv_cache"]
        assert response.choices[0].text.strip() and response.usage.prompt_tokens > 200
        assert kv["policy"] == "hybrid" and 0 < kv["bytes"] <= 0.5 * kv["full_bytes"], kv
        learned = client.completions.create(model="smollm2-135m", prompt=DOCUMENT + "\nStation 7 opened in",
                                            max_tokens=6, extra_body={"kv_policy": "learned", "kv_budget": 0.25})
        kv = learned.model_extra["kv_cache"]
        assert kv["policy"] == "learned" and 0 < kv["bytes"] <= 0.25 * kv["full_bytes"], kv
    finally:
        server.stop()
