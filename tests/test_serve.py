"""The OpenAI-compatible server and its gateway, tested through a live uvicorn server on loopback with
the official `openai` client and httpx: API semantics, errors, keys and limits, caches, routing,
moderation, feedback, metrics and cancellation."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest
import torch
from serve_util import LiveServer, tiny_engine, wait_until

from gptstack.serve.app import create_app
from gptstack.serve.config import ModerationTrainConfig, ServeConfig
from gptstack.serve.gateway import Limiter, RateLimited, TokenBucket, difficulty, load_keys
from gptstack.serve.moderation import train_moderation


@pytest.fixture(scope="module")
def live():
    engine = tiny_engine(seed=1)
    app = create_app({"tiny": engine}, ServeConfig(exact_cache=False))
    with LiveServer(app) as server:
        yield server, engine


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


# ---- the API through the openai client ----------------------------------------------------------------


def test_models_and_completions(live):
    server, engine = live
    c = client(server.url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=["Hello there", "Once upon"], max_tokens=6, n=2, seed=3, logprobs=2)
    assert len(r.choices) == 4 and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("Hello there")) + len(
        engine.tokenizer.encode("Once upon")
    )
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24
    for ch in r.choices:
        assert ch.finish_reason == "length" and len(ch.logprobs.tokens) == 6
        assert "".join(ch.logprobs.tokens) == ch.text
        assert all(len(t) == 2 for t in ch.logprobs.top_logprobs)
        # the sampled token's log-probability is at most the best alternative's
        assert all(
            lp <= max(top.values()) + 1e-6
            for lp, top in zip(ch.logprobs.token_logprobs, ch.logprobs.top_logprobs, strict=True)
        )
    # the same seed gives the same text; n>1 choices get different seeds
    again = c.completions.create(model="tiny", prompt="Hello there", max_tokens=6, n=2, seed=3)
    assert [again.choices[0].text, again.choices[1].text] == [r.choices[0].text, r.choices[1].text]
    assert r.choices[0].text != r.choices[1].text


def test_echo_logprobs_equal_the_model(live):
    """echo + max_tokens=0 returns the prompt's log-probabilities: equal to the model's log-softmax."""
    server, engine = live
    prompt = "The quick brown fox jumps over the lazy dog"
    r = client(server.url).completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    ch = r.choices[0]
    ids = engine.tokenizer.encode(prompt)
    assert ch.text == prompt and ch.logprobs.tokens == [engine.tokenizer.decode([t]) for t in ids]
    assert ch.logprobs.token_logprobs[0] is None and r.usage.completion_tokens == 0
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids]))
    expected = logits[0].log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(ch.logprobs.token_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)
    lengths = [len(t) for t in ch.logprobs.tokens]
    assert ch.logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]


def test_chat_stream_equals_non_stream_and_stop(live):
    server, engine = live
    c = client(server.url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about tea."}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, logprobs=True,
                                     top_logprobs=3)  # fmt: skip
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    ids, _ = engine.tokenizer.encode_chat(msgs, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(ids)
    content = full.choices[0].logprobs.content
    assert len(content) == 24 and all(len(t.top_logprobs) == 3 for t in content)
    # greedy: every sampled token is the top alternative
    assert all(t.token == t.top_logprobs[0].token for t in content)
    pieces, usage, finish = [], None, None
    for chunk in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):  # fmt: skip
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == text and finish == "length" and usage.completion_tokens == 24
    # a stop string cuts the text before it
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # n > 1 in a stream: every index finishes
    seen = {}
    for chunk in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=3, stream=True, seed=1):
        for ch in chunk.choices:
            seen[ch.index] = ch.finish_reason or seen.get(ch.index)
    assert seen == {0: "length", 1: "length", 2: "length"}


# ---- errors ---------------------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors(live):
    server, engine = live
    url = server.url
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=url, timeout=30) as h:
        assert _error(h.post("/v1/chat/completions", json={**chat, "temperature": 3}), 400)["param"] == "temperature"
        assert _error(h.post("/v1/chat/completions", json={**chat, "messages": []}), 400)["param"] == "messages"
        _error(h.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        _error(h.post("/v1/completions", json={"model": "tiny"}), 400)
        _error(h.post("/v1/completions", json={"model": "tiny", "prompt": [10**9]}), 400)
        _error(h.post("/v1/completions", json={"model": "tiny", "prompt": ""}), 400)
        long = {**chat, "messages": [{"role": "user", "content": "word " * 600}]}
        err = _error(h.post("/v1/chat/completions", json=long), 400)
        assert "512" in err["message"] and err["code"] == "context_length_exceeded"
        err = _error(h.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 600}), 400)
        assert "601" in err["message"] and "512" in err["message"]
        assert _error(h.post("/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404)["code"] == "model_not_found"
        _error(h.get("/v1/nothing-here"), 404)
        _error(h.get("/v1/chat/completions"), 405)
        big = {**chat, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        assert _error(h.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit applies as the body streams in
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}]}'

        _error(h.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert h.get("/health").json()["status"] == "ok"  # still fine
    assert engine.pool.used == 0


def test_keys_rate_limits_and_usage_log(tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice name=alice rpm=2\n  # bob: tokens per minute\nsk-bob name=bob tpm=60\n")
    monkeypatch.setenv("GPTSTACK_API_KEYS", "sk-env")
    app = create_app({"tiny": tiny_engine()}, ServeConfig(api_keys=str(keys), log_dir=str(tmp_path / "logs")))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as h:
        assert _error(h.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        _error(h.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"}), 401)
        _error(h.get("/v1/models"), 401)
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
        alice = {"Authorization": "Bearer sk-alice"}
        assert h.post("/v1/completions", json=body, headers=alice).status_code == 200
        assert h.post("/v1/completions", json=body, headers=alice).status_code == 200
        r = h.post("/v1/completions", json=body, headers=alice)
        assert _error(r, 429)["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 30
        bob = {"Authorization": "Bearer sk-bob"}
        assert h.post("/v1/completions", json={**body, "max_tokens": 40}, headers=bob).status_code == 200
        err = _error(h.post("/v1/completions", json={**body, "max_tokens": 40}, headers=bob), 429)
        assert "tokens per minute" in err["message"]
        assert (
            "needs" in _error(h.post("/v1/completions", json={**body, "max_tokens": 100}, headers=bob), 429)["message"]
        )
        assert client(server.url, "sk-env").completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        metrics = h.get("/metrics").text
        assert 'gptstack:requests_rejected_total{reason="rate_limit"} 3.0' in metrics
        assert 'gptstack:requests_rejected_total{reason="auth"} 3.0' in metrics
    rows = [json.loads(line) for line in (tmp_path / "logs" / "usage.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["key"].split(":")[0] for r in rows} == {"alice", "bob", "env0"}
    log = (tmp_path / "logs" / "usage.jsonl").read_text()
    assert "sk-alice" not in log and "sk-bob" not in log and "sk-env" not in log  # no secrets


def test_queue_full_is_503():
    engine = tiny_engine(max_seqs=1, context=8192)  # one running request at a time, and a long one
    app = create_app({"tiny": engine}, ServeConfig(max_waiting=1, exact_cache=False))
    runner = app.state.server.runners["tiny"]
    long = {"model": "tiny", "prompt": "go", "max_tokens": 8000, "stream": True}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # running
            with h.stream("POST", "/v1/completions", json=long) as second:
                assert second.status_code == 200
                wait_until(lambda: runner.num_waiting == 1, what="the second request to wait")
                err = _error(h.post("/v1/completions", json={**long, "stream": False}), 503)
                assert err["code"] == "queue_full"
        wait_until(lambda: engine.pool.used == 0 and not engine.has_unfinished(), what="the aborts")


# ---- gateway ------------------------------------------------------------------------------------------


def test_token_bucket_and_limiter_refill():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # 1 per second
    assert bucket.take(60) == 0.0 and bucket.take(1) == pytest.approx(1.0)
    now[0] = 30.0
    assert bucket.take(30) == 0.0 and bucket.take(61) == float("inf")
    limiter = Limiter(default_rpm=None, default_tpm=100, clock=lambda: now[0])
    limiter.admit(None, 80)
    with pytest.raises(RateLimited) as e:
        limiter.admit(None, 30)
    assert e.value.retry_after == pytest.approx(6.0)
    limiter.refund(None, 50)  # 50 not generated come back
    limiter.admit(None, 30)


def test_load_keys_formats(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTSTACK_API_KEYS", raising=False)
    f = tmp_path / "k.json"
    f.write_text(json.dumps([{"key": "a", "name": "x", "rpm": 5}]))
    assert load_keys(f)["a"].rpm == 5
    bad = tmp_path / "bad.txt"
    bad.write_text("k1 rpm=ten\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1"):
        load_keys(bad)
    bad.write_text("k1 color=red\n")
    with pytest.raises(ValueError, match="KEY"):
        load_keys(bad)


def test_routing_caches_and_feedback(tmp_path):
    small, large = tiny_engine(seed=2, n_layer=1), tiny_engine(seed=3, n_layer=3)
    app = create_app({"small": small, "large": large},
                     ServeConfig(semantic_cache=0.9, log_dir=str(tmp_path)))  # fmt: skip
    easy = [{"role": "user", "content": "hi there"}]
    hard = [
        {"role": "user", "content": "Explain step by step why this is slow:\n```\ndef f(n):\n    return f(n-1)\n```"}
    ]
    assert difficulty("hi there", 3) < 0.25 <= difficulty(hard[0]["content"], 30)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as h:
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["small", "large", "auto"]
        r1 = h.post("/v1/chat/completions", json={"model": "auto", "messages": easy, "max_tokens": 4, "temperature": 0})
        r2 = h.post("/v1/chat/completions", json={"model": "auto", "messages": hard, "max_tokens": 4, "temperature": 0})
        assert r1.json()["model"] == "small" and r1.headers["x-gptstack-routed-to"] == "small"
        assert r2.json()["model"] == "large" and r2.headers["x-gptstack-routed-to"] == "large"
        # exact cache: the same deterministic request again
        q = {"model": "small", "messages": [{"role": "user", "content": "What is the capital of France?"}],
             "max_tokens": 8, "temperature": 0}  # fmt: skip
        first = h.post("/v1/chat/completions", json=q)
        again = h.post("/v1/chat/completions", json=q)
        assert "x-gptstack-cache" not in first.headers and again.headers["x-gptstack-cache"] == "exact"
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        # semantic cache: a paraphrase hits, an unrelated question does not
        para = {**q, "messages": [{"role": "user", "content": "what's the capital of france?"}]}
        hit = h.post("/v1/chat/completions", json=para)
        assert hit.headers["x-gptstack-cache"] == "semantic" and float(hit.headers["x-gptstack-similarity"]) >= 0.9
        assert hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
        other = h.post(
            "/v1/chat/completions", json={**q, "messages": [{"role": "user", "content": "How do bees fly?"}]}
        )
        assert "x-gptstack-cache" not in other.headers
        # sampled requests are never cached
        hot = {**q, "temperature": 1.0}
        assert "x-gptstack-cache" not in h.post("/v1/chat/completions", json=hot).headers
        assert "x-gptstack-cache" not in h.post("/v1/chat/completions", json=hot).headers
        # a cached answer streams too
        streamed = h.post("/v1/chat/completions", json={**q, "stream": True})
        assert streamed.headers["x-gptstack-cache"] == "exact" and streamed.text.endswith("data: [DONE]\n\n")
        chunks = [json.loads(e[6:]) for e in streamed.text.split("\n\n") if e.startswith("data: {")]
        text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
        assert text == first.json()["choices"][0]["message"]["content"]
        metrics = h.get("/metrics").text
        assert 'gptstack:response_cache_hits_total{cache="exact"} 2.0' in metrics
        assert 'gptstack:response_cache_hits_total{cache="semantic"} 1.0' in metrics
        assert 'gptstack:auto_routed_total{model_name="large"} 1.0' in metrics
        # feedback on a response id: stored with the conversation, for post-training
        rid = first.json()["id"]
        ok = h.post("/v1/feedback", json={"response_id": rid, "rating": "up", "comment": "good"})
        assert ok.status_code == 200 and ok.json()["stored"]
        _error(h.post("/v1/feedback", json={"response_id": "nope", "rating": "up"}), 404)
        _error(h.post("/v1/feedback", json={"response_id": rid, "rating": "great"}), 400)
    fb = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert len(fb) == 1 and fb[0]["rating"] == "up" and fb[0]["messages"][-1]["content"] == q["messages"][0]["content"]
    assert fb[0]["response"] == [first.json()["choices"][0]["message"]["content"]]


# ---- moderation -------------------------------------------------------------------------------------------


def _memorizer(text: str, steps: int = 300):
    """A byte-level model trained here until greedy decoding after '>' reproduces `text`."""
    from gptstack.config import ModelConfig
    from gptstack.infer.engine import Engine, EngineConfig
    from gptstack.model import build_model
    from gptstack.tokenizer import get_tokenizer

    tok = get_tokenizer("bytes")
    ids = [*tok.encode(">" + text), tok.eot_id]
    model = build_model(ModelConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=2, n_embd=64), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Engine(model, EngineConfig(), tokenizer=tok)


@pytest.fixture(scope="module")
def moderation_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("moderation")
    train_moderation(ModerationTrainConfig(out=str(out)))  # the bundled seed set
    return out


def test_moderation_classifier_and_policies(moderation_dir, tmp_path):
    spec = json.loads((moderation_dir / "moderation.json").read_text())
    assert spec["categories"] == ["harassment", "illicit", "self-harm", "violence"]
    assert spec["held_out"]["flagged"]["f1"] >= 0.75  # on rows it never saw
    unsafe = "I want to end my life tonight, nobody would miss me"
    engine = _memorizer(unsafe)
    app = create_app({"tiny": tiny_engine(), "echo": engine},
                     ServeConfig(moderation=str(moderation_dir), log_dir=str(tmp_path),
                                 moderation_policy={"harassment": "flag"}))  # fmt: skip
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as h:
        r = h.post("/v1/moderations", json={"input": [unsafe, "How do I bake bread?", "you are a worthless idiot"]})
        res = r.json()["results"]
        assert res[0]["flagged"] and res[0]["categories"]["self-harm"] and res[0]["action"] == "block"
        assert not res[1]["flagged"] and res[1]["action"] == "allow"
        assert res[2]["categories"]["harassment"] and res[2]["action"] == "flag"
        chat = {"model": "tiny", "max_tokens": 4, "temperature": 0}  # a sampled reply could be flagged too
        err = _error(
            h.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": unsafe}]}), 400
        )
        assert err["code"] == "content_policy_violation" and "self-harm" in err["message"]
        flagged = h.post(
            "/v1/chat/completions",
            json={**chat, "messages": [{"role": "user", "content": "you are a worthless idiot"}]},
        )
        assert flagged.status_code == 200
        # output moderation: the memorizing model says the unsafe sentence; it is withheld
        plain = h.post("/v1/completions", json={"model": "echo", "prompt": ">", "max_tokens": 60, "temperature": 0})
        assert plain.json()["choices"][0] == {
            **plain.json()["choices"][0],
            "text": "",
            "finish_reason": "content_filter",
        }
        events = h.post("/v1/completions", json={"model": "echo", "prompt": ">", "max_tokens": 60, "temperature": 0,
                                                 "stream": True}).text  # fmt: skip
        assert '"finish_reason": "content_filter"' in events and events.endswith("data: [DONE]\n\n")
        assert unsafe not in events  # stopped before the whole sentence went out
    usage = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert any("harassment" in r["moderation_flags"] and r["status"] == 200 for r in usage)  # flagged, answered
    assert sum("self-harm" in r["moderation_flags"] for r in usage) >= 2
    assert engine.pool.used == 0


def test_moderations_without_a_classifier_is_a_clear_400(live):
    server, _ = live
    err = _error(httpx.post(server.url + "/v1/moderations", json={"input": "hello"}), 400)
    assert "--moderation" in err["message"]


# ---- cancellation under load ---------------------------------------------------------------------------


@pytest.mark.slow
def test_64_streaming_clients_half_disconnect(live):
    server, engine = live
    rng = random.Random(0)
    leave = set(rng.sample(range(64), 32))

    async def one(h: httpx.AsyncClient, i: int) -> tuple[int, int, str | None]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 48,
                "stream": True, "seed": i}  # fmt: skip
        chunks, finish = 0, None
        async with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    for ch in json.loads(line[6:])["choices"]:
                        finish = ch["finish_reason"] or finish
                    if i in leave and chunks >= 3:
                        break  # disconnect mid-stream
        return i, chunks, finish

    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as h:
            return await asyncio.wait_for(asyncio.gather(*(one(h, i) for i in range(64))), timeout=180)

    results = asyncio.run(main())
    for i, chunks, finish in results:
        if i not in leave:
            assert finish == "length" and chunks >= 2
    wait_until(lambda: engine.pool.used == 0 and not engine.has_unfinished(), timeout=30, what="KV blocks to be freed")
    metrics = httpx.get(server.url + "/metrics").text
    assert 'gptstack:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics
    assert 'gptstack:num_requests_running{model_name="tiny"} 0.0' in metrics
    aborted = [
        line for line in metrics.splitlines() if line.startswith("gptstack:request_success_total") and "abort" in line
    ]
    assert aborted and float(aborted[0].split()[-1]) >= 20  # most leavers were cut before they finished
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client(server.url).completions.create(model="tiny", prompt="still alive", max_tokens=3).choices[0].text
