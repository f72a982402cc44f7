"""The OpenAI-compatible HTTP API (FastAPI) over EngineRunners, behind the gateway.

    app = create_app({"small": engine_a, "large": engine_b}, ServeConfig(api_keys="keys.txt"))
    uvicorn.run(app, port=8000)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/moderations,
POST /v1/feedback, GET /health, GET /metrics, and the web chat at / (static files in web/).
Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}} with its status:
400 bad parameters / prompt over the context / blocked by moderation, 401 key, 404 model or route,
413 body too large, 429 rate limited (Retry-After), 503 queue full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptstack.infer.engine import Engine, RequestOutput
from gptstack.infer.sampling import SamplingParams
from gptstack.serve import gateway as gw
from gptstack.serve.metrics import Metrics
from gptstack.serve.protocol import ChatRequest, CompletionRequest, FeedbackRequest, ModerationRequest
from gptstack.serve.runner import EngineRunner, QueueFull, Stream

WEB = Path(__file__).parent / "web"


@dataclass
class ServeConfig:
    api_keys: str | None = None  # key file (GPTSTACK_API_KEYS adds more)
    rpm: float | None = None  # default requests per minute per key
    tpm: float | None = None  # default tokens per minute per key
    max_body_bytes: int = 1 << 20
    max_waiting: int = 256  # per model; more → 503
    log_dir: str | None = None  # usage.jsonl and feedback.jsonl
    exact_cache: bool = True
    semantic_cache: float | None = None  # cosine threshold; None = off
    moderation: str | None = None  # classifier folder (gptstack moderation train)
    moderation_policy: dict[str, str] = field(default_factory=dict)
    route_threshold: float = 0.25
    moderation_every: int = 64  # characters of streamed output between output checks


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                 headers: dict | None = None, reason: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.reason = headers or {}, reason


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def token_str(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text, or 'bytes:\\xNN…' when it is not whole UTF-8."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes (by Content-Length or as it streams in)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            status, msg = (413, f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes") \
                if declared.isdigit() else (400, "invalid Content-Length header")  # fmt: skip
            return await self._reply(send, status, msg)
        seen, too_large = 0, False

        async def limited():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        started = False

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
        code = "request_too_large" if status == 413 else None
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()  # fmt: skip
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Server:
    """The gateway state shared by the routes."""

    def __init__(self, engines: dict[str, Engine], config: ServeConfig):
        if not engines:
            raise ValueError("serve needs at least one model")
        self.config = config
        self.metrics = Metrics()
        self.runners = {n: EngineRunner(e, n, self.metrics, config.max_waiting) for n, e in engines.items()}
        size = {n: sum(p.numel() for p in e.model.parameters()) for n, e in engines.items()}
        self.small, self.large = min(size, key=size.get), max(size, key=size.get)
        self.keys = gw.load_keys(config.api_keys)
        self.limiter = gw.Limiter(config.rpm, config.tpm)
        self.exact = gw.ExactCache() if config.exact_cache else None
        self.embedder = gw.Embedder() if (config.semantic_cache is not None or config.moderation) else None
        self.semantic = gw.SemanticCache(self.embedder, config.semantic_cache) if config.semantic_cache else None
        self.moderator = None
        if config.moderation:
            from gptstack.serve.moderation import Moderator

            self.moderator = Moderator(config.moderation, self.embedder, config.moderation_policy)
        log = Path(config.log_dir) if config.log_dir else None
        self.usage = gw.JsonlLog(log / "usage.jsonl" if log else None)
        self.feedback = gw.JsonlLog(log / "feedback.jsonl" if log else None)
        self.responses: OrderedDict[str, dict] = OrderedDict()  # recent responses, for feedback
        self.created = int(time.time())

    # ---- gateway steps -------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> gw.ApiKey | None:
        if not self.keys:
            return None
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           reason="auth")  # fmt: skip
        key = self.keys.get(token)
        if key is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key", reason="auth")
        return key

    def resolve(self, name: str, text: str, prompt_tokens: int, turns: int = 0) -> tuple[str, float | None]:
        if name == "auto":
            score = gw.difficulty(text, prompt_tokens, turns)
            chosen = self.large if score >= self.config.route_threshold else self.small
            self.metrics.routed.labels(chosen).inc()
            return chosen, score
        if name not in self.runners:
            raise APIError(404, f"the model '{name}' does not exist; served: {', '.join(self.model_names())}",
                           param="model", code="model_not_found")  # fmt: skip
        return name, None

    def model_names(self) -> list[str]:
        return [*self.runners, "auto"] if len(self.runners) > 1 else list(self.runners)

    def moderate(self, texts: list[str], where: str) -> list:
        if self.moderator is None or not texts:
            return []
        verdicts = self.moderator(texts)
        for v in verdicts:
            for c in v.hits():
                self.metrics.moderation.labels(c, self.moderator.policy.get(c, "block"), where).inc()
        return verdicts

    def check_input(self, texts: list[str]) -> list[str]:
        """Moderate inputs: block → 400; returns flagged categories."""
        flagged = []
        for v in self.moderate(texts, "input"):
            if v.action == "block":
                raise APIError(400, f"the input was blocked by moderation ({', '.join(v.hits())})",
                               code="content_policy_violation", reason="moderation")  # fmt: skip
            flagged += v.hits()
        return flagged

    def remember(self, rid: str, record: dict) -> None:
        self.responses[rid] = record
        while len(self.responses) > 10_000:
            self.responses.popitem(last=False)


def _params(body: CompletionRequest | ChatRequest, max_tokens: int, seed: int | None, logprobs, prompt_logprobs=None):
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=seed,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, max_tokens=max_tokens, stop=tuple(s for s in stop if s),
        ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


def _check_room(runner: EngineRunner, n_prompt: int, max_tokens: int | None) -> int:
    """The max_tokens to use, or 400 naming the token counts."""
    ctx = runner.engine.context
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"this model's context is {ctx} tokens; the prompt has {n_prompt} tokens "
            "(and at least 1 must be generated)",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        raise APIError(400, f"this model's context is {ctx} tokens; you requested {n_prompt + max_tokens} tokens "
                            f"({n_prompt} in the prompt, {max_tokens} for the completion)",
                       param="max_tokens", code="context_length_exceeded")  # fmt: skip
    return max_tokens


async def _merge(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with their index; closing it aborts the rest."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: Stream):
        try:
            async for out in s:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            i, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            left -= out.finished
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


def create_app(engines: dict[str, Engine], config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    server = Server(engines, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for r in server.runners.values():
            r.start()
        yield
        for r in server.runners.values():
            r.stop()

    app = FastAPI(title="gptstack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over the gptstack inference engine.")  # fmt: skip
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.reason:
            server.metrics.rejected.labels(e.reason).inc()
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        server.metrics.rejected.labels("invalid").inc()
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5])  # fmt: skip
        return error_response(400, msg or "invalid request", param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.http.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    # ---- plain routes ------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        bad = {n: str(r.error) for n, r in server.runners.items() if r.error is not None}
        if bad:
            return error_response(503, f"engine stopped: {bad}", "server_error")
        return {"status": "ok", "models": list(server.runners)}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(server.runners.values()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        server.authenticate(request)
        data = []
        for name in server.model_names():
            ctx = server.runners[name if name != "auto" else server.large].engine.context
            data.append({"id": name, "object": "model", "created": server.created, "owned_by": "gptstack",
                         "max_model_len": ctx})  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    # ---- completions ---------------------------------------------------------------------------------------

    async def run(request: Request, *, key, name, body, jobs, kind, record, prompt_tokens, cache_ctx, routed):
        """Submit every choice, then answer (JSON or server-sent events). jobs: [(prompt_ids, params, echo_text)]."""
        runner = server.runners[name]
        tok = runner.engine.tokenizer
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        budget = sum(p for p in prompt_tokens) + sum(j[1].max_tokens for j in jobs)
        try:
            server.limiter.admit(key, budget)
        except gw.RateLimited as e:
            raise APIError(429, str(e), "requests", code="rate_limit_exceeded", reason="rate_limit",
                           headers={"retry-after": str(max(1, round(e.retry_after)))}) from None  # fmt: skip
        start = time.perf_counter()
        streams: list[Stream] = []
        try:
            for prompt, params, _ in jobs:
                streams.append(await runner.submit(prompt, params))
        except QueueFull as e:
            for s in streams:
                s.close()
            server.limiter.refund(key, budget)
            raise APIError(503, str(e), "server_error", code="queue_full", reason="queue_full") from None
        except ValueError as e:
            for s in streams:
                s.close()
            server.limiter.refund(key, budget)
            raise APIError(400, str(e)) from None
        discard = kind != "chat" and body.max_tokens == 0  # echo only: the one token generated is dropped
        headers = {"x-request-id": rid}
        if routed is not None:
            headers["x-gptstack-routed-to"] = name
        texts = [""] * len(jobs)
        finish: list[str | None] = [None] * len(jobs)
        logprobs: list[list] = [[] for _ in jobs]
        prompt_lp: list = [None] * len(jobs)
        n_out = [0] * len(jobs)
        checked = [0] * len(jobs)
        flagged_out: list[str] = []

        async def moderate_output(i: int, final: bool) -> bool:
            """True when choice i's output must stop (blocked). The embedding runs off the event loop."""
            if server.moderator is None or (not final and len(texts[i]) - checked[i] < config.moderation_every):
                return False
            checked[i] = len(texts[i])
            if not texts[i].strip():
                return False
            v = (await asyncio.to_thread(server.moderate, [texts[i]], "output"))[0]
            flagged_out.extend(v.hits())
            return v.action == "block"

        def finish_log(status: int):
            usage = {"prompt_tokens": sum(prompt_tokens), "completion_tokens": sum(n_out),
                     "total_tokens": sum(prompt_tokens) + sum(n_out)}  # fmt: skip
            server.limiter.refund(key, budget - usage["total_tokens"])
            server.usage.write({
                "id": rid, "key": key.fingerprint if key else None, "endpoint": kind, "model": name,
                "requested_model": body.model, "route_score": routed, "status": status,
                "finish_reasons": finish, "latency_s": round(time.perf_counter() - start, 4), **usage,
                "moderation_flags": sorted(set(record.get("input_flags", []) + flagged_out)), "cache": None,
            })  # fmt: skip
            server.remember(rid, {**record, "model": name, "response": texts})
            return usage

        def lp_entries(i: int, outs_lp: list, token_ids: list[int]):
            if kind == "chat":
                content = []
                for t, (lp, top) in zip(token_ids, outs_lp, strict=True):
                    s, b = token_str(tok, t)
                    content.append({"token": s, "logprob": lp, "bytes": b, "top_logprobs": [
                        {"token": token_str(tok, a)[0], "logprob": alp, "bytes": token_str(tok, a)[1]} for a, alp in top
                    ]})  # fmt: skip
                return {"content": content, "refusal": None}
            tokens, lps, tops = [], [], []
            for t, (lp, top) in zip(token_ids, outs_lp, strict=True):
                tokens.append(token_str(tok, t)[0])
                lps.append(lp)
                tops.append({token_str(tok, a)[0]: alp for a, alp in top})
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops}

        def with_offsets(lp: dict, start_offset: int) -> dict:
            offsets, at = [], start_offset
            for t in lp["tokens"]:
                offsets.append(at)
                at += len(t) if not t.startswith("bytes:") else 0
            return {**lp, "text_offset": offsets}

        if not body.stream:
            tokens_of: list[list[int]] = [[] for _ in jobs]
            merged = _merge(streams)
            try:
                pending_next = None
                while True:
                    pending_next = pending_next or asyncio.ensure_future(merged.__anext__())
                    done, _ = await asyncio.wait({pending_next}, timeout=1.0)
                    if not done:
                        if await request.is_disconnected():
                            pending_next.cancel()
                            finish_log(499)
                            return Response(status_code=499)
                        continue
                    try:
                        i, out = pending_next.result()
                    except StopAsyncIteration:
                        break
                    pending_next = None
                    texts[i] += out.text
                    n_out[i] += len(out.token_ids)
                    tokens_of[i] += out.token_ids
                    logprobs[i] += out.logprobs
                    if out.finished:
                        finish[i] = out.finish_reason
                        prompt_lp[i] = out.prompt_logprobs
            finally:
                await merged.aclose()
            choices = []
            for i, (prompt, params, echo_text) in enumerate(jobs):
                if await moderate_output(i, final=True):
                    texts[i], finish[i] = "", "content_filter"
                text = texts[i] if not discard else ""
                lp = None
                if params.logprobs is not None:
                    lp = lp_entries(i, logprobs[i], tokens_of[i])
                    if discard:
                        lp = {k: [] for k in lp}
                    if kind != "chat":
                        if echo_text is not None and prompt_lp[i] is not None:
                            pl = lp_entries(i, [e or (None, []) for e in prompt_lp[i]], prompt)
                            pl["top_logprobs"] = [None if e is None else pl["top_logprobs"][k]
                                                  for k, e in enumerate(prompt_lp[i])]  # fmt: skip
                            lp = {k: pl[k] + lp[k] for k in lp}
                        lp = with_offsets(lp, 0)
                if kind == "chat":
                    choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                    "logprobs": lp, "finish_reason": finish[i]})  # fmt: skip
                else:
                    full = (echo_text or "") + text if echo_text is not None else text
                    choices.append({"index": i, "text": full, "logprobs": lp, "finish_reason": finish[i]})
                if discard:
                    finish[i], n_out[i] = "length", 0
                    choices[-1]["finish_reason"] = "length"
            usage = finish_log(200)
            payload = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices,
                       "usage": usage, "system_fingerprint": "gptstack"}  # fmt: skip
            if cache_ctx is not None:
                await cache_ctx(payload)
            return JSONResponse(payload, headers=headers)

        async def events() -> AsyncIterator[str]:
            chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def chunk(choices, usage=None):
                c = {"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": choices,
                     "system_fingerprint": "gptstack"}  # fmt: skip
                if usage is not None:
                    c["usage"] = usage
                return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

            status = 499
            merged = _merge(streams)
            try:
                if kind == "chat":
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(len(jobs))])  # fmt: skip
                else:
                    for i, (_, _, echo_text) in enumerate(jobs):
                        if echo_text:
                            yield chunk([{"index": i, "text": echo_text, "logprobs": None, "finish_reason": None}])
                async for i, out in merged:
                    if finish[i] is not None:
                        continue
                    if discard:
                        out.text, out.token_ids, out.logprobs = "", [], []
                        out.finish_reason = "length" if out.finished else None
                    texts[i] += out.text
                    n_out[i] += len(out.token_ids)
                    reason = out.finish_reason if out.finished else None
                    if await moderate_output(i, final=out.finished):
                        streams[i].close()
                        reason, out.text = "content_filter", ""
                    lp = None
                    if jobs[i][1].logprobs is not None and out.token_ids:
                        lp = lp_entries(i, out.logprobs, out.token_ids)
                    if out.text or lp or reason:
                        if kind == "chat":
                            delta = {"content": out.text} if out.text else {}
                            yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}])
                        else:
                            yield chunk([{"index": i, "text": out.text, "logprobs": lp, "finish_reason": reason}])
                    if reason:
                        finish[i] = reason
                        if all(f is not None for f in finish):
                            break
                status = 200
                usage = finish_log(200)
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], usage)
                if cache_ctx is not None:
                    await cache_ctx({"id": rid, "object": obj, "created": created, "model": name, "usage": usage,
                               "choices": _cached_choices(kind, texts, finish)})  # fmt: skip
                yield "data: [DONE]\n\n"
            finally:
                await merged.aclose()
                if status != 200:
                    finish_log(status)

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _cached_choices(kind, texts, finish):
        if kind == "chat":
            return [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None}, "logprobs": None,
                     "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish, strict=True))]  # fmt: skip
        return [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                for i, (t, f) in enumerate(zip(texts, finish, strict=True))]  # fmt: skip

    def from_cache(payload: dict, body, kind: str, hit: str, headers: dict):
        server.metrics.cache_hits.labels(hit).inc()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        payload = {**payload, "id": rid, "created": int(time.time())}
        server.usage.write({"id": rid, "endpoint": kind, "model": payload["model"], "requested_model": body.model,
                            "status": 200, "cache": hit, **payload["usage"]})  # fmt: skip
        headers = {**headers, "x-gptstack-cache": hit, "x-request-id": rid}
        if not body.stream:
            return JSONResponse(payload, headers=headers)

        async def events():
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            head = {"id": payload["id"], "object": obj, "created": payload["created"], "model": payload["model"]}
            for c in payload["choices"]:
                content = c["message"]["content"] if kind == "chat" else c["text"]
                part, end = ({"delta": {"role": "assistant", "content": content}}, {"delta": {}}) if kind == "chat" \
                    else ({"text": content}, {"text": ""})  # fmt: skip
                first = {**head, "choices": [{"index": c["index"], **part, "logprobs": None, "finish_reason": None}]}
                last = {**head, "choices": [{"index": c["index"], **end, "logprobs": None,
                                             "finish_reason": c["finish_reason"]}]}  # fmt: skip
                yield f"data: {json.dumps(first)}\n\ndata: {json.dumps(last)}\n\n"
            if body.stream_options and body.stream_options.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': payload['usage']})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def caching(name: str, body, kind: str, semantic: tuple[str, str] | None):
        """(cached response or None, function storing a fresh one or None)."""
        raw = body.model_dump(exclude_none=True)
        if not gw.deterministic(raw) or (server.exact is None and server.semantic is None):
            return None, None
        key = gw.request_key(name, raw)
        if server.exact is not None and (hit := server.exact.get(key)) is not None:
            return from_cache(hit, body, kind, "exact", {}), None
        if semantic is not None and server.semantic is not None and body.n == 1:
            found = await asyncio.to_thread(server.semantic.get, *semantic)
            if found is not None:
                return from_cache(found[0], body, kind, "semantic", {"x-gptstack-similarity": f"{found[1]:.4f}"}), None

        async def store(payload: dict):
            if any(c["finish_reason"] in ("abort", "content_filter", "error") for c in payload["choices"]):
                return
            value = {k: payload[k] for k in ("model", "object", "usage")} | {"choices": [
                {k: v for k, v in c.items()} | {"logprobs": None} for c in payload["choices"]]}  # fmt: skip
            if server.exact is not None:
                server.exact.put(key, value)
            if semantic is not None and server.semantic is not None and body.n == 1:
                await asyncio.to_thread(server.semantic.put, *semantic, value)

        return None, store

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        key = server.authenticate(request)
        p = body.prompt
        is_tokens = isinstance(p, list) and p and isinstance(p[0], int)
        many_tokens = isinstance(p, list) and p and isinstance(p[0], list)
        prompts = [p] if is_tokens else list(p) if many_tokens else [p] if isinstance(p, str) else list(p)
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        text0 = prompts[0] if isinstance(prompts[0], str) else ""  # routing looks at the first prompt
        name, routed = server.resolve(body.model, text0, len(text0) // 4 if text0 else len(prompts[0]))
        runner = server.runners[name]
        tok = runner.engine.tokenizer
        vocab = min(runner.engine.model.config.vocab_size, tok.n_vocab)
        ids_list = []
        for q in prompts:
            if isinstance(q, str):
                ids_list.append(tok.encode(q))
            else:
                if any(not 0 <= t < vocab for t in q):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                ids_list.append(list(q))
        texts_in = [q if isinstance(q, str) else tok.decode(q) for q in prompts]
        flags = await asyncio.to_thread(server.check_input, texts_in)
        echo = body.echo
        want = 1 if body.max_tokens == 0 else body.max_tokens
        if body.max_tokens == 0 and not echo:
            raise APIError(400, "max_tokens 0 needs echo (prompt log-probabilities only)", param="max_tokens")
        jobs = []
        for ids, text in zip(ids_list, texts_in, strict=True):
            mt = _check_room(runner, len(ids), want)
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                params = _params(
                    body, mt, seed, body.logprobs, body.logprobs if echo and body.logprobs is not None else None
                )
                jobs.append((ids, params, text if echo else None))
        cached, store = await caching(name, body, "completion", None)
        if cached is not None:
            return cached
        record = {"endpoint": "completions", "prompt": texts_in, "input_flags": flags}
        return await run(request, key=key, name=name, body=body, jobs=jobs, kind="completion", record=record,
                         prompt_tokens=[len(i) for i in ids_list], cache_ctx=store, routed=routed)  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        key = server.authenticate(request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        last_user = users[-1] if users else messages[-1]["content"]
        any_tok = next(iter(server.runners.values())).engine.tokenizer
        n_est = len(any_tok.encode("".join(m["content"] for m in messages)))
        name, routed = server.resolve(
            body.model, "\n".join(m["content"] for m in messages), n_est, max(0, len(users) - 1)
        )
        runner = server.runners[name]
        ids, _ = runner.engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
        flags = await asyncio.to_thread(server.check_input, [last_user])
        mt = _check_room(runner, len(ids), body.max_completion_tokens or body.max_tokens)
        top = body.top_logprobs or 0
        lp = top if body.logprobs else None
        jobs = [(ids, _params(body, mt, None if body.seed is None else body.seed + j, lp), None)
                for j in range(body.n)]  # fmt: skip
        context = gw.request_key(name, {**body.model_dump(exclude_none=True), "messages": messages[:-1]})
        semantic = (context, last_user) if messages[-1]["role"] == "user" else None
        cached, store = await caching(name, body, "chat", semantic)
        if cached is not None:
            return cached
        record = {"endpoint": "chat", "messages": messages, "input_flags": flags}
        return await run(request, key=key, name=name, body=body, jobs=jobs, kind="chat", record=record,
                         prompt_tokens=[len(ids)], cache_ctx=store, routed=routed)  # fmt: skip

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest, request: Request):
        server.authenticate(request)
        if server.moderator is None:
            raise APIError(400, "moderation is not configured: start the server with --moderation DIR "
                                "(train one with `gptstack moderation train`)", param="model")  # fmt: skip
        texts = [body.input] if isinstance(body.input, str) else body.input
        verdicts = await asyncio.to_thread(server.moderator, texts)
        return {"id": "modr-" + uuid.uuid4().hex[:24], "model": "gptstack-moderation",
                "results": [{"flagged": v.flagged, "categories": v.categories, "category_scores": v.scores,
                             "action": v.action} for v in verdicts]}  # fmt: skip

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request):
        key = server.authenticate(request)
        record = server.responses.get(body.response_id)
        if record is None:
            raise APIError(404, f"no recent response with id {body.response_id!r}", param="response_id",
                           code="response_not_found")  # fmt: skip
        server.feedback.write({"response_id": body.response_id, "rating": body.rating, "comment": body.comment,
                               "key": key.fingerprint if key else None, **record})  # fmt: skip
        return {"id": body.response_id, "object": "feedback", "rating": body.rating, "stored": True}

    def openapi():  # the schema names the served models
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("CompletionRequest", "ChatRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = server.model_names()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=config.max_body_bytes, metrics=server.metrics)
    return app
