"""The review queue behind a real server on loopback: flagged and thumbs-down answers reach it, the review
routes need a reviewer's key (401, 403, OpenAI error objects), and the review page in real Chromium."""

from __future__ import annotations

import json
import sqlite3

import httpx
import numpy as np
import pytest
from serve_util import LiveServer, tiny_engine
from test_serve_web import CHROMIUM, FLAGS, _need_chromium

from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig
from gptstack.serve.gateway import load_keys
from gptstack.serve.moderation import Moderator

KEYS = "sk-user name=user\nsk-alice name=alice role=reviewer\nsk-bob name=bob role=reviewer\n"
KEYS += "sk-carol name=carol role=reviewer\nsk-dave name=dave role=reviewer\n"


class Hello:
    """A sentence 'embedding' with one feature: does the text say hello. With the classifier below, the
    real Moderator flags every text that does not (the random model's outputs), and no prompt here."""

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.array([[float("hello" in t.lower())] for t in texts], dtype=np.float32)  # (N, 1)


def test_key_roles_in_line_and_json_files(tmp_path):
    lines = tmp_path / "keys.txt"
    lines.write_text("sk-old name=old rpm=5\nsk-rev name=ann role=reviewer\n")
    keys = load_keys(lines)
    assert (keys["sk-old"].role, keys["sk-old"].rpm, keys["sk-rev"].role) == ("user", 5, "reviewer")  # old lines: user
    js = tmp_path / "keys.json"
    js.write_text(json.dumps([{"key": "sk-a", "role": "reviewer"}, {"key": "sk-b"}]))
    assert [k.role for k in load_keys(js).values()] == ["reviewer", "user"]
    lines.write_text("sk-x role=admin\n")
    with pytest.raises(ValueError, match=r"keys.txt:1: role must be one of user, reviewer, got 'admin'"):
        load_keys(lines)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    (tmp / "keys.txt").write_text(KEYS)
    spec = {"categories": ["harassment"], "weights": [[-20.0]], "bias": [10.0], "thresholds": {"harassment": 0.5}}
    (tmp / "mod").mkdir()
    (tmp / "mod" / "moderation.json").write_text(json.dumps(spec))
    config = ServeConfig(api_keys=str(tmp / "keys.txt"), review_db=str(tmp / "review.db"), exact_cache=False)
    app = create_app({"tiny": tiny_engine(seed=3)}, config)
    server = app.state.server
    server.moderator = Moderator(tmp / "mod", Hello(), {"harassment": "flag"})
    with LiveServer(app) as live:
        yield live, server.review, tmp / "review.db"


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_flagged_and_thumbs_down_answers_are_reviewed_by_two_and_adjudicated(served):
    live, queue, _ = served
    with httpx.Client(base_url=live.url, timeout=60) as h:
        assert _error(h.post("/v1/review/next"), 401)["code"] == "invalid_api_key"
        err = _error(h.post("/v1/review/next", headers=_as("sk-user")), 403)
        assert err["type"] == "permission_error" and "reviewer" in err["message"]
        assert _error(h.get("/v1/review/stats", headers=_as("sk-user")), 403)["code"] == "insufficient_role"
        chat = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "hello"}]}
        answer = h.post("/v1/chat/completions", json=chat, headers=_as("sk-user")).json()
        fb = {"response_id": answer["id"], "rating": "down", "comment": "rude"}
        assert h.post("/v1/feedback", json=fb, headers=_as("sk-user")).json()["review"] is True

        claim = h.post("/v1/review/next", headers=_as("sk-alice")).json()
        item = claim["item"]
        assert claim["reviewer"] == "alice" and item["response_id"] == answer["id"]
        assert item["reasons"] == ["output:harassment", "feedback:down"] and item["comment"] == "rude"  # one item
        assert item["prompt"] == chat["messages"] and item["response"] == answer["choices"][0]["message"]["content"]
        url = f"/v1/review/items/{item['id']}/label"
        assert _error(h.post(url, json={"label": "meh"}, headers=_as("sk-alice")), 400)["param"] == "label"
        assert _error(h.post(url, json={"label": "harmful"}, headers=_as("sk-bob")), 409)["code"] == "review_no_lease"
        for bad in (999, 2**70):
            assert _error(
                h.post(f"/v1/review/items/{bad}/label", json={"label": "harmful"}, headers=_as("sk-bob")), 404
            )
        fixed = {"label": "harmful", "text": "Sorry, let me answer politely."}
        labelled = h.post(url, json=fixed, headers=_as("sk-alice")).json()
        assert labelled == {"object": "review.label", "id": item["id"], "state": "open"}
        assert h.post("/v1/review/next", headers=_as("sk-alice")).json()["item"] is None  # never twice
        assert h.post("/v1/review/next", headers=_as("sk-bob")).json()["item"]["id"] == item["id"]
        assert h.post(url, json={"label": "appropriate"}, headers=_as("sk-bob")).json()["state"] == "adjudicate"
        adjudication = h.post("/v1/review/next", headers=_as("sk-carol")).json()["item"]
        assert adjudication["stage"] == "adjudicate" and "labels" not in adjudication
        assert h.post(url, json={"label": "harmful"}, headers=_as("sk-carol")).json()["state"] == "done"
        stats = h.get("/v1/review/stats", headers=_as("sk-carol")).json()
    assert stats["done"] == 1 and stats["batches"][0]["kappa"] == 0.0  # one pair that disagreed
    (done,) = queue.adjudicated()
    assert (done["label"], done["text"]) == ("harmful", "Sorry, let me answer politely.")  # alice's correction


@pytest.mark.slow
def test_review_page_in_chromium(served):
    _need_chromium()
    from playwright.sync_api import expect, sync_playwright

    live, queue, db = served
    item = queue.add("Write an insult.", "You are a worthless idiot.", ["output:harassment"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(live.url + "/review")
            page.fill("#api-key", "sk-user")
            page.click("#sign-in")
            expect(page.locator("#status")).to_contain_text("needs role reviewer")
            page.fill("#api-key", "sk-dave")
            page.click("#sign-in")
            expect(page.locator("#who")).to_have_text("signed in as dave")
            expect(page.locator("#response")).to_have_text("You are a worthless idiot.")
            expect(page.locator("#prompt")).to_have_text("Write an insult.")
            page.check("input[name=label][value=harmful]")
            page.fill("#correction", "I'd rather not insult anyone.")
            page.click("#submit")
            expect(page.locator("#status")).to_have_text(f"item {item} labelled harmful (now open)")
            expect(page.locator("#empty")).to_be_visible()
            expect(page.locator("#stats tbody tr")).to_have_count(1)
        finally:
            browser.close()
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT reviewer, label, text FROM labels WHERE item = ?", (item,)).fetchone()
    assert row == ("dave", "harmful", "I'd rather not insult anyone.")
