"""Prometheus metrics with vLLM's names under the `gptstack:` prefix (`GET /metrics`).

Each server has its own registry, so several apps (tests) can live in one process. The engine threads
count tokens, latencies and finished requests as they happen; the gauges (running, waiting, KV usage,
prefix hits, preemptions) are set at scrape time from each runner's published `EngineStats`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptstack.serve.runner import EngineRunner, EngineStats

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TOKEN_LATENCY = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        model = ("model_name",)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"gptstack:{name}", doc, model, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"gptstack:{name}", doc, model, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = model) -> Counter:
            return Counter(f"gptstack:{name}", doc, labels, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prefix = gauge(
            "prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens queried."
        )
        self.preemptions = gauge("num_preemptions", "Preemptions since start.")
        self.ttft_h = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY)
        self.tpot_h = histogram(
            "time_per_output_token_seconds", "Mean time per output token after the first, per request.", _TOKEN_LATENCY
        )
        self.itl_h = histogram("inter_token_latency_seconds", "Time between output tokens.", _TOKEN_LATENCY)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.success = counter("request_success", "Finished requests by finish reason.", (*model, "finished_reason"))
        self.cache_hits = counter("response_cache_hits", "Responses served from the gateway's cache.", ("cache",))
        self.rejected = counter("requests_rejected", "Requests refused by the gateway, by reason.", ("reason",))
        self.http = counter("http_requests", "HTTP responses by route and status.", ("route", "status"))
        self.moderation = counter(
            "moderation_flags",
            "Moderation decisions by category, action and input/output.",
            ("category", "action", "where"),
        )
        self.routed = counter("auto_routed", "Requests to 'auto' by the model chosen.")

    # called from the engine threads
    def ttft(self, model: str, seconds: float) -> None:
        self.ttft_h.labels(model).observe(seconds)

    def itl(self, model: str, seconds: float) -> None:
        self.itl_h.labels(model).observe(seconds)

    def tpot(self, model: str, seconds: float) -> None:
        self.tpot_h.labels(model).observe(seconds)

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(generated)

    def finished(self, model: str, reason: str | None) -> None:
        self.success.labels(model, reason or "unknown").inc()

    def observe(self, model: str, stats: EngineStats) -> None:
        self.running.labels(model).set(stats.running)
        self.waiting.labels(model).set(stats.waiting)
        self.kv.labels(model).set(stats.kv_usage)
        self.prefix.labels(model).set(stats.prefix_hit_rate)
        self.preemptions.labels(model).set(stats.preemptions)

    def render(self, runners: Iterable[EngineRunner]) -> bytes:
        """The Prometheus text, with each engine's gauges from the snapshot its thread last published."""
        for runner in runners:
            self.observe(runner.name, runner.stats())
        return generate_latest(self.registry)
