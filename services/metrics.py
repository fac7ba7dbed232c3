"""Prometheus metrics of one engine, on its own registry (several engines may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Prefill of 1k tokens takes seconds on CPU, milliseconds on a GPU: buckets span both.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATIO_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)


class Metrics:
    """The service's counters, histograms and gauges (Prometheus naming: _total, _seconds, _bytes)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaptive_kv_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prefill = Histogram("adaptive_kv_prefill_seconds", "Prefill (and planning) time per request",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.decode = Histogram("adaptive_kv_decode_seconds", "Decode time per request (all generated tokens)",
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("adaptive_kv_queue_wait_seconds", "Time a request waited for the worker",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("adaptive_kv_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("adaptive_kv_generated_tokens", "Tokens generated", registry=r)
        self.kv_full_bytes = Counter("adaptive_kv_kv_full_bytes",
                                     "KV bytes a full-precision cache would hold after prefill, summed", registry=r)
        self.kv_bytes = Counter("adaptive_kv_kv_bytes", "KV bytes really held after prefill, summed", registry=r)
        self.ratio = Histogram("adaptive_kv_kv_compression_ratio", "Full / real KV bytes per request",
                               buckets=_RATIO_BUCKETS, registry=r)
        self.queue_depth = Gauge("adaptive_kv_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("adaptive_kv_requests_running", "Requests in prefill or decoding", registry=r)
        self.batch_size = Gauge("adaptive_kv_batch_size", "Requests decoding together in the running batch", registry=r)
        self.batch_peak = Gauge("adaptive_kv_batch_size_peak", "Most requests decoding together since start", registry=r)
        self.kv_limit = Gauge("adaptive_kv_kv_limit_bytes", "KV memory limit of this replica (--kv-memory)", registry=r)
        self.kv_in_use = Gauge("adaptive_kv_kv_in_use_bytes", "KV bytes the running caches really hold", registry=r)
        self.kv_peak = Gauge("adaptive_kv_kv_in_use_peak_bytes", "Most KV bytes held at once since start", registry=r)
        self.kv_reserved = Gauge("adaptive_kv_kv_reserved_bytes",
                                 "KV bytes reserved by admitted requests (what they hold or may grow to)", registry=r)
        self.tokens_per_second = Gauge("adaptive_kv_decode_tokens_per_second",
                                       "Tokens generated per second by the last decode step (all running requests)",
                                       registry=r)

        self.context_hits = Counter("adaptive_kv_context_hits", "Requests that decoded over a stored context",
                                    registry=r)
        self.context_misses = Counter("adaptive_kv_context_misses", "Requests that found no stored context to reuse",
                                      registry=r)
        self.context_evictions = Counter("adaptive_kv_context_evictions",
                                         "Stored contexts evicted to make room for requests", registry=r)
        self.stored_contexts = Gauge("adaptive_kv_stored_contexts", "Compressed contexts stored for reuse", registry=r)
        self.stored_context_bytes = Gauge("adaptive_kv_stored_context_bytes",
                                          "KV bytes the stored contexts hold (compressed)", registry=r)
        self.reused_tokens = Counter("adaptive_kv_reused_prompt_tokens",
                                     "Prompt tokens read from a stored context instead of prefilled", registry=r)

    def observe_kv(self, full_bytes: int, real_bytes: int) -> None:
        """Record one request's KV bytes after its plan was applied."""
        self.kv_full_bytes.inc(full_bytes)
        self.kv_bytes.inc(real_bytes)
        if real_bytes:
            self.ratio.observe(full_bytes / real_bytes)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
