"""The HTTP service against a real uvicorn server (subprocess, loopback), driven by the official openai client.

Tier 1: a tiny random Llama saved as a local HF folder. One server (API key, queue of 8) serves most
tests; a second one (no key, 30 s timeout) is shut down gracefully mid-request at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from service_helpers import ADMIN_KEY, ADMIN_KEY_ENV, API_KEY, API_KEY_ENV, PROMPT, metric, save_tiny_model, start_server

BUDGET = 0.25
# uvicorn re-raises the signal it handled once its graceful shutdown is done, so SIGTERM is a clean exit
STOPPED = (0, -signal.SIGTERM)
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_tokenizer)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """The main server: default host, API key from an env var, queue of 8, default policy hybrid at 0.25."""
    workdir = tmp_path_factory.mktemp("serve")
    srv = start_server(
        workdir,
        ["--model", str(model_dir), "--policy", "hybrid", "--budget", str(BUDGET), "--max-queue", str(MAX_QUEUE),
         "--request-timeout", "60", "--max-tokens-cap", "512", "--api-key-env", API_KEY_ENV,
         "--admin-key-env", ADMIN_KEY_ENV],
        env={API_KEY_ENV: API_KEY, ADMIN_KEY_ENV: ADMIN_KEY},
    )
    yield srv
    assert srv.stop() in STOPPED and "Application shutdown complete" in srv.log_tail(), srv.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def _kv(response) -> dict:
    """The kv_cache extension of an openai response object."""
    return response.model_extra["kv_cache"]


def _assert_kv_within(kv: dict, budget: float, policy: str) -> None:
    assert kv["policy"] == policy and kv["budget"] == budget and kv["note"] is None
    assert 0 < kv["bytes"] <= budget * kv["full_bytes"], kv
    assert kv["ratio"] == pytest.approx(kv["full_bytes"] / kv["bytes"])
    assert kv["plan"]["heads"] == 2 * 2  # tiny llama_gqa: 2 layers x 2 KV heads


# ---------------------------------------------------------------------------- happy paths
def test_completion_reports_kv_cache_within_budget(client):
    response = client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=8)
    choice = response.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 200
    _assert_kv_within(_kv(response), BUDGET, "hybrid")


def test_chat_with_request_budget_and_policy(client):
    response = client.chat.completions.create(
        model="tiny-model0", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        max_tokens=6, extra_body={"kv_budget": 0.5, "kv_policy": "snapkv"},
    )
    assert response.choices[0].message.role == "assistant"
    _assert_kv_within(_kv(response), 0.5, "snapkv")


def test_chat_stream_matches_non_streaming(client):
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model="tiny-model0", messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny-model0", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # greedy: the same tokens, streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    _assert_kv_within(finals[0].model_extra["kv_cache"], BUDGET, "hybrid")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_stream_and_stop_string(client):
    plain = client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=10)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-model0", prompt=PROMPT, max_tokens=10, stream=True))
    assert streamed == plain.choices[0].text
    stop = plain.choices[0].text.strip()[:2]
    if not stop:
        pytest.skip("the tiny model generated only whitespace; no stop string to test")
    stopped = client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=10, stop=[stop])
    assert stop not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_openai_client_eight_concurrent_streams_decode_in_one_batch(server, client, http):
    prompts = [PROMPT[: 1200 - 60 * i] for i in range(8)]  # different lengths: they join and leave at different steps

    async def streams() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as ac:
            async def one(prompt: str) -> str:
                stream = await ac.completions.create(model="tiny-model0", prompt=prompt, max_tokens=40, stream=True)
                return "".join([chunk.choices[0].text async for chunk in stream])

            return await asyncio.gather(*(one(p) for p in prompts))

    texts = asyncio.run(streams())
    assert metric(http.get("/metrics").text, "adaptive_kv_batch_size_peak") >= 4  # they decoded together
    for prompt, text in zip(prompts, texts):  # greedy: each stream is what the request gets alone
        assert text == client.completions.create(model="tiny-model0", prompt=prompt, max_tokens=40).choices[0].text


def test_short_prompt_falls_back_to_full_cache_under_default_budget(client):
    response = client.completions.create(model="tiny-model0", prompt="Hello", max_tokens=2)
    kv = _kv(response)
    assert kv["policy"] == "full" and kv["budget"] == 1.0 and "minimum feasible" in kv["note"]


def test_models_and_plan(client, http):
    (card,) = client.models.list().data
    assert card.id == "tiny-model0" and card.model_extra["kv_policy"] == "hybrid"
    body = http.post("/v1/plan", json={"prompt": PROMPT, "kv_budget": 0.3, "kv_policy": "kivi"}).json()
    assert body["object"] == "kv_plan" and body["prompt_tokens"] > 200
    assert len(body["plan"]["heads"]) == 2 and len(body["plan"]["heads"][0]) == 2
    assert body["kv_cache"]["bytes"] <= 0.3 * body["kv_cache"]["full_bytes"] and body["kv_cache"]["policy"] == "kivi"


# ---------------------------------------------------------------------------- bad inputs
GOOD = {"model": "tiny-model0", "prompt": PROMPT, "max_tokens": 2}
BAD_REQUESTS = {
    # name: (route, body (dict or raw bytes), status, param or None, text in the message)
    "missing_prompt": ("/v1/completions", {"model": "tiny-model0"}, 422, "prompt", "Field required"),
    "missing_model": ("/v1/completions", {"prompt": "hi"}, 422, "model", "Field required"),
    "missing_messages": ("/v1/chat/completions", {"model": "tiny-model0"}, 422, "messages", "Field required"),
    "wrong_type": ("/v1/completions", {**GOOD, "max_tokens": "ten"}, 422, "max_tokens", "integer"),
    "float_max_tokens": ("/v1/completions", {**GOOD, "max_tokens": 2.5}, 422, "max_tokens", "integer"),
    "negative_max_tokens": ("/v1/completions", {**GOOD, "max_tokens": -1}, 422, "max_tokens", "greater than"),
    "huge_max_tokens": ("/v1/completions", {**GOOD, "max_tokens": 10**9}, 422, "max_tokens", "less than"),
    "max_tokens_over_cap": ("/v1/completions", {**GOOD, "max_tokens": 100_000}, 400, "max_tokens", "<= 512"),
    "prompt_over_context": ("/v1/completions", {**GOOD, "prompt": [5] * 4095}, 400, "prompt", "context length"),
    "chat_over_context": ("/v1/chat/completions", {"model": "tiny-model0", "messages": [
        {"role": "user", "content": PROMPT * 20}]}, 400, "messages", "context length"),
    "token_id_out_of_vocab": ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt", "token ids"),
    "bad_role": ("/v1/chat/completions", {"model": "tiny-model0", "messages": [{"role": "robot", "content": "x"}]},
                 422, "messages.0.role", "Input should be"),
    "unknown_field": ("/v1/completions", {**GOOD, "best_of": 3}, 422, "best_of", "Extra inputs"),
    "n_above_one": ("/v1/completions", {**GOOD, "n": 2}, 422, "n", "less than or equal to 1"),
    "invalid_json": ("/v1/completions", b'{"model": "tiny-model0", "prompt": ', 400, None, "not valid JSON"),
    "invalid_utf8": ("/v1/completions", b'{"model": "tiny-model0", "prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    "not_an_object": ("/v1/completions", b"[1, 2]", 422, None, "valid dictionary"),
    "body_too_large": ("/v1/completions", b"{" + b" " * (9 * 2**20) + b"}", 413, None, "too large"),
    "empty_body": ("/v1/completions", b"", 400, None, "missing"),
    "unknown_model": ("/v1/completions", {**GOOD, "model": "gpt-9"}, 404, "model", "not served"),
    "unknown_policy": ("/v1/completions", {**GOOD, "kv_policy": "nope"}, 400, "kv_policy", "policy must be one of"),
    "tiny_temperature": ("/v1/completions", {**GOOD, "temperature": 1e-40}, 422, "temperature",
                         "0 (greedy) or in [0.01, 2]"),
    "huge_seed": ("/v1/completions", {**GOOD, "temperature": 0.5, "seed": 2**64}, 422, "seed", "less than or equal"),
    "negative_seed": ("/v1/completions", {**GOOD, "temperature": 0.5, "seed": -1}, 422, "seed", "greater than"),
    "tiny_top_p": ("/v1/completions", {**GOOD, "temperature": 0.5, "top_p": 1e-50}, 422, "top_p", "greater than"),
    "budget_zero": ("/v1/completions", {**GOOD, "kv_budget": 0}, 422, "kv_budget", "greater than 0"),
    "budget_above_one": ("/v1/completions", {**GOOD, "kv_budget": 1.5}, 422, "kv_budget", "less than or equal"),
    "infeasible_budget": ("/v1/completions", {**GOOD, "kv_budget": 0.01}, 400, "kv_budget", "minimum feasible"),
    "infeasible_budget_plan": ("/v1/plan", {"prompt": PROMPT, "kv_budget": 0.01}, 400, "kv_budget",
                               "minimum feasible"),
    "infeasible_budget_stream": ("/v1/chat/completions", {"model": "tiny-model0", "stream": True, "kv_budget": 0.01,
                                 "messages": [{"role": "user", "content": PROMPT}]}, 400, "kv_budget",
                                 "minimum feasible"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_4xx_with_openai_error_and_server_stays_healthy(http, case):
    route, body, status, param, text = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(route, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and text in error["message"], error
    assert http.get("/healthz").status_code == 200
    assert http.post("/v1/completions", json=GOOD).status_code == 200  # the next request is unaffected


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="minimum feasible"):
        client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=2, extra_body={"kv_budget": 0.01})
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=-3)


# ---------------------------------------------------------------------------- security
def test_api_key_enforced(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{server.url}/v1/completions", json=GOOD, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # probes stay open


def test_default_bind_is_loopback(server):
    listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_serve_cli_import_is_light_and_help_lists_flags():
    code = ("import sys, adaptive_kv.cli as c; p = c.build_parser(); "
            "bad = [m for m in ('fastapi', 'uvicorn', 'ray', 'torch', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "adaptive_kv.cli", "serve", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for flag in ("--policy-uri", "--max-queue", "--request-timeout", "--api-key-env", "--ray-serve", "--replicas"):
        assert flag in out


def test_serve_cli_rejects_unknown_policy_and_unset_key_before_loading():
    for args, text in ((["--policy", "nope"], "policy must be one of"),
                       (["--api-key-env", "ADAPTIVE_KV_SURELY_UNSET"], "unset or empty"),
                       (["--api-key-env", "ADAPTIVE_KV_TEST_KEYS"], "an empty key in the comma-separated list")):
        done = subprocess.run([sys.executable, "-m", "adaptive_kv.cli", "serve", *args], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "ADAPTIVE_KV_TEST_KEYS": "key-a,,key-b"})
        assert done.returncode == 2 and text in done.stderr, done.stderr


def test_server_refuses_to_start_with_a_policy_that_cannot_plan_for_its_model(tmp_path, model_dir):
    # the shipped `learned` controller was trained for SmolLM2-135M (head_dim 64), not the tiny model
    try:
        server = start_server(tmp_path, ["--model", str(model_dir), "--policy", "learned"], ready_timeout=90)
    except RuntimeError as exc:
        assert "cannot plan for model" in str(exc)
        return
    server.stop()  # never leave a server behind, even when this test fails
    pytest.fail("the server started with a policy that cannot plan for its model")


# ---------------------------------------------------------------------------- reload
@pytest.fixture
def admin(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def restore_policy(admin):
    yield
    assert admin.post("/v1/admin/reload", json={"policy": "hybrid"}).status_code == 200


def test_reload_takes_the_admin_key_only(server, http, admin, client, restore_policy):
    """The API key (every client holds it) cannot swap the policy; the admin key cannot call the API."""
    by_api_key = http.post("/v1/admin/reload", json={"policy": "snapkv"})
    assert by_api_key.status_code == 403 and by_api_key.json()["error"]["code"] == "admin_key_required"
    assert httpx.post(f"{server.url}/v1/admin/reload", json={"policy": "snapkv"}).status_code == 401
    assert _kv(client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=2))["policy"] == "hybrid"
    assert admin.post("/v1/admin/reload", json={"policy": "snapkv"}).json()["policy"] == "snapkv"
    assert admin.post("/v1/completions", json={**GOOD, "max_tokens": 1}).status_code == 401


def test_serve_refuses_an_admin_key_equal_to_the_api_key(capsys, monkeypatch):
    from adaptive_kv.cli import main

    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    monkeypatch.setenv(ADMIN_KEY_ENV, API_KEY)
    assert main(["serve", "--policy", "full", "--api-key-env", API_KEY_ENV, "--admin-key-env", ADMIN_KEY_ENV]) == 2
    assert "the admin key must differ from the API key" in capsys.readouterr().err


def test_reload_switches_policy_and_keeps_it_on_failure(server, admin, client, restore_policy):
    http = admin
    response = http.post("/v1/admin/reload", json={"policy": "snapkv"})
    assert response.status_code == 200 and response.json()["policy"] == "snapkv"
    assert _kv(client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=2))["policy"] == "snapkv"
    for body, text in (({"policy_uri": "/no/such/controller"}, "neither models:/"), ({"policy": "nope"}, "nope")):
        failed = http.post("/v1/admin/reload", json=body)
        assert failed.status_code == 400 and "keeping policy 'snapkv'" in failed.json()["error"]["message"]
        assert text in failed.json()["error"]["message"]
    assert _kv(client.completions.create(model="tiny-model0", prompt=PROMPT, max_tokens=2))["policy"] == "snapkv"


# ---------------------------------------------------------------------------- bounded load
def test_bounded_load_every_request_200_or_429_and_metrics_add_up(server, http):
    before = http.get("/metrics").text
    body = {**GOOD, "max_tokens": 120}
    total = 64

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=total)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=90) as ac:
            return await asyncio.wait_for(asyncio.gather(*(ac.post("/v1/completions", json=body)
                                                           for _ in range(total))), 120)

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    ok, refused = statuses.count(200), statuses.count(429)
    print(f"bounded load: {total} sent, {ok} x 200, {refused} x 429")  # for the figures (pytest -s)
    assert ok + refused == total, sorted(set(statuses))
    assert ok >= MAX_QUEUE and refused > 0, (ok, refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in responses if r.status_code == 429)
    after = http.get("/metrics").text
    route = "/v1/completions"

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("adaptive_kv_requests_total", route=route, status="200") == ok
    assert delta("adaptive_kv_requests_total", route=route, status="429") == refused
    assert delta("adaptive_kv_prefill_seconds_count") == ok
    assert delta("adaptive_kv_generated_tokens_total") == sum(r.json()["usage"]["completion_tokens"]
                                                              for r in responses if r.status_code == 200)
    assert metric(after, "adaptive_kv_queue_depth") == 0 and metric(after, "adaptive_kv_requests_running") == 0
    assert delta("adaptive_kv_kv_full_bytes_total") > 4 * delta("adaptive_kv_kv_bytes_total") * 0.99


# ---------------------------------------------------------------------------- clients that leave
def test_client_that_disconnects_before_its_response_frees_its_place(server, http):
    """A plain request whose client hangs up is dropped from the batch, not decoded to the end."""
    before = http.get("/metrics").text
    body = {**GOOD, "max_tokens": 512, "kv_budget": 1.0, "kv_policy": "full"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 512 tokens are decoded
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.3) as c:
            c.post("/v1/completions", json=body)
    deadline = time.monotonic() + 5
    while True:
        after = http.get("/metrics").text
        if metric(after, "adaptive_kv_requests_running") == 0 and metric(
                after, "adaptive_kv_requests_total", route="/v1/completions", status="499") > metric(
                before, "adaptive_kv_requests_total", route="/v1/completions", status="499"):
            break
        assert time.monotonic() < deadline, "the dropped request kept running"
        time.sleep(0.05)
    # dropped mid-decode: no tokens counted as generated, its prefill was
    assert metric(after, "adaptive_kv_generated_tokens_total") == metric(before, "adaptive_kv_generated_tokens_total")


# ---------------------------------------------------------------------------- graceful shutdown
def test_graceful_shutdown_finishes_in_flight_request(tmp_path, model_dir):
    srv = start_server(tmp_path, ["--model", str(model_dir), "--max-tokens-cap", "2048", "--request-timeout", "60"])
    try:
        reload = httpx.post(f"{srv.url}/v1/admin/reload", json={"policy": "snapkv"})
        assert reload.status_code == 403  # no admin key configured: the admin endpoint stays off
        result: dict = {}

        def long_request() -> None:
            body = {**GOOD, "max_tokens": 400}
            result["response"] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 30
        while metric(httpx.get(f"{srv.url}/metrics").text, "adaptive_kv_requests_running") < 1:
            assert time.monotonic() < deadline, "request never started"
            time.sleep(0.05)
        code = srv.stop(timeout=90)
        worker.join(120)
    finally:
        srv.stop()
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 200
    assert code in STOPPED and "Application shutdown complete" in srv.log_tail(), srv.log_tail()


def test_an_unauthenticated_request_is_refused_before_its_body_is_read(server):
    # an unparseable body is a 400 once read: without a key it is a 401, with one the 400
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    authed = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    assert authed.status_code == 400 and authed.json()["error"]["code"] != "invalid_api_key"


def test_bearer_middleware_never_reads_a_refused_body():
    import asyncio

    from adaptive_kv.services.app import _BearerAuth

    async def app(scope, receive, send):
        raise AssertionError("the wrapped app must not run")

    async def receive():
        raise AssertionError("the body must not be read")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/completions", "headers": [(b"authorization", b"Bearer nope")],
             "method": "POST"}
    asyncio.run(_BearerAuth(app, "secret")(scope, receive, send))
    assert sent[0]["status"] == 401


def test_probes_say_no_more_than_readiness(server):
    body = httpx.get(f"{server.url}/readyz").json()
    assert body == {"status": "ready", "model": body["model"]}  # no policy folder or registry URI for anyone
