"""The OpenAI-compatible HTTP API (FastAPI): the routes, over the shared state in server.py.

    app = create_app({"small": engine_a, "large": engine_b}, ServeConfig(api_keys="keys.txt"))
    uvicorn.run(app, port=8000)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/moderations,
POST /v1/feedback, GET /health, GET /metrics, the web chat at / (static files in web/), and the human
review queue (review.py; keys with role reviewer): POST /v1/review/next, POST /v1/review/items/{id}/label,
GET /v1/review/stats, and its page at /review.
Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}} with its status:
400 bad parameters / prompt over the context / blocked by moderation, 401 key, 403 not a reviewer's
key, 404 model or route, 409 a review label without a live lease,
413 body too large, 429 rate limited (Retry-After), 503 queue full.

A route only reads its request: it authenticates, takes the body (sized before it is parsed:
Server.check_body), builds its `Completion` off the event loop (completion.py: counted, routed,
tokenized) and lets it answer. The state they share is the app's `Server` (app.state.server); the
engines sit behind its runners. The event loop does a few milliseconds of work per request at most, so
/health answers while the largest bodies arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptstack.infer.engine import Engine
from gptstack.serve.completion import chat_completion, text_completion
from gptstack.serve.config import ServeConfig
from gptstack.serve.gateway import ApiKey
from gptstack.serve.protocol import ChatRequest, CompletionRequest, FeedbackRequest, ModerationRequest
from gptstack.serve.review import LEASE_S, ReviewError, ReviewQueue
from gptstack.serve.server import APIError, BodyLimit, Server, error_response

WEB = Path(__file__).parent / "web"


def _server(request: Request) -> Server:
    return request.app.state.server


def _key(request: Request) -> ApiKey | None:
    return _server(request).authenticate(request)


def _body(model: type[BaseModel]):
    """A body parameter: sized (400 when it holds more than any request needs), then parsed by pydantic."""

    async def parse(request: Request, key: KeyDep):  # after the key: no work for a request without one
        raw = await request.body()
        await _server(request).check_body(raw)
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None

    return Annotated[model, Depends(parse)]


def _schema(model: type[BaseModel]) -> dict:
    """The OpenAPI requestBody of a route that parses its body itself (components added in _openapi)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


class ReviewLabel(BaseModel):
    """A reviewer's label for the item they claimed (review.py LABELS), with an optional corrected response."""

    model_config = ConfigDict(extra="forbid")

    label: Literal["appropriate", "refusal", "harmful"]
    text: str | None = Field(None, max_length=100_000)


ServerDep = Annotated[Server, Depends(_server)]
KeyDep = Annotated[ApiKey | None, Depends(_key)]
BODIES = (CompletionRequest, ChatRequest, ModerationRequest, FeedbackRequest, ReviewLabel)
CompletionBody, ChatBody, ModerationBody, FeedbackBody, ReviewLabelBody = (_body(m) for m in BODIES)
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
async def models(server: ServerDep, key: KeyDep):
    head = {"object": "model", "created": server.created, "owned_by": "gptstack"}
    data = [{"id": n, **head, "max_model_len": server.runner(n).context} for n in server.model_names()]
    return {"object": "list", "data": data}


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB / "index.html")


@router.post("/v1/completions", openapi_extra=_schema(CompletionRequest))
async def completions(request: Request, server: ServerDep, key: KeyDep, body: CompletionBody):
    completion = await asyncio.to_thread(text_completion, server, body, key)
    return await completion.respond(request)


@router.post("/v1/chat/completions", openapi_extra=_schema(ChatRequest))
async def chat_completions(request: Request, server: ServerDep, key: KeyDep, body: ChatBody):
    completion = await asyncio.to_thread(chat_completion, server, body, key)
    return await completion.respond(request)


@router.post("/v1/moderations", openapi_extra=_schema(ModerationRequest))
async def moderations(server: ServerDep, key: KeyDep, body: ModerationBody):
    if server.moderator is None:
        message = "moderation is not configured: start the server with --moderation DIR "
        raise APIError(400, message + "(train one with `gptstack moderation train`)", param="model")
    server.admit(key, 0)  # a request against the key's rpm: moderating a megabyte is seconds of CPU
    texts = [body.input] if isinstance(body.input, str) else body.input
    verdicts = await asyncio.to_thread(server.moderator, texts)
    results = [
        {"flagged": v.flagged, "categories": v.categories, "category_scores": v.scores, "action": v.action}
        for v in verdicts
    ]
    return {"id": "modr-" + uuid.uuid4().hex[:24], "model": "gptstack-moderation", "results": results}


@router.post("/v1/feedback", openapi_extra=_schema(FeedbackRequest))
async def feedback(server: ServerDep, key: KeyDep, body: FeedbackBody):
    record = server.responses.get(body.response_id)
    if record is None:
        message = f"no recent response with id {body.response_id!r}"
        raise APIError(404, message, param="response_id", code="response_not_found")
    rating = {"response_id": body.response_id, "rating": body.rating, "comment": body.comment}
    server.feedback.write({**rating, "key": key.fingerprint if key else None, **record})
    queued = server.review is not None and body.rating == "down"
    if queued:
        await asyncio.to_thread(server.review.add_answer, body.response_id, record, ["feedback:down"], body.comment)
    return {"id": body.response_id, "object": "feedback", "rating": body.rating, "stored": True, "review": queued}


# ---- the review queue (keys with role reviewer) -----------------------------------------------------------


def _reviewer(server: ServerDep, key: KeyDep) -> tuple[ReviewQueue, str]:
    """The queue and the reviewer's name (their key's): 404 without a queue, 401 without a key, 403 for a key
    that is not a reviewer's."""
    if server.review is None:
        raise APIError(404, "review is not configured: start the server with --review-db FILE", code="not_found")
    if key is None:
        message = "the review queue needs an API key with role reviewer (the server has none: --api-keys FILE)"
        raise APIError(401, message, code="invalid_api_key", reason="auth")
    if key.role != "reviewer":
        message = f"the key {key.name!r} has role {key.role!r}; the review queue needs role reviewer"
        raise APIError(403, message, "permission_error", code="insufficient_role", reason="auth")
    return server.review, key.name


ReviewerDep = Annotated[tuple[ReviewQueue, str], Depends(_reviewer)]


async def _queue(call, *args):
    """A queue call off the event loop; its ReviewError as an API error."""
    try:
        return await asyncio.to_thread(call, *args)
    except ReviewError as e:
        raise APIError(
            e.status, str(e), code="review_" + {404: "not_found", 409: "no_lease"}.get(e.status, "bad")
        ) from None


@router.get("/review", include_in_schema=False)
async def review_page():
    return FileResponse(WEB / "review.html")


@router.post("/v1/review/next")
async def review_next(reviewer: ReviewerDep):
    """Claim the next item for this reviewer (their live one if they hold it): prompt, response, reasons."""
    queue, name = reviewer
    return {"object": "review.claim", "reviewer": name, "item": await _queue(queue.claim, name, LEASE_S)}


@router.post("/v1/review/items/{item_id}/label", openapi_extra=_schema(ReviewLabel))
async def review_label(item_id: int, reviewer: ReviewerDep, body: ReviewLabelBody):
    queue, name = reviewer
    return {"object": "review.label", **await _queue(queue.label, item_id, name, body.label, body.text)}


@router.get("/v1/review/stats")
async def review_stats(reviewer: ReviewerDep):
    """Items by state and each batch's agreement and Cohen's kappa."""
    return {"object": "review.stats", **await _queue(reviewer[0].stats)}


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
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in BODIES:  # the bodies the routes parse themselves (_body)
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
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
