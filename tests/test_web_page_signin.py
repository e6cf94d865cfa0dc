"""The web page's conversations (kept in the browser) and its sign-in with an identity
provider, in a real headless Chromium against real processes on real Podman.

The infrastructure is ``test_web_page.py``'s: ``c2l serve`` and ``c2l desktop`` as
subprocesses, the fake Ollama speaking the real protocol, Playwright in a worker thread.
The identity provider is a real OpenID Connect provider built with authlib
(``tests/_oidc_provider.py``) on 127.0.0.1, whose JWKS the gateway uses in ``jwks`` mode.
Screenshots go to ``test-output/web/``.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from desktop.testing import FakeOllama, serve_fake_ollama

from ._oidc_provider import OidcProvider, run_oidc_provider
from ._stack import Stack, run_stack
from ._stack import stack as stack  # the fixture
from .test_web_page import CHROMIUM, CHROMIUM_ARGS, OUTPUT, UI_TIMEOUT_MS, _playwright

pytestmark = pytest.mark.podman

SHOTS = OUTPUT / "web"


def _watch(page: Any) -> tuple[list[str], list[str]]:
    """Page errors and Content-Security-Policy violations, as they happen."""
    errors: list[str] = []
    violations: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: (
            violations.append(f"{msg.text[:120]} @ {msg.location.get('url')}")
            if "Content Security Policy" in msg.text
            else None
        ),
    )
    return errors, violations


def _storage(page: Any) -> dict[str, dict[str, str]]:
    return page.evaluate(
        "() => { const all = (s) => Object.fromEntries(Object.keys(s).map(k => [k, s.getItem(k)]));"
        " return { local: all(localStorage), session: all(sessionStorage) }; }"
    )


def _ask(page: Any, expect: Any, prompt: str) -> str:
    """Send ``prompt`` and wait for the whole answer; its text."""
    page.fill("#prompt", prompt)
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true")
    return str(answer.locator(".text").get_attribute("data-raw"))


def _texts(page: Any) -> list[str]:
    """The messages on screen: what was typed, and each answer's Markdown source."""
    return list(
        page.evaluate(
            "Array.from(document.querySelectorAll('.msg .text'))"
            ".map(e => e.dataset.raw !== undefined ? e.dataset.raw : e.textContent)"
        )
    )


# ----------------------------------------------------------------------- conversations

#: Stores ``count`` chats ("chat 0" the oldest), each answer ``size`` characters long.
FILL_CHATS = """([count, size]) => localStorage.setItem('c2l.chats', JSON.stringify({v: 1,
  chats: Array.from({length: count}, (_, i) => ({id: 'x' + i, title: 'chat ' + i,
    created: i, updated: 1000 + i, messages: [{role: 'user', text: 'q' + i},
    {role: 'assistant', text: 'a'.repeat(size)}]}))}))"""
STORED_TITLES = "JSON.parse(localStorage.getItem('c2l.chats')).chats.map(c => c.title)"


def _browse_chats(sync_api: Any, url: str, fake: FakeOllama, stack: Stack) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors, violations = _watch(page)
            expect = sync_api.expect
            expect.set_options(timeout=UI_TIMEOUT_MS)
            response = page.goto(url)
            seen["csp"] = response.headers["content-security-policy"]
            # no C2L_OIDC_CLIENT_ID: no "Sign in with ..." button
            seen["oidc_hidden"] = page.locator("#oidc").is_hidden()
            page.fill("#dev-sub", "chatuser")
            page.click("#dev-btn")
            expect(page.locator("#conn-text")).to_have_text("connected")
            stack.start_agent("chatuser", fake.url)
            expect(page.locator("#desktop-text")).to_have_text("desktop: connected")
            expect(page.locator("#model option")).to_have_count(2)

            # Two chats.
            seen["first_answer"] = _ask(page, expect, "the first chat's question")
            page.click("#clear")  # "New chat"
            expect(page.locator(".msg")).to_have_count(0)
            seen["second_answer"] = _ask(page, expect, "the second chat's question")
            expect(page.locator("#chat-list button")).to_have_count(2)

            # A reload: both are listed (newest first), the last one is on screen.
            page.reload()
            expect(page.locator("#conn-text")).to_have_text("connected")
            expect(page.locator("#chat-list button")).to_have_count(2)
            seen["titles"] = page.eval_on_selector_all(
                "#chat-list button", "els => els.map(e => e.title)"
            )
            seen["after_reload"] = _texts(page)
            expect(page.locator("#model option")).to_have_count(2)

            # Switching restores the first chat (rendered), and the next prompt continues it.
            page.locator("#chat-list button", has_text="the first chat").click()
            expect(page.locator(".msg")).to_have_count(2)
            seen["switched"] = _texts(page)
            seen["active"] = page.locator("#chat-list button.active").get_attribute("title")
            seen["followup_answer"] = _ask(page, expect, "a follow-up in the first chat")
            expect(page.locator(".msg")).to_have_count(4)
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "web-page-chats.png"))
            seen["token"] = page.evaluate("window.c2l.token")
            seen["storage"] = _storage(page)

            # Clear removes every chat, from the page and from the browser's storage.
            page.click("#clear-chats")
            expect(page.locator("#chat-list button")).to_have_count(0)
            expect(page.locator(".msg")).to_have_count(0)
            seen["after_clear"] = _storage(page)["local"]

            # Corrupt storage is ignored: the page still signs in and chats.
            page.evaluate("localStorage.setItem('c2l.chats', '{\"chats\": [{\"id\": 5}, 7')")
            page.reload()
            expect(page.locator("#conn-text")).to_have_text("connected")
            expect(page.locator("#chat-list button")).to_have_count(0)
            expect(page.locator("#model option")).to_have_count(2)
            seen["after_corrupt"] = _ask(page, expect, "still fine")
            expect(page.locator("#chat-list button")).to_have_count(1)

            # Bounded: of 60 stored chats the newest 50 are kept, and of chats over the
            # size cap (1 MB in all) the oldest go.
            page.evaluate(FILL_CHATS, [60, 10])
            page.reload()
            expect(page.locator("#chat-list button")).to_have_count(50)
            seen["bounded_titles"] = page.eval_on_selector_all(
                "#chat-list button", "els => [els[0].title, els[els.length - 1].title]"
            )
            seen["bounded_stored"] = page.evaluate(STORED_TITLES)
            page.evaluate(FILL_CHATS, [5, 300_000])
            page.reload()
            expect(page.locator("#chat-list button")).to_have_count(3)
            seen["capped_stored"] = page.evaluate(STORED_TITLES)
            seen["page_errors"] = errors
            seen["csp_violations"] = violations
        finally:
            browser.close()
    return seen


async def test_web_page_keeps_conversations_in_the_browser(
    stack: Stack, nursery: trio.Nursery
) -> None:
    sync_api = _playwright()
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01, default_tokens=6)
    )
    with trio.fail_after(150):
        seen = await trio.to_thread.run_sync(
            functools.partial(_browse_chats, sync_api, stack.url, fake, stack),
            abandon_on_cancel=True,
        )
    assert seen["page_errors"] == []
    assert seen["csp_violations"] == []
    assert seen["oidc_hidden"] is True
    connect = next(d for d in seen["csp"].split(";") if d.strip().startswith("connect-src"))
    assert len(connect.split()) == 4, connect  # connect-src 'self' ws://.. wss://..
    assert seen["first_answer"].startswith("You said: the first chat's question")
    assert seen["titles"] == ["the second chat's question", "the first chat's question"]
    assert seen["after_reload"] == ["the second chat's question", seen["second_answer"]]
    assert seen["switched"] == ["the first chat's question", seen["first_answer"]]
    assert seen["active"] == "the first chat's question"
    # The follow-up carried the first chat's history, and only that chat's.
    chats = [r for r in fake.requests if r.path == "/api/chat"]
    assert len(chats) == 4
    assert chats[2].messages == [
        {"role": "user", "content": "the first chat's question"},
        {"role": "assistant", "content": seen["first_answer"]},
        {"role": "user", "content": "a follow-up in the first chat"},
    ]
    assert chats[1].messages == [{"role": "user", "content": "the second chat's question"}]
    assert chats[3].messages == [{"role": "user", "content": "still fine"}]
    # What the browser kept: the chats, under one key; the token only in sessionStorage.
    local = seen["storage"]["local"]
    assert list(local) == ["c2l.chats"]
    stored = json.loads(local["c2l.chats"])
    assert [len(c["messages"]) for c in stored["chats"]] == [4, 2]
    assert stored["chats"][0]["messages"][1]["route"] == "cloud"
    assert seen["token"] and all(seen["token"] not in v for v in local.values())
    assert seen["storage"]["session"]["c2l.token"] == seen["token"]
    assert seen["after_clear"] == {}
    assert seen["bounded_titles"] == ["chat 59", "chat 10"]
    assert seen["bounded_stored"] == [f"chat {i}" for i in range(59, 9, -1)]
    assert seen["capped_stored"] == ["chat 4", "chat 3", "chat 2"]
    assert (SHOTS / "web-page-chats.png").stat().st_size > 10_000


# ------------------------------------------------------------- sign in with the provider

AUDIENCE = "https://api.c2l.test"
CLIENT_ID = "c2l-web-page"
SUB = "oidc-user"
ACCESS_TTL = 30  # seconds: the page must renew before the gateway closes at expiry


def _browse_oidc(
    sync_api: Any, url: str, fake: FakeOllama, stack: Stack, idp: OidcProvider
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors, violations = _watch(page)
            expect = sync_api.expect
            expect.set_options(timeout=UI_TIMEOUT_MS)
            # Every bearer the gateway receives from the page: HTTP headers and the
            # WebSocket's auth messages.
            bearers: list[str] = []

            def on_request(req: Any) -> None:
                auth = req.headers.get("authorization", "")
                if req.url.startswith(url) and auth.startswith("Bearer "):
                    bearers.append(auth.removeprefix("Bearer "))

            def on_socket(ws: Any) -> None:
                def sent(payload: Any) -> None:
                    try:
                        msg = json.loads(payload)
                    except (TypeError, ValueError):
                        return
                    if isinstance(msg, dict) and msg.get("type") == "auth":
                        bearers.append(msg["token"])

                ws.on("framesent", sent)

            page.on("request", on_request)
            page.on("websocket", on_socket)
            navigations: list[str] = []
            page.on(
                "framenavigated",
                lambda frame: navigations.append(frame.url) if frame == page.main_frame else None,
            )

            response = page.goto(url)
            seen["csp"] = response.headers["content-security-policy"]
            button = page.locator("#oidc-btn")
            expect(button).to_be_visible()
            seen["button"] = button.inner_text()
            seen["paste_box"] = page.locator("#token").is_visible()
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "web-page-oidc-signin.png"))

            # Sign in: to the provider and back, signed in and connected.
            button.click()
            expect(page.locator("#conn-text")).to_have_text("connected")
            seen["url_after"] = page.url
            seen["navigations"] = list(navigations)
            seen["who"] = page.inner_text("#who")
            stack.start_agent(SUB, fake.url, token=idp.sign_access(SUB, ttl=600))
            expect(page.locator("#desktop-text")).to_have_text("desktop: connected")
            expect(page.locator("#model option")).to_have_count(2)
            seen["answer"] = _ask(page, expect, "hello through the identity provider")
            seen["first_token"] = page.evaluate("window.c2l.token")
            seen["storage_signed_in"] = _storage(page)
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "web-page-oidc.png"))

            # Renewal: before the first access token expires, the page gets another with
            # the refresh token and gives it to the live connection; after the first one's
            # expiry the connection is still up and chats.
            first_exp = jwt.decode(seen["first_token"], options={"verify_signature": False})["exp"]
            page.wait_for_function(
                "([old]) => window.c2l.token && window.c2l.token !== old",
                arg=[seen["first_token"]],
                timeout=(ACCESS_TTL + 10) * 1000,
            )
            seen["renewed_at"] = time.time()
            seen["first_exp"] = first_exp
            seen["renewed_token"] = page.evaluate("window.c2l.token")
            time.sleep(max(0.0, first_exp + 2 - time.time()))
            seen["conn_after_expiry"] = page.inner_text("#conn-text")
            seen["signin_hidden_after_expiry"] = page.locator("#signin").is_hidden()
            seen["answer_after_expiry"] = _ask(page, expect, "still here after the renewal")
            seen["storage_renewed"] = _storage(page)
            # A reload keeps this tab's sign-in (sessionStorage), without the provider.
            grants = len(idp.token_grants)
            page.reload()
            expect(page.locator("#conn-text")).to_have_text("connected")
            seen["who_after_reload"] = page.inner_text("#who")
            seen["grants_by_reload"] = len(idp.token_grants) - grants
            seen["authorizations_by_reload"] = len(idp.authorize_requests) - 1
            # A reload when the tab's access token has expired (here: the first one put
            # back) renews it with the refresh token at once instead of asking again.
            grants = len(idp.token_grants)
            # (The kept session's expiry is pushed far off, so only the reload can renew.)
            page.evaluate(
                "([t]) => { sessionStorage.setItem('c2l.token', t);"
                " const s = JSON.parse(sessionStorage.getItem('c2l.oidc'));"
                " s.expiresAt = Date.now() + 3600000;"
                " sessionStorage.setItem('c2l.oidc', JSON.stringify(s)); }",
                [seen["first_token"]],
            )
            page.reload()
            expect(page.locator("#conn-text")).to_have_text("connected")
            seen["token_after_expired_reload"] = page.evaluate("window.c2l.token")
            seen["grants_by_expired_reload"] = idp.token_grants[grants:]

            # Sign out: through the provider's end-session endpoint and back, tokens gone.
            with page.expect_navigation(url=url + "/"):
                page.click("#signout")
            expect(page.locator("#signin")).to_be_visible()
            expect(page.locator("#oidc-btn")).to_be_visible()
            seen["storage_signed_out"] = _storage(page)
            seen["token_signed_out"] = page.evaluate("window.c2l.token")

            # A sign-in answer this tab did not ask for is refused: a sign-in is started
            # (and stopped on its way to the provider), then a return with another state.
            authorize = f"{idp.url}/authorize"
            page.route(lambda u: u.startswith(authorize), lambda route: route.abort())
            with page.expect_request(lambda req: req.url.startswith(authorize)):
                page.click("#oidc-btn")
            page.goto(url + "/?code=forged-code&state=forged-state")
            expect(page.locator("#notice")).to_contain_text("does not match")
            seen["forged_notice"] = page.inner_text("#notice")
            seen["forged_url"] = page.url
            seen["forged_signin"] = page.locator("#signin").is_visible()
            seen["bearers"] = list(bearers)
            seen["page_errors"] = errors
            seen["csp_violations"] = violations
        finally:
            browser.close()
    return seen


async def test_web_page_signs_in_with_the_identity_provider(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    sync_api = _playwright()
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01, default_tokens=6)
    )
    with run_oidc_provider(
        audience=AUDIENCE, client_id=CLIENT_ID, sub=SUB, access_ttl=ACCESS_TTL
    ) as idp:
        args = ["--auth-mode", "jwks", "--jwks-url", idp.jwks_url, "--jwt-issuer", idp.url]
        args += ["--jwt-audience", AUDIENCE, "--oidc-client-id", CLIENT_ID]
        with run_stack(tmp_path, *args) as stack:
            idp.register_redirect_uri(stack.url + "/")
            with trio.fail_after(180):
                seen = await trio.to_thread.run_sync(
                    functools.partial(_browse_oidc, sync_api, stack.url, fake, stack, idp),
                    abandon_on_cancel=True,
                )
            # The gateway refuses the ID token (its audience is the client id): it could
            # never have been the bearer.
            async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
                refused = await http.post(
                    "/api/streaming/create",
                    headers={"Authorization": f"Bearer {idp.id_tokens[0]}"},
                )
    assert seen["page_errors"] == []
    assert seen["csp_violations"] == []
    # The CSP lets the page reach the issuer (discovery, token endpoint) and nothing more.
    connect = next(d for d in seen["csp"].split(";") if d.strip().startswith("connect-src"))
    assert connect.split()[-1] == idp.url and len(connect.split()) == 5, connect
    assert seen["button"] == f"Sign in with {idp.url.removeprefix('http://')}"
    assert seen["paste_box"] is True
    # The authorization request: code flow with PKCE, the API audience, state and nonce.
    (asked,) = idp.authorize_requests
    assert asked["response_type"] == "code"
    assert asked["client_id"] == CLIENT_ID
    assert asked["redirect_uri"] == stack.url + "/"
    assert asked["audience"] == AUDIENCE
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert asked["scope"].split() == ["openid", "profile", "email", "offline_access"]
    assert asked["state"] and asked["nonce"]
    assert any("code=" in u for u in seen["navigations"])  # it did come back with a code
    assert "code=" not in seen["url_after"] and "state=" not in seen["url_after"]
    assert seen["url_after"] == stack.url + "/"
    assert seen["who"] == SUB
    assert seen["answer"].startswith("You said: hello through the")
    # Only access tokens went to the gateway, never the ID token.
    assert idp.token_grants[0] == "authorization_code"
    assert seen["bearers"] and set(seen["bearers"]) <= set(idp.access_tokens)
    assert not set(seen["bearers"]) & set(idp.id_tokens)
    assert refused.status_code == 401, refused.text
    assert seen["first_token"] == idp.access_tokens[0]
    # Tokens in sessionStorage only; the browser's long-lived storage holds none.
    every_token = idp.access_tokens + idp.id_tokens + list(idp.refresh_tokens)
    for when in ("storage_signed_in", "storage_renewed"):
        local = seen[when]["local"]
        assert not any(t in v for t in every_token for v in local.values()), when
    assert seen["storage_signed_in"]["session"]["c2l.token"] == seen["first_token"]
    # Renewed with the refresh token before the first one expired, and used at once.
    assert "refresh_token" in idp.token_grants[1:]
    assert seen["renewed_at"] < seen["first_exp"]
    assert seen["renewed_token"] in idp.access_tokens[1:]
    assert seen["renewed_token"] in seen["bearers"]  # the live connection took it
    assert seen["conn_after_expiry"] == "connected"
    assert seen["signin_hidden_after_expiry"] is True
    assert seen["answer_after_expiry"].startswith("You said: still here after")
    assert seen["who_after_reload"] == SUB
    assert seen["authorizations_by_reload"] == 0
    assert seen["grants_by_reload"] <= 1  # at most a renewal that fell due meanwhile
    assert seen["grants_by_expired_reload"][:1] == ["refresh_token"]
    assert seen["token_after_expired_reload"] in idp.access_tokens[2:]
    # Signed out: the tokens are gone, and the provider's session was ended too.
    assert seen["token_signed_out"] == ""
    assert not any(
        k.startswith("c2l.token") or k == "c2l.oidc" for k in seen["storage_signed_out"]["session"]
    )
    (logout,) = idp.logouts
    assert logout == {"client_id": CLIENT_ID, "post_logout_redirect_uri": stack.url + "/"}
    # A forged return is refused, cleaned from the URL, and exchanges nothing.
    assert "sign in again" in seen["forged_notice"]
    assert "code=" not in seen["forged_url"] and "state=" not in seen["forged_url"]
    assert seen["forged_signin"] is True
    assert idp.token_grants.count("authorization_code") == 1
    assert (SHOTS / "web-page-oidc.png").stat().st_size > 10_000
