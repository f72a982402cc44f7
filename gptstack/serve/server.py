"""The server's shared state and its errors: one EngineRunner per model and the gateway steps every
route takes (authenticate, resolve the model, moderate the input, admit under the rate limits),
plus the OpenAI error object and the request-body limit.

    server = Server({"small": engine_a, "large": engine_b}, ServeConfig(api_keys="keys.txt"))
    key = server.authenticate(request)                   # APIError 401
    name, score = server.resolve("auto", text, tokens)   # the routed model (score: None unless "auto")

Every refusal is an `APIError`: an HTTP status and OpenAI's {"error": {"message", "type", "param",
"code"}}; `reason` counts it in `gptstack:requests_rejected_total`. `refused` maps the engine's
ValueError for a request (ContextLengthExceeded → `context_length_exceeded`) to its 400.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from gptstack.infer.engine import ContextLengthExceeded, Engine
from gptstack.rag.retrieve import Retriever
from gptstack.safety.judges import build_judge
from gptstack.serve.cache import ExactCache, ResponseCache, SemanticCache
from gptstack.serve.config import ServeConfig
from gptstack.serve.gateway import ApiKey, Embedder, JsonlLog, Limiter, RateLimited, difficulty, load_keys, per_minute
from gptstack.serve.metrics import Metrics
from gptstack.serve.moderation import Moderator, Verdict
from gptstack.serve.protocol import json_size, json_size_bound
from gptstack.serve.review import JUDGE_FLAGS, ReviewQueue
from gptstack.serve.runner import EngineRunner

RECENT = 10_000  # responses kept for /v1/feedback
RECENT_CHARS = 64 << 20  # and the most characters they may hold together (a prompt may be a megabyte)


def chars(value) -> int:
    """The characters of the strings in a JSON-like value: what keeping it costs, roughly."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(chars(v) for v in value.values())
    return sum(chars(v) for v in value) if isinstance(value, list | tuple) else 0


class APIError(Exception):
    """An OpenAI error response: status, message, type, param, code; `reason` for the rejected metric."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.reason = headers or {}, reason

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def refused(e: ValueError, prompt_param: str) -> APIError:
    """The engine's refusal of a request as a 400 (`prompt_param`: "prompt" or "messages")."""
    if isinstance(e, ContextLengthExceeded):
        param = prompt_param if e.prompt_too_long else "max_tokens"
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    return APIError(400, str(e), param=prompt_param)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes (by Content-Length or as it streams in)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._reply(send, 400, "invalid Content-Length header")
        if declared is not None and int(declared) > self.limit:
            return await self._reply(
                send, 413, f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes"
            )
        seen, too_large, started = 0, False, False

        async def limited():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:
                if not started:
                    started = True
                    await self._reply(send, 413, f"request body exceeds the limit of {self.limit} bytes")
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, guarded_send)

    async def _reply(self, send, status: int, message: str):
        self.metrics.rejected.labels("too_large" if status == 413 else "invalid").inc()
        body = json.dumps(error_body(message, code="request_too_large" if status == 413 else None)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Server:
    """The gateway state shared by the routes. The engines go to their runners; nothing else holds them."""

    def __init__(self, engines: dict[str, Engine], config: ServeConfig):
        if not engines:
            raise ValueError("serve needs at least one model")
        self.config = config
        self.metrics = Metrics()
        self.runners = {n: EngineRunner(e, n, config.max_waiting, self.metrics) for n, e in engines.items()}
        size = {n: r.n_params for n, r in self.runners.items()}
        self.small, self.large = min(size, key=size.get), max(size, key=size.get)
        self.keys = load_keys(config.api_keys)
        self.limiter = Limiter(per_minute("--rpm", "rpm", config.rpm), per_minute("--tpm", "tpm", config.tpm))
        embedder = Embedder() if (config.semantic_cache is not None or config.moderation or config.rag_index) else None
        self.retriever = Retriever.load(config.rag_index, embedder) if config.rag_index else None
        semantic = SemanticCache(embedder, config.semantic_cache) if config.semantic_cache else None
        self.cache = ResponseCache(ExactCache() if config.exact_cache else None, semantic)
        self.moderator = None
        if config.moderation:
            self.moderator = Moderator(config.moderation, embedder, config.moderation_policy)
        self.output_judge = build_judge(config.output_judge, embedder=embedder) if config.output_judge else None
        log = Path(config.log_dir) if config.log_dir else None
        self.usage = JsonlLog(log / "usage.jsonl" if log else None)
        self.feedback = JsonlLog(log / "feedback.jsonl" if log else None)
        self.responses: OrderedDict[str, dict] = OrderedDict()  # recent responses, for feedback
        self.review = ReviewQueue(config.review_db) if config.review_db else None  # flagged answers go here
        self.recent_chars = 0  # the characters they hold (chars)
        self.created = int(time.time())

    def start(self) -> None:
        for r in self.runners.values():
            r.start()

    def stop(self) -> None:
        for r in self.runners.values():
            r.stop()

    def model_names(self) -> list[str]:
        return [*self.runners, "auto"] if len(self.runners) > 1 else list(self.runners)

    def runner(self, name: str) -> EngineRunner:
        """The runner serving a listed model name ("auto" lists the largest model's context)."""
        return self.runners[self.large if name == "auto" else name]

    # ---- gateway steps -------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> ApiKey | None:
        if not self.keys:
            return None
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not token:
            message = "missing API key: send 'Authorization: Bearer KEY'"
            raise APIError(401, message, code="invalid_api_key", reason="auth")
        key = self.keys.get(token)
        if key is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key", reason="auth")
        return key

    def resolve(self, name: str, text: str, prompt_tokens: int, turns: int = 0) -> tuple[str, float | None]:
        """(served model, routing score): "auto" goes by the difficulty of `text`; 404 for an unknown name."""
        if name == "auto":
            score = difficulty(text, prompt_tokens, turns)
            chosen = self.large if score >= self.config.route_threshold else self.small
            self.metrics.routed.labels(chosen).inc()
            return chosen, score
        if name not in self.runners:
            message = f"the model '{name}' does not exist; served: {', '.join(self.model_names())}"
            raise APIError(404, message, param="model", code="model_not_found")
        return name, None

    def count_tokens(self, text: str) -> int:
        """Routing's estimate of a text's length, by the first model's tokenizer."""
        return len(next(iter(self.runners.values())).tokenizer.encode(text))

    async def check_body(self, raw: bytes) -> None:
        """400 for a body that holds more arrays and objects, or values, than any request this server
        takes (ServeConfig.body_bounds), before it is parsed: parsing holds the event loop."""
        most = self.config.body_bounds()
        size = json_size_bound(raw)  # about 1 ms per MB; the exact count (strings left out) only when needed
        if size[0] > most[0] or size[1] > most[1]:
            size = await asyncio.to_thread(json_size, raw)
        if size[0] > most[0] or size[1] > most[1]:
            message = (
                f"the request body holds {size[0]} arrays and objects and up to {size[1]} values; this server takes "
                f"at most {most[0]} and {most[1]} (its max_jobs, max_messages and max_prompt_tokens)"
            )
            raise APIError(400, message, code="request_too_large", reason="too_large")

    def check_work(self, jobs: int, prompt_tokens: int, param: str) -> None:
        """400 for a request that would start more engine requests (prompts × n) or send more prompt tokens
        than one request may, counted before anything is built for them."""
        most = min(self.config.max_jobs, self.config.max_waiting)
        if jobs > most:
            message = f"this request asks for {jobs} completions (prompts × n); one request may ask for at most {most}"
            raise APIError(400, message, param=param, code="request_too_large", reason="too_large")
        if prompt_tokens > self.config.max_prompt_tokens:
            message = (
                f"this request sends {prompt_tokens} prompt tokens; one request may send at most "
                f"{self.config.max_prompt_tokens}"
            )
            raise APIError(400, message, param=param, code="request_too_large", reason="too_large")

    def check_room(self, runner: EngineRunner, jobs: int) -> None:
        """503 at once when the model's queue has no room for all of a request's engine requests."""
        if jobs > (room := runner.room()):
            message = f"{runner.name}: {jobs} requests would wait and there is room for {max(0, room)}; retry later"
            raise APIError(503, message, "server_error", code="queue_full", reason="queue_full")

    def cache_scope(self, key: ApiKey | None) -> str | None:
        """Whose cached answers a request may see: its key's own, unless the caches are shared."""
        return None if self.config.shared_cache or key is None else key.key

    def admit(self, key: ApiKey | None, tokens: int) -> None:
        """Take one request and `tokens` tokens from the key's buckets, or 429 with Retry-After."""
        try:
            self.limiter.admit(key, tokens)
        except RateLimited as e:
            # no Retry-After for a request that can never pass (rpm 0, or more tokens than a minute's worth)
            retry = {"retry-after": str(max(1, round(e.retry_after)))} if math.isfinite(e.retry_after) else {}
            raise APIError(
                429, str(e), "requests", code="rate_limit_exceeded", reason="rate_limit", headers=retry
            ) from None

    def moderate(self, texts: list[str], where: str) -> list[Verdict]:
        if self.moderator is None or not texts:
            return []
        verdicts = self.moderator(texts)
        for v in verdicts:
            for c in v.hits():
                self.metrics.moderation.labels(c, self.moderator.policy.get(c, "block"), where).inc()
        return verdicts

    def judge_output(self, prompt: str, text: str, input_flagged: bool) -> list[str]:
        """The output judge's flags for one answer: 'refusal' when it refuses the prompt (over-refusal when
        the input is benign), 'complied' when it does not refuse an input that moderation flagged."""
        refused = self.output_judge.judge([{"prompt": prompt, "response": text}])[0]["refusal"]
        flags = ["refusal"] if refused else ["complied"] if input_flagged else []
        for f in flags:
            self.metrics.moderation.labels(f, "flag", "judge").inc()
        return flags

    def check_input(self, texts: list[str]) -> list[str]:
        """Moderate inputs: block → 400; returns flagged categories."""
        flagged = []
        for v in self.moderate(texts, "input"):
            if v.action == "block":
                message = f"the input was blocked by moderation ({', '.join(v.hits())})"
                raise APIError(400, message, code="content_policy_violation", reason="moderation")
            flagged += v.hits()
        return flagged

    def remember(self, rid: str, record: dict) -> None:
        """Keep a response for feedback: the last RECENT, and no more than RECENT_CHARS characters; one
        that moderation or the output judge flagged also goes to the review queue."""
        flags = [f"input:{c}" for c in record.get("input_flags", [])]
        flags += [f"{'judge' if c in JUDGE_FLAGS else 'output'}:{c}" for c in record.get("output_flags", [])]
        if self.review is not None and flags:
            self.review.add_answer(rid, record, list(dict.fromkeys(flags)))
        self.responses[rid], size = record, chars(record)
        self.recent_chars += size
        while len(self.responses) > RECENT or (self.recent_chars > RECENT_CHARS and len(self.responses) > 1):
            self.recent_chars -= chars(self.responses.popitem(last=False)[1])
