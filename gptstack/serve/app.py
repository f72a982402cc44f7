"""The OpenAI-compatible HTTP API (FastAPI): the routes, over the shared state in server.py.

    app = create_app({"small": engine_a, "large": engine_b}, ServeConfig(api_keys="keys.txt"))
    uvicorn.run(app, port=8000)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/moderations,
POST /v1/feedback, GET /health, GET /metrics, and the web chat at / (static files in web/).
Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}} with its status:
400 bad parameters / prompt over the context / blocked by moderation, 401 key, 404 model or route,
413 body too large, 429 rate limited (Retry-After), 503 queue full.

A route only reads its request: it authenticates, picks the model, turns the body into choices
(completion.py) and hands them to a `Completion`, which answers. The state they share is the app's
`Server` (app.state.server); the engines sit behind its runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptstack.infer.engine import Engine
from gptstack.serve.completion import (
    ChatRenderer,
    Completion,
    TextRenderer,
    chat_choices,
    chat_messages,
    text_choices,
    text_prompts,
)
from gptstack.serve.config import ServeConfig
from gptstack.serve.protocol import ChatRequest, CompletionRequest, FeedbackRequest, ModerationRequest
from gptstack.serve.server import APIError, BodyLimit, Server, error_response

WEB = Path(__file__).parent / "web"


def _server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(_server)]
router = APIRouter()


# ---- routes -------------------------------------------------------------------------------------------


@router.get("/health")
async def health(server: ServerDep):
    bad = {n: str(r.error) for n, r in server.runners.items() if r.error is not None}
    if bad:
        return error_response(503, f"engine stopped: {bad}", "server_error")
    return {"status": "ok", "models": list(server.runners)}


@router.get("/metrics")
async def metrics(server: ServerDep):
    return Response(server.metrics.render(server.runners.values()), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request, server: ServerDep):
    server.authenticate(request)
    head = {"object": "model", "created": server.created, "owned_by": "gptstack"}
    data = [{"id": n, **head, "max_model_len": server.runner(n).context} for n in server.model_names()]
    return {"object": "list", "data": data}


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB / "index.html")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, server: ServerDep):
    key = server.authenticate(request)
    prompts = text_prompts(body)
    first = prompts[0] if isinstance(prompts[0], str) else ""  # routing looks at the first prompt
    name, score = server.resolve(body.model, first, len(first) // 4 if first else len(prompts[0]))
    runner = server.runners[name]
    choices, texts = text_choices(body, prompts, runner)
    flags = await asyncio.to_thread(server.check_input, texts)
    record = {"endpoint": "completions", "prompt": texts, "input_flags": flags}
    completion = Completion(server, runner, TextRenderer(runner.tokenizer), body, choices, record, key, score)
    return await completion.respond(request, server.cache.key(name, body.model_dump(exclude_none=True)))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, server: ServerDep):
    key = server.authenticate(request)
    messages = chat_messages(body)
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = "\n".join(m["content"] for m in messages)
    tokens = server.count_tokens("".join(m["content"] for m in messages))
    name, score = server.resolve(body.model, text, tokens, max(0, len(users) - 1))
    runner = server.runners[name]
    choices = chat_choices(body, runner.tokenizer.encode_chat(messages, add_generation_prompt=True)[0], runner)
    last_user = users[-1] if users else messages[-1]["content"]
    flags = await asyncio.to_thread(server.check_input, [last_user])
    record = {"endpoint": "chat", "messages": messages, "input_flags": flags}
    completion = Completion(server, runner, ChatRenderer(runner.tokenizer), body, choices, record, key, score)
    raw = body.model_dump(exclude_none=True)
    # the semantic cache: the same conversation up to a last user message that means the same
    semantic = ({**raw, "messages": messages[:-1]}, last_user) if messages[-1]["role"] == "user" else None
    return await completion.respond(request, server.cache.key(name, raw, semantic))


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request, server: ServerDep):
    server.authenticate(request)
    if server.moderator is None:
        message = "moderation is not configured: start the server with --moderation DIR "
        raise APIError(400, message + "(train one with `gptstack moderation train`)", param="model")
    texts = [body.input] if isinstance(body.input, str) else body.input
    verdicts = await asyncio.to_thread(server.moderator, texts)
    results = [
        {"flagged": v.flagged, "categories": v.categories, "category_scores": v.scores, "action": v.action}
        for v in verdicts
    ]
    return {"id": "modr-" + uuid.uuid4().hex[:24], "model": "gptstack-moderation", "results": results}


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request, server: ServerDep):
    key = server.authenticate(request)
    record = server.responses.get(body.response_id)
    if record is None:
        message = f"no recent response with id {body.response_id!r}"
        raise APIError(404, message, param="response_id", code="response_not_found")
    rating = {"response_id": body.response_id, "rating": body.rating, "comment": body.comment}
    server.feedback.write({**rating, "key": key.fingerprint if key else None, **record})
    return {"id": body.response_id, "object": "feedback", "rating": body.rating, "stored": True}


# ---- errors, counting, schema ----------------------------------------------------------------------------


async def _api_error(request: Request, e: APIError):
    if e.reason:
        _server(request).metrics.rejected.labels(e.reason).inc()
    return e.response()


async def _invalid(request: Request, e: RequestValidationError):
    """pydantic's errors as one 400: `param` names the first bad field."""
    _server(request).metrics.rejected.labels("invalid").inc()
    errs = e.errors()

    def where(err: dict) -> str:
        return ".".join(str(x) for x in err.get("loc", ()) if x != "body")

    message = "; ".join(f"{where(err) or 'body'}: {err.get('msg')}" for err in errs[:5])
    first = [str(x) for x in (errs[0] if errs else {}).get("loc", ()) if x != "body"]
    return error_response(400, message or "invalid request", param=first[0] if first else None)


async def _http(request: Request, e: StarletteHTTPException):
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))


async def _crash(request: Request, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


async def _count(request: Request, call_next):
    response = await call_next(request)
    route = request.scope.get("route")
    _server(request).metrics.http.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
    return response


def _openapi(app: FastAPI) -> dict:
    """The schema, with the served model names as the `model` fields' enum."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in ("CompletionRequest", "ChatRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = app.state.server.model_names()
        app.openapi_schema = schema
    return app.openapi_schema


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.server.start()
    yield
    app.state.server.stop()


def create_app(engines: dict[str, Engine], config: ServeConfig | None = None) -> FastAPI:
    """The app over `engines` (name → Engine; each gets its runner thread while the app runs)."""
    config = config or ServeConfig()
    description = "OpenAI-compatible API over the gptstack inference engine."
    app = FastAPI(title="gptstack", version="0.1.0", lifespan=_lifespan, description=description)
    app.state.server = server = Server(engines, config)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
    app.middleware("http")(_count)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.openapi = lambda: _openapi(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes, metrics=server.metrics)
    return app
