"""The same app on Ray Serve: 2 replicas on a private local Ray (loopback), started and stopped by the test."""

from __future__ import annotations

import asyncio

import httpx
import openai
import psutil

from service_helpers import ADMIN_KEY, ADMIN_KEY_ENV, PROMPT, save_tiny_model, start_server


def test_ray_serve_two_replicas_share_the_load(tmp_path, tiny_tokenizer):
    """About 50 s on 2 shared cores (Ray start ~25 s, its shutdown most of the rest): tier 1, not slow."""
    model_dir = save_tiny_model(tmp_path / "tiny-model", tiny_tokenizer)
    server = start_server(tmp_path, ["--model", str(model_dir), "--ray-serve", "--replicas", "2", "--max-queue", "4",
                                     "--max-batch", "2", "--request-timeout", "60",
                                     "--admin-key-env", ADMIN_KEY_ENV], env={ADMIN_KEY_ENV: ADMIN_KEY}, ready_timeout=240)
    ray_processes = psutil.Process(server.process.pid).children(recursive=True)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        completion = client.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=4)
        kv = completion.model_extra["kv_cache"]
        assert kv["policy"] == "hybrid" and kv["bytes"] <= 0.25 * kv["full_bytes"]
        stream = client.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=4, stream=True)
        assert [c for c in stream if c.choices and c.choices[0].finish_reason]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
                body = {"model": "tiny-model", "prompt": PROMPT, "max_tokens": 200}

                async def send() -> httpx.Response:
                    # a replica's engine may still count a finished request for a moment after Ray's
                    # router has released it: a 429 then is the documented back-pressure, so retry as a client would
                    for _ in range(5):
                        response = await ac.post("/v1/completions", json=body)
                        if response.status_code != 429:
                            return response
                        await asyncio.sleep(0.5)
                    return response

                return await asyncio.gather(*(send() for _ in range(8)))

        # 8 requests need both replicas: each holds 2 running + 4 queued
        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        replicas = {r.headers["x-adaptive-kv-replica"] for r in responses}
        assert len(replicas) == 2, replicas  # both replicas served, each with its own engine
        # a reload would reach the one replica Ray routes it to: refused, and every replica keeps its policy
        reload = httpx.post(f"{server.url}/v1/admin/reload", json={"policy": "snapkv"},
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
        assert reload.status_code == 403 and reload.json()["error"]["code"] == "reload_needs_redeploy", reload.text
        assert "2 replicas" in reload.json()["error"]["message"]
        after = asyncio.run(burst())
        assert {r.json()["kv_cache"]["policy"] for r in after if r.status_code == 200} == {"hybrid"}
        assert len({r.headers["x-adaptive-kv-replica"] for r in after}) == 2
    finally:
        code = server.stop(timeout=120)
        gone, alive = psutil.wait_procs(ray_processes, timeout=30)
        for process in alive:  # only processes this test's server started
            process.kill()
    assert code == 0, server.log_tail()
    assert not alive, [p.pid for p in alive]
