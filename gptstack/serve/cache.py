"""The gateway's response caches: exact (the whole request) and semantic (a paraphrased last message).

    key = cache.key("small", body.model_dump(exclude_none=True), (context, last_user_message), scope=api_key)
    hit = await cache.get(key)            # CacheHit(payload, "exact" | "semantic", similarity) or None
    ...
    await cache.put(key, response)        # skipped for answers cut by an abort, moderation or an error

Only deterministic requests are cached: temperature 0 or a seed, and no logprobs/echo (`key` is None
otherwise). The exact cache is an LRU keyed on the whole request but `stream`, `stream_options` and
`user`, and on its `scope`: the API key, so one key never sees what another asked, not even through a
paraphrase (Server.cache_scope; None when ServeConfig.shared_cache shares them). The semantic cache
(chat, n = 1) keys on the request without its last message, and the scope, and that message must be
within a cosine threshold of a cached one's, by the gateway's sentence embedding. A cached value is a
response without its id and creation time, and without log-probabilities.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gptstack.serve.gateway import Embedder

_UNCACHED = ("abort", "content_filter", "error")  # finish reasons of answers that are not the model's whole answer


def deterministic(body: dict) -> bool:
    """Whether a request's answer is a function of the request: greedy or seeded, no logprobs/echo."""
    if body.get("logprobs") or body.get("echo") or body.get("top_logprobs"):
        return False
    return body.get("temperature", 1.0) == 0 or body.get("seed") is not None


def request_key(
    model: str, body: dict, scope: str | None = None, drop: tuple[str, ...] = ("stream", "stream_options", "user")
) -> str:
    """SHA-256 of (model, scope, the body's fields but `drop`): the scope (an API key) is hashed, never kept."""
    clean = {k: v for k, v in body.items() if k not in drop and k != "model"}
    return hashlib.sha256(json.dumps([model, scope, clean], sort_keys=True, default=str).encode()).hexdigest()


class ExactCache:
    """LRU of responses by request key."""

    def __init__(self, size: int = 1024):
        self.size, self.items = size, OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key: str, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class SemanticCache:
    """Answers keyed by (model, context) and the embedding of the last user message."""

    def __init__(self, embedder: Embedder, threshold: float = 0.95, size: int = 1024):
        self.embedder, self.threshold, self.size = embedder, threshold, size
        self.rows: list[tuple[str, np.ndarray, object]] = []  # (context key, embedding, value)
        self.lock = threading.Lock()

    def get(self, context: str, text: str) -> tuple[object, float] | None:
        e = self.embedder([text])[0]
        with self.lock:
            best, best_sim = None, -1.0
            for ctx, emb, value in self.rows:
                if ctx == context and (sim := float(emb @ e)) > best_sim:
                    best, best_sim = value, sim
        return (best, best_sim) if best is not None and best_sim >= self.threshold else None

    def put(self, context: str, text: str, value) -> None:
        e = self.embedder([text])[0]
        with self.lock:
            self.rows.append((context, e, value))
            del self.rows[: max(0, len(self.rows) - self.size)]


@dataclass(frozen=True)
class CacheKey:
    exact: str  # request_key of the whole request
    semantic: tuple[str, str] | None  # (request_key of the context, last user message): chat, n = 1


@dataclass(frozen=True)
class CacheHit:
    payload: dict  # the cached response (model, object, usage, choices)
    kind: str  # "exact" | "semantic"
    similarity: float | None = None  # semantic hits: cosine of the last messages


class ResponseCache:
    """Both caches behind one key; the embedding runs off the event loop."""

    def __init__(self, exact: ExactCache | None, semantic: SemanticCache | None):
        self.exact, self.semantic = exact, semantic

    def key(
        self, model: str, body: dict, semantic: tuple[dict, str] | None = None, scope: str | None = None
    ) -> CacheKey | None:
        """The key of a request (its fields as sent), or None when it must not be cached. `semantic`:
        (the request without its last message, that message), for the semantic cache; `scope`: whose
        answers it may be served (None: everyone's)."""
        if not deterministic(body) or (self.exact is None and self.semantic is None):
            return None
        context = None
        if semantic is not None and self.semantic is not None and body.get("n", 1) == 1:
            context = (request_key(model, semantic[0], scope), semantic[1])
        return CacheKey(request_key(model, body, scope), context)

    async def get(self, key: CacheKey) -> CacheHit | None:
        if self.exact is not None and (payload := self.exact.get(key.exact)) is not None:
            return CacheHit(payload, "exact")
        if key.semantic is not None:
            found = await asyncio.to_thread(self.semantic.get, *key.semantic)
            if found is not None:
                return CacheHit(found[0], "semantic", found[1])
        return None

    async def put(self, key: CacheKey, response: dict) -> None:
        if any(c["finish_reason"] in _UNCACHED for c in response["choices"]):
            return
        value = {k: response[k] for k in ("model", "object", "usage")}
        value["choices"] = [{**c, "logprobs": None} for c in response["choices"]]
        if self.exact is not None:
            self.exact.put(key.exact, value)
        if key.semantic is not None:
            await asyncio.to_thread(self.semantic.put, *key.semantic, value)
