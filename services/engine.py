"""The serving engine: one model, its policy, the scheduler that batches requests, metrics. No HTTP here.

Requests run through the scheduler (`scheduler`): each is prefilled and planned alone, then
decodes in one batch with every other running request, each over its own compressed cache.
Admission is by KV memory (`admission`): a request starts when the most its cache can hold fits
under `kv_memory` beside the running ones, so a policy that keeps fewer bytes runs more requests
at once. Requests beyond `max_queue` waiting are refused at once (QueueFull) instead of piling up
latency. A reload swaps the policy for requests that start their prefill afterwards; running
ones finish with the policy they took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import torch

from adaptive_kv.services.admission import KvLedger, format_bytes, resolve_kv_memory
from adaptive_kv.services.context_store import ContextKey, ContextStore, StoredContext
from adaptive_kv.services.decoding import Sampling, TextAssembler, make_sampler
from adaptive_kv.services.errors import EngineError
from adaptive_kv.services.metrics import Metrics
from adaptive_kv.services.planning import RequestPlanner
from adaptive_kv.services.policy_source import LoadedPolicy, PolicySpec, resolve_policy
from adaptive_kv.services.scheduler import Decoding, Job, QueueFull, Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, validated once."""

    model: str = "smollm2-135m"
    policy: PolicySpec = PolicySpec()
    budget: float = 0.25
    max_queue: int = 16
    request_timeout: float = 120.0
    max_tokens_cap: int = 1024
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    kv_memory: int | float | None = None  # bytes, or a fraction of free memory (None: admission.DEFAULT_FRACTION)
    max_batch: int = 64  # requests holding a cache at once (prefilling or decoding); 1 runs one at a time
    reuse_contexts: bool = False  # store compressed contexts and decode later requests that start with them over them

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if isinstance(self.kv_memory, float) and not 0 < self.kv_memory < 1:
            raise ValueError(f"kv_memory as a fraction must be in (0, 1), got {self.kv_memory}")
        if isinstance(self.kv_memory, int) and self.kv_memory < 1:
            raise ValueError(f"kv_memory must be >= 1 byte, got {self.kv_memory}")


@dataclass(frozen=True)
class GenerationRequest:
    """One request, already tokenised and checked against the context."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    budget: float | None = None
    policy: str | None = None
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    tenant: str = ""  # who sent it (a digest of its API key): stored contexts are reused by their tenant only
    # the first context_tokens of the prompt are a context to compress on its own (its plan decided without
    # the rest, query-agnostic) and store for reuse, when the engine reuses contexts; 0: none
    context_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.context_tokens < len(self.prompt_ids):
            raise ValueError(f"context_tokens must be in [0, {len(self.prompt_ids) - 1}] (a token must follow the "
                             f"context), got {self.context_tokens}")


@dataclass(frozen=True)
class TextDelta:
    """Streamed text (may be empty-held while a multi-byte character or a stop string is incomplete)."""

    text: str


@dataclass(frozen=True)
class GenerationOutput:
    """A finished request: text, token counts, why it stopped, its KV report and timings."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    kv: dict[str, Any]
    prefill_s: float
    decode_s: float


@dataclass(frozen=True)
class PlanOutput:
    """The plan for a prompt and its predicted bytes."""

    prompt_tokens: int
    plan: dict[str, Any]
    kv: dict[str, Any]


_CHECK_TOKENS = 64  # a prompt longer than any sink + recent window, short enough to cost milliseconds


class Engine:
    """Owns the model, the policy, the scheduler and the metrics."""

    def __init__(self, config: EngineConfig, loader: Callable[[str], tuple[Any, Any]] | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self._loader = loader
        self._scheduler: Scheduler | None = None
        self._closing = False
        self._policy: LoadedPolicy | None = None
        self._static: dict[str, Any] = {}  # per-request policies by name, built once
        self._reload_lock: asyncio.Lock | None = None  # made on the event loop that first reloads
        self.model = self.tokenizer = None
        self.kv_limit = 0
        self.contexts: ContextStore | None = None  # made with the ledger when config.reuse_contexts

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load the model and the policy on the worker thread (blocking: seconds), then serve."""
        self._policy = resolve_policy(self.config.policy)  # cheap, and fails before the slow model load
        self._scheduler = Scheduler(self.metrics, max_batch=self.config.max_batch, max_queue=self.config.max_queue,
                                    timeout_error=self._timeout_error)
        self._scheduler.start(self._setup)
        logger.info("engine ready: model %s, policy %s, budget %g, KV memory %s (%d bytes), max batch %d",
                    self.config.model, self.policy_name, self.config.budget, format_bytes(self.kv_limit),
                    self.kv_limit, self.config.max_batch)

    def _setup(self) -> tuple[Any, KvLedger]:
        """On the worker thread: the model, its end tokens and cache shape, the policy check and the KV limit."""
        from adaptive_kv.decode import end_tokens
        from adaptive_kv.memory import KvShape
        from adaptive_kv.models import load_model

        if self.config.threads is not None:
            # on a shared CPU, OpenMP threads spinning against other processes cost far more than they add
            torch.set_num_threads(self.config.threads)
        self.model, self.tokenizer = (self._loader or load_model)(self.config.model)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.eos = end_tokens(self.model, self.tokenizer)
        self.kv_shape = KvShape.of(self.model)
        self._check_policy(self._policy)  # a controller trained for another model fails here, not per request
        self.kv_limit = resolve_kv_memory(self.config.kv_memory, self.model.device)
        ledger = KvLedger(self.kv_limit)
        if self.config.reuse_contexts:
            self.contexts = ContextStore(ledger, self.metrics)
            self._scheduler.reclaim = self.contexts.make_room
        return self.model, ledger

    @property
    def ready(self) -> bool:
        """Model and policy loaded, worker alive, not shutting down."""
        return self._policy is not None and self._scheduler is not None and self._scheduler.alive and not self._closing

    @property
    def policy_name(self) -> str:
        """The default policy as reported in responses."""
        return self._policy.spec.describe() if self._policy else self.config.policy.describe()

    @property
    def peak_kv_bytes(self) -> int:
        """Most KV bytes the caches held at once since start (read between decode steps)."""
        return self._scheduler.peak_in_use if self._scheduler else 0

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, let the worker finish what it holds, then stop it."""
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.close(timeout)

    async def reload(self, spec: PolicySpec | None = None) -> LoadedPolicy:
        """Re-resolve the policy (a new champion) or switch to `spec`, checked on this model; on failure keep the old."""
        self._reload_lock = self._reload_lock or asyncio.Lock()
        async with self._reload_lock:
            spec = spec or (self._policy.spec if self._policy else self.config.policy)
            try:
                loaded = await asyncio.to_thread(resolve_policy, spec)  # may download from the registry
                work = _Forward(lambda: self._check_policy(loaded))  # on the worker: it owns the model
                async for _ in self._submit(work, self._capture_nbytes(_CHECK_TOKENS)):
                    pass
            except (ValueError, OSError, EngineError) as exc:
                reason = exc.message if isinstance(exc, EngineError) else str(exc)
                raise EngineError(f"reload failed, keeping policy {self.policy_name!r}: {reason}", param="policy",
                                  kind=exc.kind if isinstance(exc, EngineError) else "invalid_request") from exc
            self._policy = loaded  # one reference swap: requests already running keep the policy they took
            return loaded

    def _check_predictor(self, policy) -> None:
        """ValueError when the policy's reconstruction predictor was fitted for another model."""
        predictor = policy.stats_config().predictor
        if predictor is not None:
            predictor.check_model(self.model.config)

    @torch.inference_mode()
    def _check_policy(self, loaded: LoadedPolicy) -> bool:
        """Plan one short prompt at budget 1 with `loaded`: EngineError when it cannot plan for this model."""
        from adaptive_kv.prefill import capture, needs_of

        ids = tuple(i % self.model.config.vocab_size for i in range(_CHECK_TOKENS))
        try:
            self._check_predictor(loaded.policy)
            stats = capture(self.model, self.tokenizer, ids, needs_of([loaded.policy])).cache.stats
            loaded.policy.plan(stats, 1.0)
        except ValueError as exc:
            raise EngineError(f"policy {loaded.spec.describe()!r} cannot plan for model {self.config.model!r}: {exc}",
                              param="policy", code="policy_failed") from exc
        return True

    # ------------------------------------------------------------------ tokenising and checks
    def encode_text(self, prompt: str | list[int]) -> tuple[int, ...]:
        """Token ids of a raw prompt (no chat template), or the ids given, checked against the vocabulary."""
        if isinstance(prompt, list):
            vocab = self.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise EngineError(f"prompt token ids must be in [0, {vocab}), got {bad[:3]}", param="prompt")
            return tuple(prompt)
        from adaptive_kv.generation import encode_prompt

        try:
            return tuple(encode_prompt(self.tokenizer, prompt, chat=False))
        except ValueError as exc:
            raise EngineError(str(exc), param="prompt") from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[int, ...]:
        """Token ids of `messages` through the tokenizer's chat template, with the generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise EngineError("this model has no chat template; use /v1/completions", param="messages")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return tuple(ids["input_ids"] if isinstance(ids, dict) else ids)

    def context_tokens(self, messages: list[dict[str, str]], ids: tuple[int, ...]) -> int:
        """How many leading ids of a chat prompt are its earlier messages (the context its last message is
        asked over), when this engine reuses contexts; 0 when it does not, or the template does not render
        them as a prefix of the whole."""
        if not self.config.reuse_contexts or len(messages) < 2:
            return 0
        context = self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=False, tokenize=True,
                                                     return_dict=False)
        context = tuple(context["input_ids"] if isinstance(context, dict) else context)
        return len(context) if len(context) < len(ids) and ids[: len(context)] == context else 0

    def check_request(self, prompt_ids: tuple[int, ...], max_tokens: int | None, prompt_param: str) -> int:
        """The request's max_tokens (None: as many as fit under the cap); EngineError when over the context or cap."""
        cap = self.config.max_tokens_cap
        if max_tokens is not None and max_tokens > cap:
            raise EngineError(f"max_tokens must be <= {cap} on this server, got {max_tokens}", param="max_tokens",
                              code="max_tokens_exceeded")
        room = cap if self.context is None else self.context - len(prompt_ids)
        wanted = min(cap, room) if max_tokens is None else max_tokens
        if self.context is not None and (wanted < 1 or len(prompt_ids) + wanted > self.context):
            raise EngineError(
                f"this model's maximum context length is {self.context} tokens, but the request needs "
                f"{len(prompt_ids) + max(wanted, 1)} ({len(prompt_ids)} in the prompt, {max(wanted, 1)} to generate)",
                param=prompt_param, code="context_length_exceeded",
            )
        return wanted

    def policy_for(self, name: str | None) -> tuple[str, Any]:
        """(reported name, policy) for a request: the default, or a registered one by name."""
        if name is None:
            loaded = self._policy
            return loaded.spec.describe(), loaded.policy
        if name not in self._static:
            from adaptive_kv.policies import available_policies, get_policy

            try:
                policy = get_policy(name)
            except ValueError as exc:  # an unknown name, or a known one whose files are missing
                code = "unknown_policy" if name not in available_policies() else "policy_unavailable"
                raise EngineError(str(exc), param="kv_policy", code=code) from exc
            try:  # a scorer fitted for another model: the client's choice, refused before any work
                self._check_predictor(policy)
            except ValueError as exc:
                raise EngineError(f"kv_policy {name!r}: {exc}", param="kv_policy", code="policy_failed") from exc
            self._static[name] = policy
        return name, self._static[name]

    # ------------------------------------------------------------------ async API (event loop side)
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationOutput]:
        """Queue a generation and yield its text deltas, then its GenerationOutput."""
        name, policy = self.policy_for(request.policy)  # an unknown name fails here, before taking a queue slot
        reserve = self._request_nbytes(len(request.prompt_ids), request.max_tokens)
        async for event in self._submit(_Generation(self, request, name, policy), reserve):
            yield event

    async def complete(self, request: GenerationRequest) -> GenerationOutput:
        """Queue a generation and return its output."""
        async for event in self.generate(request):
            if isinstance(event, GenerationOutput):
                return event
        raise EngineError("generation ended without output", kind="unavailable")

    async def plan(self, prompt_ids: tuple[int, ...], budget: float | None, policy: str | None) -> PlanOutput:
        """Queue a prefill that only plans, and return the plan."""
        self.policy_for(policy)
        work = _Forward(lambda: self._plan(prompt_ids, budget, policy))
        async for event in self._submit(work, self._capture_nbytes(len(prompt_ids))):
            return event
        raise EngineError("planning ended without output", kind="unavailable")

    def _request_nbytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """What a generation reserves; EngineError when even an idle server could not hold it."""
        nbytes = self.kv_shape.request_bound_nbytes(prompt_tokens, max_tokens)
        if nbytes > self.kv_limit:
            raise EngineError(
                f"the request may need {format_bytes(nbytes)} of KV cache ({prompt_tokens} prompt tokens, "
                f"max_tokens {max_tokens}), more than this server's KV memory of {format_bytes(self.kv_limit)}; "
                "send a shorter prompt or fewer max_tokens", param="prompt", code="kv_memory_exceeded")
        return nbytes

    def _capture_nbytes(self, prompt_tokens: int) -> int:
        """What a prefill that only reads statistics reserves: its prompt at full precision."""
        return min(prompt_tokens * self.kv_shape.slot_nbytes(), self.kv_limit)

    async def _submit(self, work: Any, reserve: int) -> AsyncIterator[Any]:
        if not self.ready:
            raise EngineError("the server is starting or shutting down", kind="unavailable")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(work, lambda e: _push(loop, events, e), time.monotonic() + self.config.request_timeout, reserve)
        try:
            self._scheduler.submit(job)
        except QueueFull:
            raise EngineError(f"the queue is full ({self.config.max_queue} waiting); retry later",
                              kind="queue_full", code="queue_full") from None
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
                    # that arrives as an event does, and a client that left would be decoded to the end
                    async with asyncio.timeout(max(job.deadline - time.monotonic(), 0.0)):
                        event = await events.get()
                except TimeoutError:
                    raise self._timeout_error() from None
                if isinstance(event, BaseException):
                    raise event
                yield event
                if not isinstance(event, TextDelta):
                    return
        finally:
            job.cancelled.set()  # client gone, timed out or done: the worker drops it at its next step

    def _timeout_error(self) -> EngineError:
        return EngineError(f"request timed out after {self.config.request_timeout:g}s", kind="timeout", code="timeout")

    # ------------------------------------------------------------------ worker side
    def _planner(self, name: str, policy: Any, budget: float | None, chosen: bool) -> RequestPlanner:
        """The plan provider of one request: `budget` (explicit) must be met; the default may fall back."""
        return RequestPlanner(name, policy, budget if budget is not None else self.config.budget, budget is None, chosen)

    @torch.inference_mode()
    def _plan(self, prompt_ids: tuple[int, ...], budget: float | None, policy_name: str | None) -> PlanOutput:
        from adaptive_kv.prefill import capture, needs_of

        name, policy = self.policy_for(policy_name)
        planner = self._planner(name, policy, budget, policy_name is not None)
        stats = capture(self.model, self.tokenizer, prompt_ids, needs_of([policy])).cache.stats
        plan = planner(stats)
        seq_len = len(prompt_ids)
        full = plan.full_nbytes(seq_len, stats.head_dim, stats.dtype_bytes)
        predicted = plan.nbytes(seq_len, stats.head_dim, stats.dtype_bytes)
        report = {"full_bytes": full, "bytes": predicted, "ratio": full / predicted if predicted else None,
                  "plan": plan.summary()}
        return PlanOutput(seq_len, plan.to_dict(), planner.info(report, name))


class _Forward:
    """Work that only runs a forward (a plan, a policy check) and answers with its result."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.prefill = fn

    def prefilled(self, result: Any, seconds: float, job: Job) -> Any:
        return result


class _Generation:
    """One generation: prefill and plan its prompt, then decode in the batch, streaming its text."""

    def __init__(self, engine: Engine, request: GenerationRequest, name: str, policy: Any) -> None:
        self.engine, self.request, self.name = engine, request, name
        self.planner = engine._planner(name, policy, request.budget, request.policy is not None)
        self.policy = policy
        self.key = ContextKey(request.tenant, name, self.planner.budget, policy)
        self.cache = None
        self.kv: dict[str, Any] = {}
        self.base_kv: dict[str, Any] | None = None  # the planning report of a reused context
        self.reused = 0  # prompt tokens read from a stored context
        self.prefill_s = 0.0
        self.decode_start = 0.0

    def prefill(self) -> torch.Tensor:
        """On the prefill thread: the prompt through the model into a cache that plans when it ends, or only
        the rest of it over a copy of the longest stored context it starts with."""
        ids, store = self.request.prompt_ids, self.engine.contexts
        base = None if store is None else store.longest(self.key, ids)
        self.reused = 0 if base is None else len(base.ids)
        self.engine.metrics.reused_tokens.inc(self.reused)
        boundary = self.request.context_tokens
        if store is not None and boundary and self.reused < boundary:
            base = self._context(base, ids[:boundary]) or base
        if base is None:
            self.cache = self._compressing_cache(ids)
            return self._forward(ids, self.cache)
        self.base_kv, self.cache = base.kv, base.cache.share()
        return self._forward(ids[len(base.ids):], self.cache)

    def _compressing_cache(self, ids: tuple[int, ...], planner: RequestPlanner | None = None) -> Any:
        from adaptive_kv.cache import CompressedCache
        from adaptive_kv.prefill import cache_inputs, needs_of

        return CompressedCache(self.engine.model, plan_provider=planner or self.planner,
                               **cache_inputs(self.engine.tokenizer, ids, needs_of([self.policy])))

    def _forward(self, ids: tuple[int, ...], cache: Any) -> torch.Tensor:
        """The last position's logits of `ids` run into `cache` (a prefill, or a suffix after compression)."""
        model = self.engine.model
        return model(torch.tensor([list(ids)], device=model.device), cache=cache, logits_to_keep=1).logits[:, -1]

    def _context(self, base: StoredContext | None, context: tuple[int, ...]) -> StoredContext | None:
        """The request's context compressed on its own (or a stored shorter one extended to it), stored for
        the requests that follow; this request reads it even when it cannot be stored. None when the
        context alone is too short for the budget (sinks and recent window stay in full precision): the
        whole prompt is then planned as one, as without reuse."""
        if base is None:
            planner = RequestPlanner(self.name, self.policy, self.planner.budget, False, self.planner.chosen)
            cache = self._compressing_cache(context, planner)
            try:
                self._forward(context, cache)
            except EngineError as exc:
                if exc.code == "budget_infeasible":
                    return None
                raise
            kv = planner.info(cache.report(), self.name)
        else:
            cache, kv = base.cache.share(), base.kv
            self._forward(context[len(base.ids):], cache)
        stored = self.engine.contexts.put(self.key, context, cache, kv)
        return stored or StoredContext(self.key, context, cache, 0, kv)

    def prefilled(self, logits: torch.Tensor, seconds: float, job: Job) -> Decoding:
        engine, metrics = self.engine, self.engine.metrics
        self.prefill_s, self.decode_start = seconds, time.perf_counter()
        report = self.cache.report()
        if self.base_kv is None:
            self.kv = self.planner.info(report, self.name)
        else:  # the plan is the stored context's; the bytes are this copy's, its suffix included
            self.kv = {**self.base_kv, **{k: report[k] for k in ("full_bytes", "bytes", "ratio")}}
        prefilled = len(self.request.prompt_ids) - self.reused
        self.kv.update(reused_tokens=self.reused, prefilled_tokens=prefilled)
        metrics.prefill.observe(seconds)
        metrics.prompt_tokens.inc(prefilled)
        metrics.observe_kv(self.kv["full_bytes"], self.kv["bytes"])
        self.decoder = TextAssembler(engine.tokenizer, self.request.stop)
        self.job = job

        def stream(tokens: list[int]) -> bool:
            delta, stopped = self.decoder.add(tokens[-1])
            if delta:
                job.emit(TextDelta(delta))
            return stopped

        reserve = engine.kv_shape.decoding_bound_nbytes(self.cache, self.request.max_tokens)
        return Decoding(self.cache, logits, self.request.max_tokens, self.finish, eos=engine.eos,
                        pick=make_sampler(self.request.sampling), on_token=stream, reserve=reserve)

    def finish(self, decoded: Any) -> GenerationOutput | EngineError:
        cache, self.cache = self.cache, None  # the request's bytes leave with it
        if decoded.finish == "cancelled":
            return self.engine._timeout_error()
        tail = self.decoder.flush()
        if tail:
            self.job.emit(TextDelta(tail))
        decode_s = time.perf_counter() - self.decode_start
        metrics = self.engine.metrics
        metrics.decode.observe(decode_s)
        metrics.generated_tokens.inc(len(self.decoder.tokens))
        final = cache.report()
        self.kv.update(final_full_bytes=final["full_bytes"], final_bytes=final["bytes"])
        self._store(cache, decoded.tokens)
        return GenerationOutput(self.decoder.text, len(self.request.prompt_ids), len(self.decoder.tokens),
                                decoded.finish, self.kv, self.prefill_s, decode_s)


    def _store(self, cache: Any, tokens: list[int]) -> None:
        """Keep a finished request's cache as a stored context (its prompt and the tokens it decoded): the
        next turn of a conversation starts with them."""
        store = self.engine.contexts
        if store is None:
            return
        prompt = self.request.prompt_ids
        held = cache.get_seq_length()  # the last token picked was never run through the model
        ids = prompt + tuple(tokens[: held - len(prompt)])
        kv = {k: v for k, v in self.kv.items() if k not in ("reused_tokens", "prefilled_tokens", "final_full_bytes",
                                                            "final_bytes")}
        store.put(self.key, ids, cache, self.base_kv or kv)


# ---------------------------------------------------------------------- helpers
def _push(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event: Any) -> None:
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:  # the loop closed (server stopping): nobody is waiting for this event
        pass
