"""The web chat's images (issue 21) in a real headless Chromium: the attach button, paste and drop each
put an image into the next message, which reaches the engine as image_url parts; a refused image shows
the server's error and leaves the history."""

from __future__ import annotations

import base64
import re

import pytest
from serve_util import LiveServer, wait_until
from test_serve_web import CHROMIUM, FLAGS, _need_chromium
from vision_util import png, vision_engine

from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig

DONE = re.compile(r"done \((length|stop)\)")  # a random model may end its turn early
DROP_OR_PASTE = """([kind, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], kind + ".png", { type: "image/png" }));
  const target = document.getElementById("input");
  const event = kind === "paste" ? new ClipboardEvent("paste", { clipboardData: data, bubbles: true })
                                 : new DragEvent("drop", { dataTransfer: data, bubbles: true });
  target.dispatchEvent(event);
}"""


@pytest.mark.slow
def test_web_chat_attaches_pastes_and_drops_images(tmp_path):
    _need_chromium()
    from playwright.sync_api import expect, sync_playwright

    engine = vision_engine(num_blocks=64, kv_block_size=4)
    app = create_app({"vis": engine}, ServeConfig(exact_cache=False, max_image_bytes=3000))
    (tmp_path / "green.png").write_bytes(png((10, 200, 10)))
    with LiveServer(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#model option")).to_have_count(1)
            page.fill("#max-tokens", "3")
            page.fill("#temperature", "0")
            with page.expect_file_chooser() as chooser:  # the attach button opens the file picker
                page.click("#attach")
            chooser.value.set_files(str(tmp_path / "green.png"))
            expect(page.locator("#attachments img")).to_have_count(1)
            page.fill("#input", "What colour is it?")
            page.click("#send")
            expect(page.locator("#status")).to_have_text(DONE, timeout=20_000)
            assert engine.stats["images"] == 1 and engine.stats["images_encoded"] == 1
            expect(page.locator(".msg.user img")).to_have_count(1)
            expect(page.locator("#attachments img")).to_have_count(0)  # sent with that message
            # paste and drop: two more images in the next message (the first stays in the history)
            page.evaluate(DROP_OR_PASTE, ["paste", base64.b64encode(png((200, 10, 10))).decode()])
            page.evaluate(DROP_OR_PASTE, ["drop", base64.b64encode(png((10, 10, 200))).decode()])
            expect(page.locator("#attachments img")).to_have_count(2)
            page.fill("#input", "And these?")
            page.click("#send")
            expect(page.locator("#status")).to_have_text(DONE, timeout=20_000)
            assert engine.stats["images"] == 1 + 3 and engine.stats["images_encoded"] == 3
            # an image over the server's limit: its 413 is shown, and the next message goes without it
            noisy = base64.b64encode(png(size=(64, 64), noise=120)).decode()
            page.evaluate(DROP_OR_PASTE, ["drop", noisy])
            expect(page.locator("#attachments img")).to_have_count(1)
            page.fill("#input", "Too big?")
            page.click("#send")
            expect(page.locator(".msg.assistant.error .body")).to_contain_text("at most 3000 bytes")
            page.fill("#input", "Fine now?")
            page.click("#send")
            expect(page.locator("#status")).to_have_text(DONE, timeout=20_000)
            assert page.locator(".msg.user").count() == 4
        finally:
            browser.close()
    wait_until(lambda: engine.pool.used == 0, what="every block freed")
