"""The web page's reading of close codes, in headless Chromium, without Podman.

The page is served by an in-process gateway (fake runtime, real in-process proxies). Its
first WebSocket is answered by a stand-in (Playwright's WebSocket routing) that says
``auth_ok`` and then closes with a given code, so each code reaches the page exactly as
DESIGN.md section 2 defines it: 4002 ``backlog`` is no session end (the page says its tab
fell behind and reconnects at once), 4003 ``session_ended`` is one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import wire
from c2lcore import Config
from gateway import RunningGateway, serve_gateway
from orchestrator.testing import FakeRuntime, open_fake_runtime

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
UI_TIMEOUT_MS = 30_000


def _playwright() -> Any:
    import playwright.sync_api as sync_api  # a test dependency: missing is a failure

    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} is not installed: apt-get install chromium")
    return sync_api


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


def _browse(sync_api: Any, url: str, code: int, reason: str) -> dict[str, Any]:
    """Sign in; the first WebSocket is a stand-in that says auth_ok, then closes with
    ``code``; later ones reach the gateway. Runs in a worker thread."""
    seen: dict[str, Any] = {"auths": []}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            sockets = 0

            def route(ws: Any) -> None:
                nonlocal sockets
                sockets += 1
                if sockets > 1:
                    ws.connect_to_server()
                    return

                def on_message(message: str | bytes) -> None:
                    seen["auths"].append(message)
                    if len(seen["auths"]) == 1:  # the auth message: accept, then close
                        ws.send(wire.encode(wire.AuthOk("stand-in")))
                        ws.close(code=code, reason=reason)

                ws.on_message(on_message)

            page.route_web_socket("**/ws/stream", route)
            # Every text the notice line shows, in order (later ones replace it quickly).
            page.add_init_script(
                """window.__notices = [];
                document.addEventListener("DOMContentLoaded", () => {
                  const el = document.getElementById("notice");
                  new MutationObserver(() => window.__notices.push(el.innerText))
                    .observe(el, {childList: true, characterData: true, subtree: true});
                });"""
            )
            page.goto(url)
            expect = sync_api.expect
            expect.set_options(timeout=UI_TIMEOUT_MS)
            page.fill("#dev-sub", "closer")
            page.click("#dev-btn")
            # The stand-in closes; the page says why and comes back on the real session.
            page.wait_for_function("() => window.c2l.authed && window.c2l.sessionId !== 'stand-in'")
            expect(page.locator("#conn-text")).to_have_text("connected")
            notices = page.evaluate("() => window.__notices")
            seen["notice"] = next((n for n in notices if "Reconnecting" in n), "")
            seen["sockets"] = sockets
            seen["page_errors"] = errors
        finally:
            browser.close()
    return seen


async def _run(
    nursery: trio.Nursery, tmp_path: Path, fake: FakeRuntime, code: int, reason: str
) -> dict[str, Any]:
    sync_api = _playwright()
    config = Config(port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent")
    gw: RunningGateway = await nursery.start(functools.partial(serve_gateway, config, runtime=fake))
    with trio.fail_after(90):
        seen = await trio.to_thread.run_sync(_browse, sync_api, gw.url, code, reason)
    assert wire.peek_type(seen["auths"][0]) == "auth", seen["auths"]
    assert seen["page_errors"] == []
    assert seen["sockets"] >= 2  # reconnected
    return seen


async def test_backlog_4002_is_no_session_end_and_the_page_reconnects_at_once(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    seen = await _run(nursery, tmp_path, fake_runtime, wire.CLOSE_BACKLOG, "backlog")
    assert "fell behind" in seen["notice"]
    assert "session is still running" in seen["notice"]
    assert "ended" not in seen["notice"]
    assert "Reconnecting in 1 s" in seen["notice"]  # the first step, not a backoff


async def test_session_ended_4003_says_the_session_ended(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    seen = await _run(nursery, tmp_path, fake_runtime, wire.CLOSE_SESSION_ENDED, "session_ended")
    assert "Your session ended" in seen["notice"]
