"""The web chat page in a real headless Chromium, against real processes on real Podman.

``c2l serve`` and ``c2l desktop`` run as subprocesses (the Stack fixture of
``test_e2e_podman.py``), the fake Ollama speaks the real protocol, and Debian's
``/usr/bin/chromium`` is driven by Playwright for Python (no browser download). The
Playwright sync API runs in a worker thread so the trio test can bound it and watch the
fake Ollama at the same time. A screenshot is saved to ``test-output/web-page.png``.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from desktop.testing import FakeOllama, serve_fake_ollama

from ._stack import Stack, count, labelled
from ._stack import stack as stack  # the fixture

pytestmark = pytest.mark.podman

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DELAY = 0.25  # seconds per token: a 12-token answer takes 3 s, time enough to press Stop
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
UI_TIMEOUT_MS = 30_000


def _playwright() -> Any:
    import playwright.sync_api as sync_api  # a test dependency: missing is a failure

    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} is not installed: apt-get install chromium")
    return sync_api


@pytest.fixture
async def slow_fake(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=DELAY)
    )
    return fake


def _browse_until_cancel(
    sync_api: Any, url: str, fake: FakeOllama, stack: Stack, shots: Path
) -> dict[str, Any]:
    """Everything the browser does; runs in a worker thread. Returns what it saw."""
    seen: dict[str, Any] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            expect = sync_api.expect
            expect.set_options(timeout=UI_TIMEOUT_MS)

            # Sign in with a development token for a typed user name.
            page.fill("#dev-sub", "webuser")
            page.click("#dev-btn")
            expect(page.locator("#conn-text")).to_have_text("connected")
            # No desktop yet: the page says so.
            expect(page.locator("#desktop-text")).to_have_text("desktop: offline")
            expect(page.locator("#notice")).to_contain_text("desktop is offline")
            seen["offline_notice"] = page.inner_text("#notice")

            # The desktop agent starts: the status updates live and the models load.
            stack.start_agent("webuser", fake.url)
            expect(page.locator("#desktop-text")).to_have_text("desktop: connected")
            expect(page.locator("#model option")).to_have_count(2)
            seen["models"] = page.eval_on_selector_all(
                "#model option", "els => els.map(e => e.value)"
            )
            page.select_option("#model", "qwen2.5:0.5b")

            # A prompt streams in token by token and completes.
            page.fill("#prompt", "hello from the browser")
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            expect(answer).to_contain_text("You said:")
            partial = answer.locator(".text").inner_text()
            expect(answer).to_have_attribute("data-done", "true")
            seen["partial"] = partial
            seen["answer"] = answer.locator(".text").inner_text()
            seen["answer_meta"] = answer.locator(".meta").inner_text()
            # the answer says how it came (response_start.route): through the bridge
            seen["route_label"] = answer.locator(".route").inner_text()
            seen["route_title"] = answer.locator(".route").get_attribute("title")

            # A second one is stopped mid-stream.
            page.fill("#prompt", "a second question to stop")
            page.click("#send")
            second = page.locator(".msg.assistant").last
            expect(second).to_contain_text("You said: a")
            page.click("#stop")
            expect(second.locator(".meta")).to_have_text("stopped")
            seen["stopped_text"] = second.locator(".text").inner_text()
            expect(page.locator("#send")).to_be_visible()
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "web-page.png"))

            # The session is deleted (as an idle cull would): the page says so, reconnects
            # by itself to a new session, and the desktop follows.
            before = page.evaluate("window.c2l.sessionId")
            token = page.evaluate("window.c2l.token")
            r = httpx.delete(
                f"{url}/api/streaming/{before}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            seen["delete_status"] = r.status_code
            expect(page.locator("#notice")).to_contain_text("session ended")
            seen["ended_notice"] = page.inner_text("#notice")
            page.wait_for_function(
                "([old]) => window.c2l.authed && window.c2l.sessionId !== old", arg=[before]
            )
            expect(page.locator("#desktop-text")).to_have_text("desktop: connected")
            page.screenshot(path=str(shots / "web-page-reconnected.png"))

            # A token that expires: the gateway closes with 1008 and the page asks to sign in.
            short = stack.issuer.sign("webuser", ttl=4)
            page.click("#signout")
            page.fill("#token", short)
            page.click("#signin-btn")
            expect(page.locator("#conn-text")).to_have_text("connected")
            expect(page.locator("#notice")).to_contain_text("expired", timeout=20_000)
            expect(page.locator("#signin")).to_be_visible()
            seen["expired_notice"] = page.inner_text("#notice")
            page.screenshot(path=str(shots / "web-page-expired.png"))
            seen["page_errors"] = errors
        finally:
            browser.close()
    return seen


async def test_web_page_chat_stop_reconnect_and_expiry(stack: Stack, slow_fake: FakeOllama) -> None:
    sync_api = _playwright()
    shutil.rmtree(OUTPUT / "web", ignore_errors=True)
    shots = OUTPUT / "web"
    with trio.fail_after(150):
        seen = await trio.to_thread.run_sync(
            functools.partial(_browse_until_cancel, sync_api, stack.url, slow_fake, stack, shots),
            abandon_on_cancel=True,
        )
        # the Stop button reached the desktop: the fake Ollama recorded the cancel
        with trio.fail_after(10):
            await slow_fake.wait_until(lambda f: len(f.cancelled) >= 1)
    print(f"screenshot: {shots / 'web-page.png'}")
    assert seen["page_errors"] == []
    assert "c2l desktop" in seen["offline_notice"]
    assert seen["models"] == ["llama3.2:latest", "qwen2.5:0.5b"]
    # streamed: the answer was seen part-way before it completed
    assert seen["partial"].startswith("You said:")
    assert len(seen["partial"]) < len(seen["answer"])
    assert seen["answer"].startswith("You said: hello from the browser")
    assert "12 tokens" in seen["answer_meta"]
    assert seen["route_label"] == "cloud"
    assert "cloud proxy" in seen["route_title"]
    assert len(seen["stopped_text"]) < len("You said: a second question to stop token1")
    cancelled = slow_fake.cancelled[0]
    assert cancelled.path == "/api/chat"
    assert cancelled.tokens_sent < 12
    assert slow_fake.completed == 1
    assert seen["delete_status"] == 204
    assert "Reconnecting" in seen["ended_notice"]
    assert "sign in" in seen["expired_notice"]
    assert (shots / "web-page.png").stat().st_size > 10_000
    # nothing of the deleted session is left behind (the new one is the user's only one)
    with trio.fail_after(10):
        assert count(await labelled()) == 3


#: A prompt whose echo is Markdown: a fenced code block, a table, and an HTML injection
#: attempt; the fake Ollama answers "You said: <prompt>" token by token, lines kept.
MARKDOWN_PROMPT = (
    "Here it is:\n\n"
    "```python\nprint('hi from a code block')\n```\n\n"
    "| name | value |\n|---|---|\n| alpha | 1 |\n| beta | 2 |\n\n"
    '<img src=x onerror="document.body.dataset.pwned=1">\n\n'
    "<script>document.body.dataset.pwned=2</script>\n\n"
    "Done."
)


def _browse_markdown(
    sync_api: Any, url: str, fake: FakeOllama, stack: Stack, shots: Path
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 1100, "height": 820},
                permissions=["clipboard-read", "clipboard-write"],
            )
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            violations: list[str] = []
            page.on(
                "console",
                lambda msg: (
                    violations.append(f"{msg.text[:80]} @ {msg.location.get('url')}")
                    if "Content Security Policy" in msg.text
                    else None
                ),
            )
            page.goto(url)
            expect = sync_api.expect
            expect.set_options(timeout=UI_TIMEOUT_MS)
            page.fill("#dev-sub", "mduser")
            page.click("#dev-btn")
            expect(page.locator("#conn-text")).to_have_text("connected")
            stack.start_agent("mduser", fake.url)
            expect(page.locator("#desktop-text")).to_have_text("desktop: connected")
            expect(page.locator("#model option")).to_have_count(2)
            page.fill("#prompt", MARKDOWN_PROMPT)
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            # rendered while it streams: the code block is there before the answer ends
            expect(answer.locator("pre code")).to_have_count(1)
            seen["code_while_streaming"] = answer.get_attribute("data-done") is None
            expect(answer).to_have_attribute("data-done", "true")
            seen["code"] = answer.locator("pre code").inner_text()
            seen["code_class"] = answer.locator("pre code").get_attribute("class")
            seen["cells"] = answer.locator("table td").all_inner_texts()
            seen["headers"] = answer.locator("table th").all_inner_texts()
            seen["handlers"] = page.evaluate(
                "Array.from(document.querySelectorAll('.msg *')).flatMap(e =>"
                " Array.from(e.attributes).map(a => a.name)).filter(n => n.startsWith('on'))"
            )
            seen["scripts_in_answers"] = answer.locator("script").count()
            seen["pwned"] = page.evaluate("document.body.dataset.pwned || null")
            answer.locator("pre button.copy").click()
            expect(answer.locator("pre button.copy")).to_have_text("Copied")
            seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "web-page-markdown.png"))
            seen["page_errors"] = errors
            seen["csp_violations"] = violations
        finally:
            browser.close()
    return seen


async def test_web_page_renders_markdown_sanitised_with_a_copy_button(
    stack: Stack, nursery: trio.Nursery
) -> None:
    sync_api = _playwright()
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.03, default_tokens=60)
    )
    shots = OUTPUT / "web"
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(
            functools.partial(_browse_markdown, sync_api, stack.url, fake, stack, shots),
            abandon_on_cancel=True,
        )
    assert seen["page_errors"] == []
    # The page itself breaks none of its policy. DOMPurify parsing the injected
    # <img onerror> makes the browser try the handler, and the policy blocks it: that
    # is the second line of defence showing, not a fault.
    own = [v for v in seen["csp_violations"] if not v.endswith("/static/vendor/purify.min.js")]
    assert own == [], own
    assert seen["code_while_streaming"] is True
    assert seen["code"].strip() == "print('hi from a code block')"
    assert seen["code_class"] == "language-python"
    assert seen["headers"] == ["name", "value"]
    assert seen["cells"] == ["alpha", "1", "beta", "2"]
    assert seen["handlers"] == []  # the injected onerror was stripped
    assert seen["scripts_in_answers"] == 0
    assert seen["pwned"] is None
    assert seen["clipboard"].strip() == "print('hi from a code block')"
    assert (shots / "web-page-markdown.png").stat().st_size > 10_000
