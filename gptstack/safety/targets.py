"""What a safety eval attacks: a checkpoint folder or GGUF file run by our engine, or an OpenAI-compatible
endpoint (e.g. `gptstack serve` with its gateway on).

    target = open_target("runs/x/latest", TargetConfig(max_tokens=128))
    for i, reply in target.generate(conversations):   # yields (index, Reply) as replies finish
        ...

A conversation is a list of chat messages; replies are greedy (temperature 0), so a rerun reproduces
them. Local targets render the model's own chat template and decode `max_seqs` conversations at once
(continuous batching), yielding after each batch; a conversation over the context is an error reply
for that row, not the end of the run. An endpoint gets `POST {url}/v1/chat/completions`, `concurrency`
requests in flight; a 5xx, 429, refused connection or timeout is retried `retries` times with backoff,
then raises TargetError: the caller keeps what finished and a rerun resumes. A 4xx is that row's error,
except a gateway's moderation block (400 `content_policy_violation`, or finish_reason `content_filter`),
which is the system refusing and is returned as `Reply(text="", blocked=...)`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from gptstack.infer.engine import EngineConfig
from gptstack.infer.load import LoadConfig, load_engine
from gptstack.infer.sampling import SamplingParams

Turns = list[dict[str, str]]


class TargetError(RuntimeError):
    """The target stopped answering (5xx, timeout, connection refused after the retries)."""


@dataclass
class TargetConfig:
    max_tokens: int = 128  # tokens generated per reply (greedy)
    max_seqs: int = 16  # local targets: conversations decoded at once
    device: str = "cpu"  # local targets: cpu | cuda
    model: str | None = None  # endpoint: the model to request (default: the first of GET /v1/models)
    api_key: str | None = None  # endpoint: sent as a bearer token
    timeout: float = 120.0  # endpoint: seconds per request
    retries: int = 2  # endpoint: retries of a 5xx/429/timeout before the run stops (partial results kept)
    concurrency: int = 4  # endpoint: requests in flight


@dataclass
class Reply:
    text: str
    blocked: str | None = None  # "input" | "output" when a gateway's moderation withheld the answer
    error: str | None = None  # a row that could not be run (e.g. over the context); not judged


class LocalTarget:
    """A checkpoint folder or GGUF file on our engine, the model's chat template applied."""

    def __init__(self, path: str, cfg: TargetConfig):
        self.name, self.cfg = str(path), cfg
        load = LoadConfig(checkpoint=str(path), device=cfg.device)
        self.engine = load_engine(load, EngineConfig(max_seqs=cfg.max_seqs))
        self.params = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens)

    def _encode(self, turns: Turns) -> list[int] | str:
        """The conversation's ids, or the reason it cannot run."""
        ids = self.engine.tokenizer.encode_chat(turns, add_generation_prompt=True)[0]
        try:
            self.engine.check_request(ids, self.params)
        except ValueError as e:
            return str(e)
        return ids

    def generate(self, convs: list[Turns]) -> Iterator[tuple[int, Reply]]:
        for lo in range(0, len(convs), self.cfg.max_seqs):
            encoded = [(i, self._encode(c)) for i, c in enumerate(convs[lo : lo + self.cfg.max_seqs], lo)]
            for i, why in encoded:
                if isinstance(why, str):
                    yield i, Reply("", error=why)
            ok = [(i, ids) for i, ids in encoded if not isinstance(ids, str)]
            outs = self.engine.generate([ids for _, ids in ok], self.params) if ok else []
            for (i, _), out in zip(ok, outs, strict=True):
                yield i, Reply(out.text)


class EndpointTarget:
    """An OpenAI-compatible server's chat completions, through urllib (no client library needed)."""

    def __init__(self, url: str, cfg: TargetConfig):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.cfg = cfg
        self.model = cfg.model or self._call("GET", "/v1/models")["data"][0]["id"]
        self.name = f"{self.base} ({self.model})"

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
            return json.loads(r.read())

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer; retried on 5xx/429/timeouts/refused connections, then TargetError. A 4xx
        raises urllib.error.HTTPError for the caller to read."""
        for attempt in range(self.cfg.retries + 1):
            try:
                return self._request(method, path, body)
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:
                    raise
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.cfg.retries:
                time.sleep(0.5 * 2**attempt)
        raise TargetError(f"{self.base}{path}: {why} after {self.cfg.retries + 1} attempts")

    def reply(self, turns: Turns) -> Reply:
        body = {"model": self.model, "messages": turns, "max_tokens": self.cfg.max_tokens, "temperature": 0}
        try:
            choice = self._call("POST", "/v1/chat/completions", body)["choices"][0]
        except urllib.error.HTTPError as e:
            err = _error_of(e)
            if err.get("code") == "content_policy_violation":
                return Reply("", blocked="input")
            return Reply("", error=f"HTTP {e.code}: {err.get('message', '')}")
        if choice.get("finish_reason") == "content_filter":
            return Reply(choice["message"].get("content") or "", blocked="output")
        return Reply(choice["message"].get("content") or "")

    def generate(self, convs: list[Turns]) -> Iterator[tuple[int, Reply]]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            futures = {pool.submit(self.reply, c): i for i, c in enumerate(convs)}
            try:
                for f in as_completed(futures):
                    yield futures[f], f.result()
            finally:  # a TargetError (or the caller stopping): cancel what has not started
                for f in futures:
                    f.cancel()


def _error_of(e: urllib.error.HTTPError) -> dict:
    try:
        return json.loads(e.read()).get("error") or {}
    except (ValueError, AttributeError):
        return {}


def open_target(spec: str, cfg: TargetConfig) -> LocalTarget | EndpointTarget:
    """An endpoint for an http(s):// URL, else a local checkpoint folder or GGUF file."""
    if spec.startswith(("http://", "https://")):
        return EndpointTarget(spec, cfg)
    if not Path(spec).exists():
        raise FileNotFoundError(f"target {spec!r}: not a checkpoint folder, GGUF file or http(s):// URL")
    return LocalTarget(spec, cfg)
