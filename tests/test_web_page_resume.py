"""The web page resumes an answer by itself when its connection is cut mid-answer.

Real headless Chromium (as in ``test_web_page.py``), ``c2l serve`` and ``c2l desktop`` on
real Podman, the fake Ollama streaming slowly. The browser reaches the gateway only
through a TCP relay on 127.0.0.1 (``test_resume_podman.Relay``); the test resets every
relayed connection mid-answer. The page reconnects, resumes with the answer's token and
last seq, and the same bubble completes with the whole answer, once, without the request
being sent again or cancelled.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
import trio

from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama

from ._stack import Stack, wait_for_desktop
from ._stack import stack as stack  # the fixture
from .test_resume_podman import Relay
from .test_web_page import CHROMIUM as CHROMIUM_PATH
from .test_web_page import CHROMIUM_ARGS, UI_TIMEOUT_MS, _playwright

pytestmark = pytest.mark.podman

DELAY = 0.3  # seconds per token: a 12-token answer takes about 4 s
PROMPT = "resume me please"


def _browse(sync_api: Any, url: str, relay: Relay) -> dict[str, Any]:
    """Everything the browser does; runs in a worker thread. Returns what it saw."""
    seen: dict[str, Any] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            sent: list[str] = []
            page.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(str(p))))
            page.goto(url)
            expect = sync_api.expect
            expect.set_options(timeout=UI_TIMEOUT_MS)
            page.fill("#dev-sub", "resumeuser")
            page.click("#dev-btn")
            expect(page.locator("#conn-text")).to_have_text("connected")
            expect(page.locator("#model option")).to_have_count(2)
            page.fill("#prompt", PROMPT)
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            expect(answer).to_contain_text("You said: resume")
            seen["first_id"] = answer.get_attribute("data-request-id")
            trio.from_thread.run_sync(relay.cut)  # the network goes, mid-answer
            seen["cut_text"] = answer.locator(".text").inner_text()
            expect(answer).to_have_attribute("data-done", "true")
            seen["answer"] = answer.locator(".text").inner_text()
            seen["last_id"] = answer.get_attribute("data-request-id")
            seen["classes"] = answer.get_attribute("class")
            seen["sent"] = sent
            seen["page_errors"] = errors
        finally:
            browser.close()
    return seen


async def test_the_page_resumes_a_cut_answer_by_itself(stack: Stack, nursery: trio.Nursery) -> None:
    sync_api = _playwright()
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=DELAY)
    )
    stack.start_agent("resumeuser", fake.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        await wait_for_desktop(http, stack.token("resumeuser"))
    port = int(stack.url.rsplit(":", 1)[1])
    relay = Relay(("127.0.0.1", port))
    relay_port = await nursery.start(relay.serve)
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(
            functools.partial(_browse, sync_api, f"http://127.0.0.1:{relay_port}", relay),
            abandon_on_cancel=True,
        )
    assert seen["page_errors"] == []
    expected = "".join(make_tokens(PROMPT, 12))
    assert len(seen["cut_text"]) < len(expected)  # it was cut mid-answer
    assert seen["answer"].strip() == expected  # whole, once, in order
    assert seen["last_id"] != seen["first_id"]  # resumed under a new id
    assert "failed" not in (seen["classes"] or "")
    resumes = [s for s in seen["sent"] if '"type":"resume"' in s.replace(" ", "")]
    assert len(resumes) == 1, seen["sent"]
    chats = [r for r in fake.requests if r.path == "/api/chat"]
    assert len(chats) == 1  # not sent again
    assert fake.cancelled == [] and fake.completed == 1
