"""Images through `/v1/chat/completions` (issue 21) on a real loopback server: the openai client sends
image_url parts and gets answers (from a model trained in the fixture to name an image's colour), the
image tokens are counted in usage, a second request with the same image hits the prefix cache, and every
bad image gets an OpenAI error object with its status while every KV block is freed."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
from serve_util import LiveServer, tiny_engine, wait_until
from vision_util import COLOURS, data_url, image_message, png, train_colours, vision_engine

from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig
from gptstack.vision import render_image_chat

openai = pytest.importorskip("openai") if not os.environ.get("CI") else __import__("openai")
LIMITS = ServeConfig(exact_cache=False, max_images=2, max_image_bytes=4000, max_image_pixels=64 * 64)


@pytest.fixture(scope="module")
def served():
    engine = vision_engine(num_blocks=64, kv_block_size=4)
    app = create_app({"vis": engine, "text": tiny_engine(context=256, tokenizer="bytes")}, LIMITS)
    with LiveServer(app) as server:
        yield server, engine


def chat(server, messages, model="vis", **fields) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_the_openai_client_sends_an_image_and_image_tokens_are_counted(served):
    server, engine = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    url = data_url(png((10, 200, 10)))
    messages = image_message(url)
    got = client.chat.completions.create(model="vis", messages=messages, max_tokens=4, temperature=0)
    assert got.choices[0].message.role == "assistant" and isinstance(got.choices[0].message.content, str)
    vcfg = engine.vision_config
    ids, n = render_image_chat(engine.tokenizer, [{"role": "user", "content": messages[0]["content"]}], vcfg)
    assert n == 1 and ids.count(vcfg.image_token_id) == vcfg.n_image_tokens == 4
    assert got.usage.prompt_tokens == len(ids)  # the image's 4 placeholder tokens count
    encoded, hits = engine.stats["images_encoded"], engine.stats["prefix_hits"]
    again = client.chat.completions.create(model="vis", messages=messages, max_tokens=4, temperature=0)
    assert again.choices[0].message.content == got.choices[0].message.content
    assert engine.stats["prefix_hits"] - hits == (len(ids) - 1) // 4 * 4  # the same image: a full prefix hit
    assert engine.stats["images_encoded"] == encoded  # and the tower did not run again
    other = chat(server, image_message(data_url(png((200, 10, 10)))))  # another image, the same text
    assert other.status_code == 200 and engine.stats["images_encoded"] == encoded + 1
    samples = chat(server, image_message(data_url(png((9, 9, 9)))), n=3, temperature=1.0)
    assert len(samples.json()["choices"]) == 3 and engine.stats["images_encoded"] == encoded + 2  # once for 3
    stream = client.chat.completions.create(model="vis", messages=messages, max_tokens=3, temperature=0, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[-1].finish_reason in ("length", "stop") and chunks[0].delta.role == "assistant"
    wait_until(lambda: engine.pool.used == 0, what="every block freed")


def truncated_png() -> bytes:
    data = png((1, 2, 3), size=(32, 32), noise=50)
    return data[: len(data) // 2]


BAD = {  # case → (messages' content parts, status, code)
    "remote url": ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], 400,
                   "invalid_image_url"),
    "not a data url": ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], 400, "invalid_image_url"),
    "corrupt base64": ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR%%%w0K=="}}], 400,
                       "invalid_image"),
    "not an image": ([{"type": "image_url", "image_url": {"url": data_url(b"hello, I am text")}}], 400,
                     "invalid_image"),
    "truncated": ([{"type": "image_url", "image_url": {"url": data_url(truncated_png())}}], 400, "invalid_image"),
    "wrong mime": ([{"type": "image_url", "image_url": {"url": data_url(png(), "text/plain")}}], 400,
                   "invalid_image_format"),
    "too many bytes": ([{"type": "image_url", "image_url": {"url": data_url(png(size=(60, 60), noise=120))}}], 413,
                       "image_too_large"),
    "too many pixels": ([{"type": "image_url", "image_url": {"url": data_url(png(size=(65, 64)))}}], 413,
                        "image_too_large"),
    "too many images": ([{"type": "image_url", "image_url": {"url": data_url(png())}}] * 3, 400, "too_many_images"),
    "marker mismatch": ([{"type": "text", "text": "compare <image> with"},
                         {"type": "image_url", "image_url": {"url": data_url(png())}}], 400, "image_count_mismatch"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_get_openai_errors_and_free_every_block(served, case):
    server, engine = served
    parts, status, code = BAD[case]
    r = chat(server, [{"role": "user", "content": parts}])
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"].startswith("messages")
    assert engine.pool.used == 0 and not engine.has_unfinished()


def test_a_text_model_refuses_images_and_detail_is_accepted(served):
    server, engine = served
    url = data_url(png())
    r = chat(server, image_message(url), model="text")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_multimodal"
    assert "no vision tower" in r.json()["error"]["message"]
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}] * 2  # two images in one message
    r = chat(server, [{"role": "user", "content": [*parts, {"type": "text", "text": "same?"}]}])
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 2 * engine.vision_config.n_image_tokens
    assert base64.b64decode(url.split(",", 1)[1])[:4] == b"\x89PNG"


def test_auto_routes_images_to_a_model_that_sees(served):
    server, _ = served
    r = chat(server, image_message(data_url(png())), model="auto")
    assert r.status_code == 200 and r.headers["x-gptstack-routed-to"] == "vis"


def test_images_with_retrieval(tmp_path):
    """`retrieval` grounds an image chat as it does a text chat: the sources go in front of the question."""
    if not os.environ.get("CI"):
        pytest.importorskip("bm25s", reason="the rag extra (bm25s)")
    from gptstack.rag.retrieve import RagIndexConfig, build_index

    docs = tmp_path / "docs.jsonl"
    rows = [("colours", "Red and blue are primary colours of light and paint."), ("cats", "A cat is a small animal.")]
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    build_index(RagIndexConfig(str(docs), str(tmp_path / "index"), dense=False, progress=False))
    engine = vision_engine(num_blocks=128, kv_block_size=4, context=1024)
    config = ServeConfig(exact_cache=False, rag_index=str(tmp_path / "index"))
    with LiveServer(create_app({"vis": engine}, config)) as server:
        messages = image_message(data_url(png()), "Which primary colours?")
        plain = chat(server, messages)
        grounded = chat(server, messages, retrieval={"k": 1, "method": "bm25"})
    assert plain.status_code == grounded.status_code == 200, grounded.text
    assert grounded.json()["citations"][0]["document"] == "colours"
    assert grounded.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 40  # the source
    assert engine.stats["images_encoded"] == 1  # the same image in both
    assert engine.pool.used == 0


def test_two_images_with_the_same_text_get_different_answers_from_a_trained_model():
    """A tiny LM + ViT trained in the fixture (seconds) to name the colour: served, a red and a blue image
    behind the same question share no KV block and get their own colour's name."""
    model, vision, tok, loss = train_colours()
    assert loss < 0.1
    engine = vision_engine(parts=(model, vision, tok), num_blocks=64, kv_block_size=4)
    with LiveServer(create_app({"vis": engine}, ServeConfig(exact_cache=False))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        answers = {}
        for name, colour in COLOURS.items():
            messages = image_message(data_url(png(colour)))
            got = client.chat.completions.create(model="vis", messages=messages, max_tokens=8, temperature=0)
            answers[name] = got.choices[0].message.content
            if name == "blue":  # the question's text is shared, but its first block already holds the image
                assert engine.stats["prefix_hits"] == 0
    assert answers == {"red": "red", "blue": "blue"}
    assert engine.pool.used == 0
