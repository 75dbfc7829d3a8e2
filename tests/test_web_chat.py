"""The web chat end to end in headless Chromium: upload an image, ask, see the streamed answer and
a generated image, look at the route, reload and find the session again.

The backbone is the project's ScriptedThinker, so that it calls generate_image deterministically
(the tiny model's random weights would not); the page, server, controller, media store and the
tiny Stable Diffusion behind generate_image are the real ones.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from PIL import Image

from agent.config import AgentConfig
from agent.runtime import Runtime
from agent.server import create_app
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult

CHROMIUM = os.environ.get("SIGNALGRAPH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install -y chromium, "
                                                         "or set SIGNALGRAPH_CHROMIUM)")


@contextmanager
def running(app):
    """The app on a free loopback port, in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_upload_ask_and_see_the_answer_with_a_generated_image(tmp_path, tiny_profile):
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").sync_playwright
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (30, 90, 200)).save(photo)
    thinker = ScriptedThinker(ThinkResult("", [{"id": "call-1", "name": "generate_image",
                                                "args": {"prompt": "a blue square"}}]),
                              ThinkResult("Here is a new blue square."))
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), tiny_profile,
                      thinker=thinker)
    with running(create_app(runtime)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 900, "height": 700})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_selector("#meta:has-text('signalgraph-tiny')")

        page.set_input_files("#file", str(photo))
        page.fill("#input", "What is in this photo? Draw another one.")
        page.click("#send")
        reply = page.wait_for_selector(".msg.assistant.done", timeout=120_000)

        assert reply.query_selector(".text").inner_text() == "Here is a new blue square."  # links became images
        image = reply.query_selector("img.generated")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image)
        assert page.query_selector(".msg.user img") is not None  # the upload is shown with the question
        assert [m["kind"] for m in thinker.seen[0]["media"]] == ["image"]  # and it reached the backbone

        trace = reply.query_selector(".trace")
        assert not trace.is_visible()
        page.check("#show-trace")
        assert trace.is_visible() and "generate_image" in trace.inner_text()
        screenshot = tmp_path / "web-chat.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"screenshot: {screenshot}")

        session = page.evaluate("localStorage.getItem('signalgraph.session')")
        page.reload()
        page.wait_for_selector(".msg.assistant img.generated")
        assert page.evaluate("localStorage.getItem('signalgraph.session')") == session
        assert "Here is a new blue square." in page.inner_text("#log")
        assert errors == []
        browser.close()
    runtime.close()
