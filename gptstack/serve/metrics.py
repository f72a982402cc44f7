"""Prometheus metrics with vLLM's names under the `gptstack:` prefix (`GET /metrics`).

Each server has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        m = ["model_name"]
        self.running = Gauge("gptstack:num_requests_running", "Requests in the running batch.", m, registry=r)
        self.waiting = Gauge("gptstack:num_requests_waiting", "Requests waiting to be scheduled.", m, registry=r)
        self.kv = Gauge("gptstack:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", m, registry=r)
        self.prefix = Gauge(
            "gptstack:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens queried.",
            m, registry=r,
        )  # fmt: skip
        self.preemptions = Gauge("gptstack:num_preemptions", "Preemptions since start.", m, registry=r)
        self.ttft_h = Histogram(
            "gptstack:time_to_first_token_seconds", "Time to first token.", m, buckets=_LATENCY, registry=r
        )
        self.tpot_h = Histogram(
            "gptstack:time_per_output_token_seconds", "Mean time per output token after the first, per request.",
            m, buckets=_TOKEN_LATENCY, registry=r,
        )  # fmt: skip
        self.itl_h = Histogram(
            "gptstack:inter_token_latency_seconds", "Time between output tokens.", m, buckets=_TOKEN_LATENCY, registry=r
        )
        self.prompt_tokens = Counter("gptstack:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("gptstack:generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter(
            "gptstack:request_success", "Finished requests by finish reason.", [*m, "finished_reason"], registry=r
        )
        self.cache_hits = Counter(
            "gptstack:response_cache_hits", "Responses served from the gateway's cache.", ["cache"], registry=r
        )
        self.rejected = Counter(
            "gptstack:requests_rejected", "Requests refused by the gateway, by reason.", ["reason"], registry=r
        )
        self.http = Counter(
            "gptstack:http_requests", "HTTP responses by route and status.", ["route", "status"], registry=r
        )
        self.moderation = Counter(
            "gptstack:moderation_flags", "Moderation decisions by category, action and input/output.",
            ["category", "action", "where"],
            registry=r,
        )  # fmt: skip
        self.routed = Counter("gptstack:auto_routed", "Requests to 'auto' by the model chosen.", m, registry=r)

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

    def engine_state(self, runner) -> None:
        e, name = runner.engine, runner.name
        self.running.labels(name).set(len(e.running))
        self.waiting.labels(name).set(runner.num_waiting)
        self.kv.labels(name).set(e.kv_usage)
        self.prefix.labels(name).set(e.prefix_hit_rate)
        self.preemptions.labels(name).set(e.stats["preemptions"])

    def render(self, runners) -> bytes:
        for runner in runners:
            self.engine_state(runner)
        return generate_latest(self.registry)
