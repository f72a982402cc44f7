"""The server's attacks (issue 24), each reproduced against a real uvicorn server on loopback: a fan-out
body that froze the event loop, clients that reset non-streamed requests, one key reading another's
cached answers, moderation bypasses, key-file comments, limits below one request per minute; and the
prefix cache's block names. Small counts, seconds of CPU."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest
from serve_util import LiveServer, raw_post, reset, tiny_engine, wait_until

from gptstack.config import ConfigError
from gptstack.infer.engine import block_digest
from gptstack.infer.sampling import SamplingParams
from gptstack.serve.app import create_app
from gptstack.serve.config import ModerationTrainConfig, ServeConfig
from gptstack.serve.gateway import Limiter, RateLimited, TokenBucket, load_keys
from gptstack.serve.moderation import train_moderation, windows
from gptstack.serve.protocol import json_size, json_size_bound


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


class HealthProbe:
    """GET /health in a loop on its own thread; `worst`: the slowest answer, in seconds."""

    def __init__(self, url: str):
        self.url, self.worst, self.count, self.failed, self.stop = url, 0.0, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as h:
            while not self.stop.is_set():
                start = time.perf_counter()
                self.failed += h.get("/health").status_code != 200
                self.worst, self.count = max(self.worst, time.perf_counter() - start), self.count + 1
                time.sleep(0.005)

    def __enter__(self) -> HealthProbe:
        self.thread.start()
        wait_until(lambda: self.count > 0, what="a first /health")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


# ---- 1. one request must not freeze the server ----------------------------------------------------------


def test_fan_out_bodies_are_refused_at_once_while_health_answers():
    """The attack: a body under 1 MiB with 250,000 one-token prompts and n=16 (4M engine requests) made
    the event loop build every job first; /health stopped answering for 70 s. Now each body is sized or
    counted before anything is built, refused with an OpenAI error, and /health keeps answering."""
    engine = tiny_engine(seed=0)
    app = create_app({"tiny": engine}, ServeConfig(exact_cache=False, max_prompt_tokens=1000))
    fan_out = json.dumps({"model": "tiny", "prompt": [[1]] * 250_000, "n": 16}, separators=(",", ":")).encode()
    assert len(fan_out) < ServeConfig().max_body_bytes
    attacks = [
        (fan_out, 400, "arrays and objects"),  # sized before parsing
        ({"model": "tiny", "prompt": [[7, 8]] * 64, "n": 16}, 400, "1024 completions"),  # counted: 64 × 16 jobs
        ({"model": "tiny", "prompt": [[9] * 400] * 4}, 400, "1600 prompt tokens"),  # counted before tokenizing
        ({"model": "tiny", "prompt": [5] * 80_000}, 400, "values"),  # sized: far more ids than max_prompt_tokens
        ({"model": "tiny", "prompt": "hello " * 170_000, "max_tokens": 1}, 400, "tokens"),  # tokenized off the loop
    ]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 20_000}
    with LiveServer(app) as server, HealthProbe(server.url) as probe, httpx.Client(base_url=server.url) as h:
        for body, status, words in attacks:
            start = time.perf_counter()
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post("/v1/completions", content=data, headers={"content-type": "application/json"}, timeout=60)
            assert words in _error(r, status)["message"] and time.perf_counter() - start < 10
        assert "arrays and objects" in _error(h.post("/v1/chat/completions", json=chat, timeout=60), 400)["message"]
        many = {**chat, "messages": chat["messages"][:600]}  # sized fine, but over max_messages
        assert _error(h.post("/v1/chat/completions", json=many, timeout=60), 400)["param"] == "messages"
        assert (
            h.post("/v1/completions", json={"model": "tiny", "prompt": "still fine", "max_tokens": 2}).status_code
            == 200
        )
        assert 'gptstack:requests_rejected_total{reason="too_large"} 6.0' in h.get("/metrics").text
    assert probe.worst < 1.0 and probe.failed == 0, f"/health took {probe.worst:.3f} s during the attacks"
    assert engine.stats["prompt_tokens"] <= 10 and engine.pool.used == 0  # nothing of the attacks reached it


def test_a_request_larger_than_the_queue_room_gets_503_before_any_of_it_queues():
    engine = tiny_engine(max_seqs=1, context=8192)
    app = create_app({"tiny": engine}, ServeConfig(max_waiting=4, exact_cache=False))
    runner = app.state.server.runners["tiny"]
    long = {"model": "tiny", "prompt": "go", "max_tokens": 8000, "stream": True}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # running
            with h.stream("POST", "/v1/completions", json=long):
                wait_until(lambda: runner.num_waiting == 1, what="the second request to wait")
                err = _error(h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 4}), 503)
                assert err["code"] == "queue_full" and "room for 3" in err["message"]
                assert runner.num_waiting == 1  # none of its four was queued
                err = _error(h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 5}), 400)
                assert "at most 4" in err["message"]  # more than the queue holds at all: never servable
        wait_until(lambda: engine.pool.used == 0 and not engine.has_unfinished(), what="the aborts")


def test_kept_responses_are_bounded_in_characters(monkeypatch):
    server = create_app({"tiny": tiny_engine()}, ServeConfig()).state.server
    monkeypatch.setattr("gptstack.serve.server.RECENT_CHARS", 10_000)
    for i in range(50):
        server.remember(f"r{i}", {"prompt": ["x" * 1000], "response": ["y" * 100]})
    assert list(server.responses) == [f"r{i}" for i in range(41, 50)] and server.recent_chars == 9 * 1100
    server.remember("huge", {"prompt": ["z" * 50_000]})  # over the bound alone: kept, as the only one
    assert list(server.responses) == ["huge"] and server.recent_chars == 50_000


def test_body_size_counts_what_a_parser_would_read():
    def count(value) -> tuple[int, int]:  # (containers, values) by walking the parsed value
        if isinstance(value, dict | list):
            inner = [count(v) for v in (value.values() if isinstance(value, dict) else value)]
            return 1 + sum(c for c, _ in inner), 1 + sum(v for _, v in inner)
        return 0, 1

    rng = random.Random(0)
    tricky = ["a,b", "[{", '\\"', "\\\\", '\\\\"', "\u00e9", "\\u005b", ""]
    for _ in range(200):
        value = {"s": rng.choice(tricky) * rng.randrange(3), "l": [[rng.randrange(9)] * rng.randrange(3)] * 3}
        value["o"] = [{"t": "".join(rng.choices(tricky, k=3)), "n": None}] * rng.randrange(3)
        raw = json.dumps(value).encode()
        containers, values = json_size(raw)
        assert containers == count(value)[0] and values >= count(value)[1]
        assert all(b >= e for b, e in zip(json_size_bound(raw), (containers, values), strict=True))
    with pytest.raises(ConfigError, match="max_jobs"):
        ServeConfig(max_jobs=0)


def test_openapi_still_describes_the_bodies():
    app = create_app({"tiny": tiny_engine()}, ServeConfig())
    with LiveServer(app) as server:
        schema = httpx.get(server.url + "/openapi.json").json()
    ref = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/CompletionRequest"}
    assert schema["components"]["schemas"]["ChatRequest"]["properties"]["model"]["enum"] == ["tiny"]
    assert "ChatMessage" in schema["components"]["schemas"]


# ---- 6. a client that goes away ---------------------------------------------------------------------------


def test_reset_non_streamed_requests_are_aborted_and_free_their_blocks(tmp_path):
    """The attack: 100 non-streamed requests reset by the client all ran to completion (logged 200). The
    server only looked for a disconnect after a second without output. Now it notices at once."""
    engine = tiny_engine(seed=1, max_seqs=4)
    app = create_app({"tiny": engine}, ServeConfig(exact_cache=False, log_dir=str(tmp_path)))
    runner = app.state.server.runners["tiny"]
    body = {"model": "tiny", "max_tokens": 400, "ignore_eos": True}
    with LiveServer(app) as server:
        socks = [raw_post(server.port, "/v1/completions", {**body, "prompt": f"client {i}"}) for i in range(20)]
        wait_until(lambda: runner.num_running + runner.num_waiting == 20, what="all 20 to be accepted")
        for s in socks:
            reset(s)
        wait_until(lambda: not engine.has_unfinished(), timeout=10, what="the reset requests to be aborted")
        log = tmp_path / "usage.jsonl"
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 20, what="20 usage lines")
        assert engine.pool.used == 0
        metrics = httpx.get(server.url + "/metrics").text
    assert 'request_success_total{finished_reason="abort",model_name="tiny"} 20.0' in metrics
    assert [json.loads(line)["status"] for line in log.read_text().splitlines()] == [499] * 20
    assert engine.stats["generated_tokens"] < 20 * 400 // 4  # cut early, not run to the end


# ---- 7. caches are per key -------------------------------------------------------------------------------


def test_cached_answers_are_scoped_to_the_key(tmp_path):
    """The attack: one key learned what another asked from the caches (a paraphrase hit at 0.986)."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice name=alice\nsk-bob name=bob\nsk-carol name=carol\n")
    q = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    secret = [{"role": "user", "content": "What is the capital of France?"}]
    para = [{"role": "user", "content": "what's the capital of france?"}]
    alice, bob, carol = ({"Authorization": f"Bearer sk-{who}"} for who in ("alice", "bob", "carol"))
    app = create_app({"tiny": tiny_engine()}, ServeConfig(api_keys=str(keys), semantic_cache=0.9))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as h:

        def cache(messages, who) -> str | None:
            r = h.post("/v1/chat/completions", json={**q, "messages": messages}, headers=who)
            assert r.status_code == 200, r.text
            return r.headers.get("x-gptstack-cache")

        assert cache(secret, alice) is None
        assert cache(secret, bob) is None and cache(para, carol) is None  # alice's answer is hers alone
        assert cache(secret, alice) == "exact" and cache(para, bob) == "semantic"  # each key's own
        assert cache([{"role": "user", "content": "What's the capital of France"}], alice) == "semantic"
    shared = create_app({"tiny": tiny_engine()}, ServeConfig(api_keys=str(keys), shared_cache=True))
    with LiveServer(shared) as server, httpx.Client(base_url=server.url, timeout=60) as h:
        first = h.post("/v1/chat/completions", json={**q, "messages": secret}, headers=alice)
        r = h.post("/v1/chat/completions", json={**q, "messages": secret}, headers=bob)
        assert "x-gptstack-cache" not in first.headers
        assert r.headers["x-gptstack-cache"] == "exact"  # sharing is the operator's explicit choice


# ---- 8. moderation ------------------------------------------------------------------------------------


FILLER = "the weather today is lovely and we could visit the museum and then have lunch at the cafe"
THREAT = "I am going to stab you when you leave work"


@pytest.fixture(scope="module")
def moderated(tmp_path_factory):
    out = tmp_path_factory.mktemp("moderation")
    train_moderation(ModerationTrainConfig(out=str(out)))  # the bundled seed set
    app = create_app({"tiny": tiny_engine()}, ServeConfig(moderation=str(out), exact_cache=False))
    with LiveServer(app) as server:
        yield server


def test_moderation_reads_every_window_of_every_message(moderated):
    """The attacks: 12 harmless words before a blocked threat let it through, and system messages and
    earlier user turns were never checked."""
    words = FILLER.split()
    padded = " ".join(words[:12]) + " " + THREAT
    long = " ".join(words * 4) + " " + THREAT + " " + " ".join(words * 4)
    assert len(windows(long)) > 10 and windows("a few words") == ["a few words"]
    with httpx.Client(base_url=moderated.url, timeout=60) as h:
        res = h.post("/v1/moderations", json={"input": [THREAT, padded, long, FILLER]}).json()["results"]
        assert [r["action"] for r in res] == ["block", "block", "block", "allow"]
        assert res[1]["categories"]["violence"] and res[1]["category_scores"]["violence"] >= 0.5
        chat = {"model": "tiny", "max_tokens": 2}
        bypasses = [
            [{"role": "user", "content": padded}],
            [{"role": "system", "content": THREAT}, {"role": "user", "content": "hello"}],
            [{"role": "user", "content": THREAT}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "go on"}],
        ]  # fmt: skip
        for messages in bypasses:
            err = _error(h.post("/v1/chat/completions", json={**chat, "messages": messages}), 400)
            assert err["code"] == "content_policy_violation" and "violence" in err["message"]
        harmless = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " ".join(words * 3)}]
        assert h.post("/v1/chat/completions", json={**chat, "messages": harmless}).status_code == 200
        err = _error(h.post("/v1/completions", json={"model": "tiny", "prompt": ["hi", padded], "max_tokens": 2}), 400)
        assert err["code"] == "content_policy_violation"


# ---- 9, 10. keys and limits ----------------------------------------------------------------------------


def test_a_hash_inside_a_key_is_part_of_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTSTACK_API_KEYS", raising=False)
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\n   # indented comment\nsk-ab#cd name=a#1 rpm=5\n#sk-off\n")
    keys = load_keys(f)
    assert list(keys) == ["sk-ab#cd"] and keys["sk-ab#cd"].name == "a#1" and keys["sk-ab#cd"].rpm == 5
    app = create_app({"tiny": tiny_engine()}, ServeConfig(api_keys=str(f)))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as h:
        assert h.get("/v1/models", headers={"Authorization": "Bearer sk-ab#cd"}).status_code == 200
        _error(h.get("/v1/models", headers={"Authorization": "Bearer sk-ab"}), 401)  # the prefix is no key
        _error(h.get("/v1/models", headers={"Authorization": "Bearer #sk-off"}), 401)
    f.write_text("sk-x rpm=5  # trailing comment\n")
    with pytest.raises(ValueError, match=r"keys\.txt:1: .*comments go on their own line"):
        load_keys(f)
    for bad in ("rpm=-1", "tpm=nan", "rpm=inf"):
        f.write_text(f"sk-x {bad}\n")
        with pytest.raises(ValueError, match=r"keys\.txt:1: (rpm|tpm) must be a number >= 0"):
            load_keys(f)


def test_limits_below_one_per_minute_are_429_not_500(tmp_path):
    """The attack: a key with rpm 0.5 or 0 got a 500 OverflowError on every request."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-half rpm=0.5\nsk-zero rpm=0\nsk-tiny tpm=0.5\n")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    app = create_app({"tiny": tiny_engine()}, ServeConfig(api_keys=str(keys)))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as h:
        half = {"Authorization": "Bearer sk-half"}
        assert h.post("/v1/completions", json=body, headers=half).status_code == 200
        r = h.post("/v1/completions", json=body, headers=half)
        assert _error(r, 429)["code"] == "rate_limit_exceeded" and 100 <= int(r.headers["retry-after"]) <= 120
        r = h.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-zero"})
        assert "no requests" in _error(r, 429)["message"] and "retry-after" not in r.headers
        r = h.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-tiny"})
        assert "needs" in _error(r, 429)["message"] and "retry-after" not in r.headers
    now = [0.0]
    bucket = TokenBucket(0.5, clock=lambda: now[0])  # one request per two minutes
    assert bucket.take(1) == 0.0 and bucket.take(1) == pytest.approx(120.0)
    now[0] = 120.0
    assert bucket.take(1) == 0.0
    with pytest.raises(RateLimited, match="no requests"):
        Limiter(default_rpm=0).admit(None, 1)


# ---- 5. prefix-cache block names ------------------------------------------------------------------------


def test_prefix_cache_names_are_digests_and_a_hit_checks_its_tokens():
    """The attack: blocks were named by Python's unkeyed hash() of token tuples, so a crafted block with
    an equal hash made request B read request A's KV. Names are BLAKE2b digests now, and a block is
    reused only when it holds exactly the request's tokens."""
    a, b = tuple(range(16)), tuple(range(1, 17))
    assert len(block_digest(b"", a)) == 32 and block_digest(b"", a) == block_digest(b"", a)
    assert len({block_digest(b"", a), block_digest(b"", b), block_digest(block_digest(b"", b), a)}) == 3
    assert block_digest(b"", a) != block_digest(b"", a, extra=b"image")  # the hook for image hashes
    engine = tiny_engine(seed=2, context=256)
    prompt = list(range(3000, 3040))  # 2 full blocks of 16 and 8 more tokens
    greedy = SamplingParams(max_tokens=4, temperature=0)
    first = engine.generate([prompt], greedy)[0]
    again = engine.generate([prompt], greedy)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 32 and again.token_ids == first.token_ids
    block = engine.pool.by_hash[block_digest(b"", tuple(prompt[:16]))]
    engine.block_tokens[block] = tuple(prompt[1:17])  # the block no longer holds what its name says
    third = engine.generate([prompt], greedy)[0]
    assert third.num_cached_tokens == 0 and third.token_ids == first.token_ids  # recomputed, same answer
    assert engine.pool.used == 0
