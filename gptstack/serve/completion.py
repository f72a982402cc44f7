"""One completion request, from a validated body to its answer (vLLM's serving_completion and
serving_chat): the request is a `Completion`, each of its samples a `Choice`, and what differs between
the two endpoints' responses a renderer.

    completion = await asyncio.to_thread(text_completion, server, body, key)   # chat: chat_completion
    return await completion.respond(request)

Building a Completion counts the work before it makes any: prompts × n engine requests and the prompt
tokens, against the server's max_jobs and max_prompt_tokens (400); routing and tokenizing (the chat
template too) run off the event loop, which only ever does a few milliseconds of work per request.

A Completion's life:
1. the rate-limit budget taken first, so that a key's limits gate all the work after: 1 request, and
   prompt tokens + every choice's max_tokens (429 when the key has none left);
2. every input message or prompt moderated (400 when one is blocked);
3. a cached answer, if the cache has one for this API key, served under a new id (JSON or a replayed
   stream);
4. 503 when the model's queue has no room for all of its engine requests (nothing of it is queued);
   after 2, 3 or 4 the tokens go back (the request still counts);
5. one engine request per Choice, that is per (prompt, sample of n), submitted together;
6. the outputs, gathered into one JSON answer or sent as server-sent events as they come. Each choice's
   text is moderated every `moderation_every` characters and at the end; a blocked choice ends with
   finish_reason "content_filter" (withheld whole from a JSON answer, cut at the check in a stream);
7. at the end, or as soon as the client goes away (status 499; its engine requests are aborted, which
   frees their KV blocks): the unused budget goes back, the usage line is written, the response is kept
   for feedback and, when the request is deterministic, cached.

Renderers: `TextRenderer` (/v1/completions: `text`, echo, log-probabilities as tokens / token_logprobs /
top_logprobs / text_offset) and `ChatRenderer` (/v1/chat/completions: `message`, streamed `delta`s,
log-probabilities as `content` entries with bytes).

Retrieval (a chat body's `retrieval`, on a server started with --rag-index): rag/cite.py numbers the
index's best chunks as sources in front of the last user message; each choice's text passes through its
CitationFilter in `_take` (JSON and stream alike, so no `[n]` naming a missing source is ever sent), and
the response, or a stream's opening and final chunks, carries the same `citations` list. Not cached.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptstack.infer.engine import ImageInput, RequestOutput
from gptstack.infer.sampling import SamplingParams
from gptstack.rag.cite import Grounding, ground
from gptstack.serve.cache import CacheHit, CacheKey
from gptstack.serve.gateway import ApiKey
from gptstack.serve.images import image_parts, image_prompt
from gptstack.serve.moderation import WINDOW_CHARS
from gptstack.serve.protocol import ChatRequest, CompletionRequest
from gptstack.serve.runner import EngineRunner, QueueFull, Stream, merge
from gptstack.serve.server import APIError, Server, refused
from gptstack.tokenizer import Tokenizer

TAIL = 2 * WINDOW_CHARS  # characters of already checked output that each output check reads again
TokenLogprob = tuple[float, list[tuple[int, float]]]  # (log-probability, [(token, log-probability)] top alternatives)


@dataclass
class Choice:
    """One sample of one prompt: what it asks the engine for, and what it has produced so far."""

    index: int
    prompt: list[int]
    params: SamplingParams
    echo: str | None = None  # completions with echo: the prompt's text, shown before the output
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs: per prompt token (None first)
    finish_reason: str | None = None
    checked: int = 0  # len(text) at the last output moderation
    images: tuple[ImageInput, ...] = ()  # the prompt's images (chat with image_url parts)

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason, self.prompt_logprobs = out.finish_reason, out.prompt_logprobs


def token_str(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text, or 'bytes:\\xNN…' when it is not whole UTF-8."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


# ---- the two response formats ------------------------------------------------------------------------------


class Renderer:
    """What differs between the endpoints' responses: names here, shapes in the methods of
    TextRenderer and ChatRenderer (logprobs, choice, final, delta, first, opening, content)."""

    endpoint: str  # the usage log's name for the endpoint
    prefix: str  # of response ids
    object: str  # of a whole response
    chunk_object: str  # of a streamed chunk
    prompt_param: str  # the parameter an error about the prompt names

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer


class TextRenderer(Renderer):
    """/v1/completions: choices carry `text`; a streamed piece has the same shape as a choice."""

    endpoint, prefix, object, chunk_object = "completion", "cmpl-", "text_completion", "text_completion"
    prompt_param = "prompt"

    def logprobs(self, entries: list[TokenLogprob], token_ids: list[int]) -> dict:
        tokens, lps, tops = [], [], []
        for t, (lp, top) in zip(token_ids, entries, strict=True):
            tokens.append(token_str(self.tokenizer, t)[0])
            lps.append(lp)
            tops.append({token_str(self.tokenizer, a)[0]: alp for a, alp in top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops}

    def final_logprobs(self, c: Choice) -> dict | None:
        """The whole answer's log-probabilities: an echoed prompt's first, then character offsets."""
        if c.params.logprobs is None:
            return None
        lp = self.logprobs(c.logprobs, c.token_ids)
        if c.echo is not None and c.prompt_logprobs is not None:
            prompt = self.logprobs([e or (None, []) for e in c.prompt_logprobs], c.prompt)
            tops = zip(c.prompt_logprobs, prompt["top_logprobs"], strict=True)
            prompt["top_logprobs"] = [None if e is None else top for e, top in tops]  # the first token has none
            lp = {k: prompt[k] + lp[k] for k in lp}
        offsets, at = [], 0
        for t in lp["tokens"]:
            offsets.append(at)
            at += 0 if t.startswith("bytes:") else len(t)
        return {**lp, "text_offset": offsets}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def final(self, c: Choice) -> dict:
        return self.choice(c.index, (c.echo or "") + c.text, self.final_logprobs(c), c.finish_reason)

    def delta(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return self.choice(index, text, logprobs, finish_reason)

    def first(self, index: int, content: str) -> dict:
        """The opening piece of a streamed choice: an echo, or a cached answer's text."""
        return self.delta(index, content, None, None)

    def opening(self, choices: list[Choice]) -> list[list[dict]]:
        """The chunks a live stream starts with: each echo."""
        return [[self.first(c.index, c.echo)] for c in choices if c.echo]

    def content(self, choice: dict) -> str:
        return choice["text"]


class ChatRenderer(Renderer):
    """/v1/chat/completions: choices carry the assistant `message`; a stream sends `delta`s."""

    endpoint, prefix, object, chunk_object = "chat", "chatcmpl-", "chat.completion", "chat.completion.chunk"
    prompt_param = "messages"

    def logprobs(self, entries: list[TokenLogprob], token_ids: list[int]) -> dict:
        content = []
        for t, (lp, top) in zip(token_ids, entries, strict=True):
            entry = self._token(t, lp)
            entry["top_logprobs"] = [self._token(a, alp) for a, alp in top]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _token(self, token: int, logprob: float) -> dict:
        text, raw = token_str(self.tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def final(self, c: Choice) -> dict:
        logprobs = None if c.params.logprobs is None else self.logprobs(c.logprobs, c.token_ids)
        return self.choice(c.index, c.text, logprobs, c.finish_reason)

    def delta(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def first(self, index: int, content: str) -> dict:
        """The opening piece of a streamed choice: the role (and a cached answer's text)."""
        delta = {"role": "assistant", "content": content}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def opening(self, choices: list[Choice]) -> list[list[dict]]:
        """The chunks a live stream starts with: one carrying every choice's role."""
        return [[self.first(c.index, "") for c in choices]]

    def content(self, choice: dict) -> str:
        return choice["message"]["content"]


# ---- from a request body to choices --------------------------------------------------------------------


def text_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """A completion request's prompts: from a string, a list of strings, token ids, or lists of ids."""
    p = body.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    return prompts


def chat_messages(body: ChatRequest) -> list[dict[str, str]]:
    """The messages as the chat template takes them (developer → system, text parts joined)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


def grounding(server: Server, body: ChatRequest, messages: list[dict[str, str]]) -> Grounding | None:
    """`retrieval`: the server index's best chunks for the last user message, numbered as sources."""
    if body.retrieval is None:
        return None
    if server.retriever is None:
        message = "this server has no retrieval index (start it with --rag-index INDEX)"
        raise APIError(400, message, param="retrieval")
    try:
        return ground(server.retriever, messages, body.retrieval.k, body.retrieval.method)
    except ValueError as e:  # no user text to search for; dense search on an index without embeddings
        raise APIError(400, str(e), param="retrieval") from None


def sampling_params(
    body: CompletionRequest | ChatRequest, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> list[SamplingParams]:
    """body.n SamplingParams from the body's sampling fields; sample j has seed `seed + j`."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    fields = dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        max_tokens=max_tokens,
        stop=tuple(s for s in stop if s),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    return [SamplingParams(seed=None if body.seed is None else body.seed + j, **fields) for j in range(body.n)]


def checked(runner: EngineRunner, prompt: list[int], params: SamplingParams, prompt_param: str, images=()) -> None:
    """400 (context_length_exceeded for the context) when the engine would refuse the request."""
    try:
        runner.check(prompt, params, images)
    except ValueError as e:
        raise refused(e, prompt_param) from None


def text_choices(
    body: CompletionRequest, prompts: list[str | list[int]], runner: EngineRunner
) -> tuple[list[Choice], list[str]]:
    """n Choices per prompt, and the prompts as text. max_tokens 0 with echo asks for the prompt's
    log-probabilities only: the engine generates one token, which the answer drops."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo (prompt log-probabilities only)", param="max_tokens")
    tok = runner.tokenizer
    choices, texts = [], []
    for p in prompts:
        ids = tok.encode_prompt(p) if isinstance(p, str) else list(p)  # a text starts with BOS (Gemma); ids as given
        max_tokens = 1 if body.max_tokens == 0 else body.max_tokens or max(1, runner.context - len(ids))
        samples = sampling_params(body, max_tokens, body.logprobs, body.logprobs if body.echo else None)
        checked(runner, ids, samples[0], "prompt")
        texts.append(p if isinstance(p, str) else tok.decode(ids))
        echo = texts[-1] if body.echo else None
        choices += [Choice(len(choices) + j, ids, params, echo) for j, params in enumerate(samples)]
    return choices, texts


def chat_choices(body: ChatRequest, prompt: list[int], runner: EngineRunner, images=()) -> list[Choice]:
    """n Choices of the templated conversation; max_tokens defaults to the rest of the context."""
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, runner.context - len(prompt))
    samples = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    checked(runner, prompt, samples[0], "messages", images)
    return [Choice(j, prompt, params, images=tuple(images)) for j, params in enumerate(samples)]


def text_completion(server: Server, body: CompletionRequest, key: ApiKey | None) -> Completion:
    """A /v1/completions body as its Completion: counted, routed, tokenized. Runs off the event loop."""
    prompts = text_prompts(body)
    server.check_work(len(prompts) * body.n, sum(len(p) for p in prompts if not isinstance(p, str)), "prompt")
    first = prompts[0] if isinstance(prompts[0], str) else ""  # routing looks at the first prompt
    name, score = server.resolve(body.model, first, len(first) // 4 if first else len(prompts[0]))
    runner = server.runners[name]
    choices, texts = text_choices(body, prompts, runner)
    server.check_work(len(choices), sum(len(c.prompt) for c in choices[:: body.n]), "prompt")
    cache_key = server.cache.key(name, body.model_dump(exclude_none=True), scope=server.cache_scope(key))
    record = {"endpoint": "completions", "prompt": texts}
    renderer = TextRenderer(runner.tokenizer)
    return Completion(server, runner, renderer, body, choices, record, key, score, texts, cache_key)


def chat_completion(server: Server, body: ChatRequest, key: ApiKey | None) -> Completion:
    """A /v1/chat/completions body as its Completion: counted, routed, templated. Runs off the event loop.
    Every message is moderated, whoever it claims to be from."""
    if len(body.messages) > server.config.max_messages:
        message = f"{len(body.messages)} messages; one request may send at most {server.config.max_messages}"
        raise APIError(400, message, param="messages", code="request_too_large", reason="too_large")
    server.check_work(body.n, 0, "n")
    messages = chat_messages(body)
    grounded = grounding(server, body, messages)  # retrieval: the sources go in front of the last user message
    messages = grounded.messages if grounded else messages
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = "\n".join(m["content"] for m in messages)
    tokens = server.count_tokens("".join(m["content"] for m in messages))
    name, score = server.resolve(body.model, text, tokens, max(0, len(users) - 1))
    seeing = [n for n, r in server.runners.items() if r.vision_config is not None]
    if image_parts(body) and body.model == "auto" and name not in seeing and seeing:  # only those can see
        name = max(seeing, key=lambda n: server.runners[n].n_params)
    runner = server.runners[name]
    images = []  # image_url parts: the prompt has a placeholder run for each (serve/images.py)
    if image_parts(body):
        prompt, images = image_prompt(body, runner, server.config, grounded.hits if grounded else ())
    else:
        prompt = runner.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    server.check_work(body.n, len(prompt), "messages")
    choices = chat_choices(body, prompt, runner, images)
    raw = body.model_dump(exclude_none=True)
    # the semantic cache: the same conversation up to a last user message that means the same (never with
    # images: its text alone would match another image's answer)
    semantic = ({**raw, "messages": messages[:-1]}, users[-1]) if messages[-1]["role"] == "user" else None
    semantic = None if images else semantic
    cache_key = server.cache.key(name, raw, semantic, server.cache_scope(key))
    record = {"endpoint": "chat", "messages": messages}
    inputs = [m["content"] for m in messages if m["content"].strip()]
    cache_key = None if grounded else cache_key  # a replayed stream would come without its citations
    return Completion(
        server, runner, ChatRenderer(runner.tokenizer), body, choices, record, key, score, inputs, cache_key, grounded
    )


# ---- one request ----------------------------------------------------------------------------------------


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def json_body(response: dict) -> bytes:
    """A response as JSONResponse renders it, its choices last and serialized one at a time: json.dumps holds
    the GIL for a whole call, and one call over 64 choices with 20 log-probabilities per token (7 MB) is
    0.4 s that the event loop could not run, even from a worker thread."""
    dump = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    head = dump({k: v for k, v in response.items() if k != "choices"})
    return (head[:-1] + ',"choices":[' + ",".join(dump(c) for c in response["choices"]) + "]}").encode()


async def disconnected(request: Request) -> None:
    """Return once the client has gone. The body is read, so the next ASGI message is `http.disconnect`:
    the server sends it when the connection drops (uvicorn reads the socket again while this waits)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Completion:
    """One request's life (module docstring). `record`: what feedback stores with the answer (the
    endpoint, the prompt or messages, the input's moderation flags); `inputs`: the texts moderated
    before anything runs; `cache_key`: its place in the response caches (None: not cached)."""

    def __init__(
        self,
        server: Server,
        runner: EngineRunner,
        renderer: TextRenderer | ChatRenderer,
        body: CompletionRequest | ChatRequest,
        choices: list[Choice],
        record: dict,
        key: ApiKey | None = None,
        route_score: float | None = None,
        inputs: list[str] | None = None,
        cache_key: CacheKey | None = None,
        grounding: Grounding | None = None,
    ):
        self.server, self.runner, self.renderer, self.body = server, runner, renderer, body
        self.choices, self.record, self.key, self.route_score = choices, record, key, route_score
        self.inputs, self.cache_key, self.grounding = inputs or [], cache_key, grounding
        self.id = renderer.prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_tokens = sum(len(c.prompt) for c in choices[:: body.n])  # each prompt once, not per sample
        self.budget = self.prompt_tokens + sum(c.params.max_tokens for c in choices)
        self.echo_only = body.max_tokens == 0  # only completions accept 0 (text_choices)
        self.flagged: list[str] = []  # output moderation's categories
        self.start = time.perf_counter()
        self.headers = {"x-request-id": self.id}
        if route_score is not None:
            self.headers["x-gptstack-routed-to"] = runner.name

    async def respond(self, request: Request) -> Response:
        self.server.admit(self.key, self.budget)
        try:
            self.record["input_flags"] = await asyncio.to_thread(self.server.check_input, self.inputs)
            if self.cache_key is not None and (hit := await self.server.cache.get(self.cache_key)) is not None:
                self.server.limiter.refund(self.key, self.budget)
                return self._replay(hit)
            self.server.check_room(self.runner, len(self.choices))
        except APIError:
            self.server.limiter.refund(self.key, self.budget)
            raise
        self.start = time.perf_counter()
        streams = await self._submit()
        if self.body.stream:
            return StreamingResponse(self._events(streams), media_type="text/event-stream", headers=self.headers)
        return await self._answer(request, streams)

    async def _submit(self) -> list[Stream]:
        """One engine request per choice, posted together (the engine thread takes them in one pass)."""
        submits = (self.runner.submit(c.prompt, c.params, c.images) for c in self.choices)
        results = await asyncio.gather(*submits, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed:
            return results
        for r in results:
            if isinstance(r, Stream):
                r.close()
        self.server.limiter.refund(self.key, self.budget)
        e = failed[0]
        if isinstance(e, QueueFull):
            raise APIError(503, str(e), "server_error", code="queue_full", reason="queue_full") from None
        if isinstance(e, ValueError):
            raise refused(e, self.renderer.prompt_param) from None
        raise e

    def _take(self, i: int, out: RequestOutput) -> RequestOutput:
        """Add an output to choice i; an echo-only request drops the token generated."""
        if self.echo_only:
            out = replace(out, text="", token_ids=[], logprobs=[], finish_reason="length" if out.finished else None)
        if self.grounding is not None:  # [n] markers that name no source are taken out as the text streams
            out = replace(out, text=self.grounding.filter(i, out.text, out.finished))
        self.choices[i].add(out)
        return out

    async def _blocked(self, c: Choice, final: bool) -> bool:
        """Moderate c's text (each `moderation_every` new characters, and at the end): True when it must
        stop. Each check reads what is new since the last one and the TAIL characters before it, so a
        window (moderation.py) that straddles two checks is still read whole. Off the event loop."""
        server = self.server
        if final and server.output_judge is not None and c.text.strip():
            prompt, flagged = (self.inputs[-1] if self.inputs else ""), bool(self.record.get("input_flags"))
            self.flagged.extend(await asyncio.to_thread(server.judge_output, prompt, c.text, flagged))
        if server.moderator is None or (not final and len(c.text) - c.checked < server.config.moderation_every):
            return False
        text, c.checked = c.text[max(0, c.checked - TAIL) :], len(c.text)
        if not text.strip():
            return False
        verdict = (await asyncio.to_thread(server.moderate, [text], "output"))[0]
        self.flagged.extend(verdict.hits())
        return verdict.action == "block"

    def _finish(self, status: int) -> dict:
        """Give back the unused budget, write the usage line, keep the answer for feedback; the usage."""
        n_out = sum(len(c.token_ids) for c in self.choices)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n_out}
        usage["total_tokens"] = self.prompt_tokens + n_out
        self.server.limiter.refund(self.key, self.budget - usage["total_tokens"])
        self.server.usage.write(
            {
                "id": self.id,
                "key": self.key.fingerprint if self.key else None,
                "endpoint": self.renderer.endpoint,
                "model": self.runner.name,
                "requested_model": self.body.model,
                "route_score": self.route_score,
                "status": status,
                "finish_reasons": [c.finish_reason for c in self.choices],
                "latency_s": round(time.perf_counter() - self.start, 4),
                **usage,
                "moderation_flags": sorted(set(self.record.get("input_flags", []) + self.flagged)),
                "cache": None,
            }
        )
        answer = {**self.record, "model": self.runner.name, "response": [c.text for c in self.choices]}
        answer["output_flags"] = sorted(set(self.flagged))  # the review queue takes flagged answers
        self.server.remember(self.id, answer)
        return usage

    async def _store(self, response: dict) -> None:
        if self.cache_key is not None:
            await self.server.cache.put(self.cache_key, response)

    def _response(self, choices: list[dict], usage: dict) -> dict:
        head = {"id": self.id, "object": self.renderer.object, "created": self.created, "model": self.runner.name}
        return {**head, "choices": choices, "usage": usage, **self._citations()}

    def _citations(self) -> dict:
        """The numbered sources of a grounded request (`citations`, as in Perplexity's API), else nothing."""
        return {} if self.grounding is None else {"citations": self.grounding.citations()}

    def _chunk(self, choices: list[dict], usage: dict | None = None, cite: bool = False) -> str:
        """An SSE chunk; `cite`: the opening and each choice's last carry the citations (the same list)."""
        chunk = {"id": self.id, "object": self.renderer.chunk_object, "created": self.created}
        chunk |= {"model": self.runner.name, "choices": choices, "system_fingerprint": "gptstack"}
        chunk |= self._citations() if cite else {}
        return sse(chunk if usage is None else {**chunk, "usage": usage})

    @property
    def _include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    # ---- a JSON answer -------------------------------------------------------------------------------

    async def _answer(self, request: Request, streams: list[Stream]) -> Response:
        if not await self._gather(request, streams):
            self._finish(499)
            return Response(status_code=499)
        for c in self.choices:
            if await self._blocked(c, final=True):
                c.text, c.finish_reason = "", "content_filter"
        # rendering (each token's text, for every log-probability) and serializing run off the event loop:
        # 64 choices of 200 tokens with 20 alternatives each held it for 1.5 s
        choices = await asyncio.to_thread(lambda: [self.renderer.final(c) for c in self.choices])
        response = self._response(choices, self._finish(200)) | {"system_fingerprint": "gptstack"}
        await self._store(response)
        body = await asyncio.to_thread(json_body, response)
        return Response(body, media_type="application/json", headers=self.headers)

    async def _gather(self, request: Request, streams: list[Stream]) -> bool:
        """Every output into its Choice; False as soon as the client goes away (its requests are aborted)."""

        async def collect() -> None:
            async for i, out in merge(streams):  # leaving it early (cancelled) aborts the rest
                self._take(i, out)

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if work.cancelled():
            return False
        work.result()  # an engine failure raises here
        return True

    # ---- a stream -------------------------------------------------------------------------------------

    async def _events(self, streams: list[Stream]) -> AsyncIterator[str]:
        status, merged = 499, merge(streams)
        try:
            for pieces in self.renderer.opening(self.choices):
                yield self._chunk(pieces, cite=True)
            async for i, out in merged:
                if self.choices[i].finish_reason is not None:
                    continue  # stopped by moderation; its abort is on the way
                piece = await self._piece(self.choices[i], self._take(i, out), streams[i])
                if piece is not None:
                    yield self._chunk([piece], cite=piece["finish_reason"] is not None)
                if all(c.finish_reason is not None for c in self.choices):
                    break
            status = 200
            usage = self._finish(200)
            if self._include_usage:
                yield self._chunk([], usage)
            choices = [self.renderer.choice(c.index, c.text, None, c.finish_reason) for c in self.choices]
            await self._store(self._response(choices, usage))
            yield "data: [DONE]\n\n"
        finally:
            await merged.aclose()
            if status != 200:
                self._finish(status)

    async def _piece(self, c: Choice, out: RequestOutput, stream: Stream) -> dict | None:
        """The streamed piece of choice c for one output (None when there is nothing to send)."""
        text = out.text
        if await self._blocked(c, final=out.finished):
            stream.close()
            text, c.finish_reason = "", "content_filter"
        lp = None
        if c.params.logprobs is not None and out.token_ids:
            lp = self.renderer.logprobs(out.logprobs, out.token_ids)
        if text or lp or c.finish_reason:
            return self.renderer.delta(c.index, text, lp, c.finish_reason)
        return None

    # ---- a cached answer ------------------------------------------------------------------------------

    def _replay(self, hit: CacheHit) -> Response:
        """A cached answer under this request's id, as JSON or as a stream."""
        self.server.metrics.cache_hits.labels(hit.kind).inc()
        response = {**hit.payload, "id": self.id, "created": self.created}
        usage = {"endpoint": self.renderer.endpoint, "model": response["model"], "requested_model": self.body.model}
        self.server.usage.write({"id": self.id, **usage, "status": 200, "cache": hit.kind, **response["usage"]})
        headers = {"x-gptstack-cache": hit.kind, "x-request-id": self.id}
        if hit.similarity is not None:
            headers["x-gptstack-similarity"] = f"{hit.similarity:.4f}"
        if not self.body.stream:
            return JSONResponse(response, headers=headers)
        return StreamingResponse(self._replayed(response), media_type="text/event-stream", headers=headers)

    async def _replayed(self, response: dict) -> AsyncIterator[str]:
        for c in response["choices"]:
            yield self._chunk([self.renderer.first(c["index"], self.renderer.content(c))])
            yield self._chunk([self.renderer.delta(c["index"], "", None, c["finish_reason"])])
        if self._include_usage:
            yield self._chunk([], response["usage"])
        yield "data: [DONE]\n\n"
