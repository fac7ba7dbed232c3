"""FastAPI routes: parse the request, call the engine, serialise the answer. Nothing else lives here."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptive_kv.services import protocol as p
from adaptive_kv.services.engine import Engine, EngineError, GenerationOutput, GenerationRequest, Sampling, TextDelta
from adaptive_kv.services.policy_source import PolicySpec

logger = logging.getLogger(__name__)

_STATUS = {"invalid_request": 400, "not_found": 404, "queue_full": 429, "timeout": 504, "unavailable": 503,
           "internal": 500, "unauthorized": 401, "forbidden": 403}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error", 504: "timeout_error"}
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/plan", "/v1/admin/reload", "/healthz",
          "/readyz", "/metrics")
REPLICA_HEADER = "x-adaptive-kv-replica"
PROTECTED_PREFIX = "/v1/"  # the API; probes and metrics stay open
ADMIN_PREFIX = "/v1/admin/"  # takes the admin key alone: a leaked API key must not swap the policy


# A 128k-token prompt is about 1 MB as text or token ids; anything far larger is refused before it is parsed
# (JSON parsing runs on the event loop).
MAX_BODY_BYTES = 8 * 2**20


@dataclass(frozen=True)
class AppConfig:
    """HTTP-side settings: the served model id, the optional API key, the request body limit."""

    served_model: str
    api_key: str | None = None
    admin_key: str | None = None  # the only key /v1/admin/reload takes; None: reload is off
    reload_refusal: str | None = None  # why reload cannot reach every replica (Ray Serve, several replicas)
    max_body_bytes: int = MAX_BODY_BYTES
    replica: str = f"{os.uname().nodename}:{os.getpid()}"


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with its status."""
    body = p.ErrorResponse(error=p.ErrorBody(message=message, type=_TYPES.get(status, "error"), param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _engine_error(exc: EngineError, retry_after: int) -> JSONResponse:
    status = _STATUS.get(exc.kind, 500)
    headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(status, exc.message, exc.param, exc.code, headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field; 400 when the body is not JSON (or not UTF-8) at all."""
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": (), "type": "value_error"}
    if first.get("type") == "json_invalid":
        return error_response(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "missing" and field is None:
        return error_response(400, "request body is missing (send a JSON object)", code="invalid_json")
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return error_response(422, message, param=field, code=first.get("type"))


_DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
_CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the metrics count it


class _Counting:
    """ASGI middleware counting every HTTP response by route and status (streaming included)."""

    def __init__(self, app: Any, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            self.engine.metrics.requests.labels(route=route, status=str(status)).inc()

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                count(message["status"])  # before the client can read the response: /metrics is never behind it
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not counted:  # failed before any response started
                count(500)


class _ReplicaHeader:
    """ASGI middleware naming the replica that answered (Ray Serve tests, debugging). Plain ASGI, unlike
    `@app.middleware`, so an endpoint can still see its client disconnect."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named_send)


class _BodyLimit:
    """ASGI middleware answering 413 to request bodies over `max_bytes` (declared or streamed) unread."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        if declared:
            return await self.app(scope, receive, send)
        messages, size = [], 0  # chunked: read it here, within the limit, then replay it
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        message = f"request body too large: the limit is {self.max_bytes} bytes"
        await error_response(413, message, code="body_too_large")(scope, receive, send)


def _bearer_matches(scope: dict, key: bytes | None) -> bool:
    """Whether the request sends `Authorization: Bearer <key>` (constant-time compare)."""
    scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
    return key is not None and scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def tenant_of(key: bytes) -> str:
    """A tenant's name in the engine: a digest of its API key (the key itself is never kept beside its data)."""
    return hashlib.sha256(key).hexdigest()[:16]


class _BearerAuth:
    """ASGI middleware answering 401 to an API request without `Authorization: Bearer <key>` (constant-time
    compare) before its body is read: an unauthenticated client costs neither parsing nor tokenising.
    Admin routes take the admin key only: 403 when reload is off or for the API key, 401 for anything else."""

    def __init__(self, app: Any, api_key: str | None, admin_key: str | None = None) -> None:
        # several comma-separated keys: one per tenant; stored contexts never cross tenants
        self.app, self.keys = app, () if api_key is None else tuple(k.strip().encode() for k in api_key.split(",") if k.strip())
        self.admin_key = None if admin_key is None else admin_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(ADMIN_PREFIX):
            return await self._admin(scope, receive, send)
        if not self.keys or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        for key in self.keys:  # every key is compared, so the time taken does not tell which matched
            if _bearer_matches(scope, key):
                scope.setdefault("state", {})["tenant"] = tenant_of(key)
        if "tenant" in scope.get("state", {}):
            return await self.app(scope, receive, send)
        refused = error_response(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await refused(scope, receive, send)

    async def _admin(self, scope: dict, receive: Any, send: Any) -> None:
        if self.admin_key is None:
            refused = error_response(403, "reload is disabled: start the server with --admin-key-env to enable it",
                                     code="reload_disabled")
        elif _bearer_matches(scope, self.admin_key):
            return await self.app(scope, receive, send)
        elif any(_bearer_matches(scope, key) for key in self.keys):
            refused = error_response(403, "the API key cannot use admin routes: send the admin key "
                                          "(--admin-key-env)", code="admin_key_required")
        else:
            refused = error_response(401, "invalid or missing admin key (send Authorization: Bearer <admin key>)",
                                     code="invalid_admin_key", headers={"WWW-Authenticate": "Bearer"})
        await refused(scope, receive, send)


def create_app(engine: Engine, config: AppConfig) -> FastAPI:
    """The FastAPI app over `engine` (started in the lifespan, closed after in-flight requests finish)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Load the engine before serving; stop it after uvicorn drained the requests."""
        if not engine.ready:
            await asyncio.to_thread(engine.start)  # model load: seconds, off the loop
        yield
        await asyncio.to_thread(engine.close)  # uvicorn has already drained the in-flight requests

    app = FastAPI(title="adaptive-kv", lifespan=lifespan, docs_url=None, redoc_url=None)
    retry_after = max(1, int(engine.config.request_timeout // 10))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Pydantic errors as OpenAI errors naming the field."""
        return _validation_error(exc)

    @app.exception_handler(EngineError)
    async def on_engine(request: Request, exc: EngineError) -> JSONResponse:
        """Engine refusals with their status (429 and 503 with Retry-After)."""
        return _engine_error(exc, retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette errors (unknown route, bad body) in the OpenAI shape."""
        if exc.status_code == 400:  # FastAPI's body parser: bytes that are not UTF-8 never reach the JSON decoder
            return error_response(400, f"{exc.detail}: send a UTF-8 encoded JSON object", code="invalid_json")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Anything unforeseen: logged with its traceback, answered in the OpenAI shape without it."""
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")

    def check_model(model: str | None) -> None:
        """404 unless `model` is the served one (its id or the --model value)."""
        if model is not None and model not in (config.served_model, engine.config.model):
            raise EngineError(f"model {model!r} is not served here; this server serves {config.served_model!r}",
                              kind="not_found", param="model", code="model_not_found")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: model and policy loaded, worker running. Open to probes, so it names no folder or URI."""
        ready = engine.ready
        body = {"status": "ready" if ready else "not ready", "model": config.served_model}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition of this replica's metrics."""
        body, content_type = engine.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        """The served model, with its default KV policy and budget."""
        card = p.ModelCard(id=config.served_model, created=p.now(), max_model_len=engine.context,
                           kv_policy=engine.policy_name, kv_budget=engine.config.budget)
        return p.ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, http: Request) -> Response:
        """OpenAI completions over the raw prompt (no chat template)."""
        check_model(body.model)
        ids = await asyncio.to_thread(engine.encode_text, body.prompt)
        request = _generation_request(engine, body, ids, body.max_tokens, "prompt", http)
        return await _respond(engine, body, request, _CompletionShape(config.served_model, body.stream), http)

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatCompletionRequest, http: Request) -> Response:
        """OpenAI chat completions through the tokenizer's chat template."""
        check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        ids = await asyncio.to_thread(engine.encode_chat, messages)
        context = await asyncio.to_thread(engine.context_tokens, messages, ids)
        request = _generation_request(engine, body, ids, body.token_limit(), "messages", http, context)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _respond(engine, body, request, _ChatShape(config.served_model, usage), http)

    @app.post("/v1/plan")
    async def plan(body: p.PlanRequest) -> p.PlanResponse:
        """The plan the policy picks for a prompt, and its predicted bytes, without generating."""
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise EngineError("give exactly one of prompt or messages", param="prompt")
        if body.prompt is not None:
            ids = await asyncio.to_thread(engine.encode_text, body.prompt)
        else:
            ids = await asyncio.to_thread(engine.encode_chat, [m.model_dump(exclude_none=True) for m in body.messages])
        engine.check_request(ids, 1, "prompt")
        out = await engine.plan(ids, body.kv_budget, body.kv_policy)
        return p.PlanResponse(model=config.served_model, prompt_tokens=out.prompt_tokens,
                              kv_cache=p.KVCacheInfo(**out.kv), plan=out.plan)

    @app.post("/v1/admin/reload")
    async def reload(body: p.ReloadRequest | None = None) -> dict[str, Any]:
        """Re-resolve the policy (a new champion) or switch to another; the old one stays on failure."""
        if config.admin_key is None:  # the middleware refuses first; this keeps the route closed without it
            raise EngineError("reload is disabled: start the server with --admin-key-env to enable it",
                              kind="forbidden", code="reload_disabled")
        if config.reload_refusal is not None:
            raise EngineError(config.reload_refusal, kind="forbidden", code="reload_needs_redeploy")
        spec = None
        if body is not None and (body.policy or body.policy_uri):
            spec = PolicySpec(name=body.policy or "learned", uri=body.policy_uri)
        loaded = await engine.reload(spec)
        return {"status": "reloaded", "policy": loaded.spec.describe(), "source": loaded.source}

    app.add_middleware(_ReplicaHeader, replica=config.replica)
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(_BearerAuth, api_key=config.api_key, admin_key=config.admin_key)  # before any body is read
    app.add_middleware(_Counting, engine=engine)  # outermost: sees every response, errors included
    return app


def _generation_request(engine: Engine, body: p.CompletionRequest | p.ChatCompletionRequest, ids: tuple[int, ...],
                        max_tokens: int | None, prompt_param: str, http: Request,
                        context_tokens: int = 0) -> GenerationRequest:
    """The engine's request from a parsed body (checks the context and the max_tokens cap)."""
    wanted = engine.check_request(ids, max_tokens, prompt_param)
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    tenant = getattr(http.state, "tenant", "")
    return GenerationRequest(ids, wanted, body.kv_budget, body.kv_policy, sampling, body.stop_strings(), tenant,
                             context_tokens)


class _CompletionShape:
    """Serialises engine events as text_completion objects."""

    def __init__(self, model: str, stream: bool) -> None:
        self.model, self.id, self.created = model, p.new_id("cmpl"), p.now()

    def final(self, out: GenerationOutput) -> BaseModel:
        """The whole response of a non-streamed request."""
        choice = p.CompletionChoice(text=out.text, finish_reason=out.finish_reason)
        return p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                    usage=_usage(out), kv_cache=p.KVCacheInfo(**out.kv))

    def chunks(self, event: TextDelta | GenerationOutput) -> list[BaseModel]:
        """The server-sent events for one engine event."""
        if isinstance(event, TextDelta):
            choice = p.CompletionChoice(text=event.text, finish_reason=None)
            return [p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])]
        choice = p.CompletionChoice(text="", finish_reason=event.finish_reason)
        return [p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                     usage=_usage(event), kv_cache=p.KVCacheInfo(**event.kv))]


class _ChatShape:
    """Serialises engine events as chat.completion objects and chunks."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model, self.id, self.created, self.include_usage = model, p.new_id("chatcmpl"), p.now(), include_usage
        self.started = False

    def final(self, out: GenerationOutput) -> BaseModel:
        """The whole response of a non-streamed request."""
        choice = p.ChatChoice(message=p.ChatResponseMessage(content=out.text), finish_reason=out.finish_reason)
        return p.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                        usage=_usage(out), kv_cache=p.KVCacheInfo(**out.kv))

    def _chunk(self, choices: list[p.ChatChunkChoice], **extra: Any) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def chunks(self, event: TextDelta | GenerationOutput) -> list[BaseModel]:
        """The server-sent events for one engine event."""
        out: list[BaseModel] = []
        if not self.started:  # OpenAI sends the role first, on its own
            self.started = True
            out.append(self._chunk([p.ChatChunkChoice(delta=p.ChatDelta(role="assistant", content=""))]))
        if isinstance(event, TextDelta):
            out.append(self._chunk([p.ChatChunkChoice(delta=p.ChatDelta(content=event.text))]))
            return out
        last = p.ChatChunkChoice(delta=p.ChatDelta(), finish_reason=event.finish_reason)
        out.append(self._chunk([last], kv_cache=p.KVCacheInfo(**event.kv)))
        if self.include_usage:
            out.append(self._chunk([], usage=_usage(event)))
        return out


def _usage(out: GenerationOutput) -> p.Usage:
    return p.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                   total_tokens=out.prompt_tokens + out.completion_tokens)


async def _unless_gone(http: Request, awaitable: Any) -> Any:
    """`awaitable`'s result; cancelled (and the request dropped by the engine) once the client disconnects."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await http.is_disconnected():
            task.cancel()
            raise _ClientGone()


class _ClientGone(Exception):
    """The client closed its connection before the response began."""


async def _respond(engine: Engine, body: Any, request: GenerationRequest, shape: Any, http: Request) -> Response:
    """JSON for a plain request; server-sent events for `stream`, begun only once the first event exists,
    so a full queue, an infeasible budget or a prefill error still gets its proper status code. A client
    that disconnects before its response begins frees its place in the queue or the batch at once."""
    try:
        if not body.stream:
            return JSONResponse(shape.final(await _unless_gone(http, engine.complete(request))).model_dump())
        events = engine.generate(request)
        first = await _unless_gone(http, anext(events))
    except _ClientGone:
        return Response(status_code=_CLIENT_CLOSED)

    async def sse() -> AsyncIterator[bytes]:
        try:
            event = first
            while True:
                for chunk in shape.chunks(event):
                    yield f"data: {chunk.model_dump_json()}\n\n".encode()
                if isinstance(event, GenerationOutput):
                    break
                event = await anext(events)
        except EngineError as exc:  # headers are sent: the error travels as an event (OpenAI does the same)
            error = p.ErrorBody(message=exc.message, type=_TYPES.get(_STATUS.get(exc.kind, 500), "error"),
                                code=exc.code)
            yield f"data: {json.dumps({'error': error.model_dump()})}\n\n".encode()
        finally:
            await events.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
