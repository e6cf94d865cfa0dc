"""Scale on real rootless Podman: a real ``c2l serve`` with 150 live sessions (issue 8).

- SIGTERM: the gateway removes every session's objects (Podman removes about one session
  per 0.4 s, one at a time) and exits 0; nothing labelled is left.
- SIGKILL, then a restart: ``/health`` answers within 5 s while the leftovers are still
  being removed in the background; a new user, and a user whose leftover pod is still
  there, get working sessions during that sweep; a SIGTERM in the middle of the sweep
  removes the rest: nothing is left.

``C2L_SCALE_SESSIONS`` changes the number (150 by default, about 2 minutes per test on a
2-core machine). ``C2L_TEST_SWEEP_DELAY`` (test-only, read by the orchestrator) slows each
leftover's removal a little, so "during the sweep" does not depend on Podman being slow.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import user_hash
from desktop.testing import FakeOllama, serve_fake_ollama
from orchestrator import PodmanRuntime, pod_name, remove_labelled

from ._stack import Stack, count, labelled, podman_client, run_stack, stop, wait_for_desktop
from ._stack import podman_get as _podman_get
from .conftest import PODMAN_URL, free_port

pytestmark = pytest.mark.podman

N = int(os.environ.get("C2L_SCALE_SESSIONS") or 150)
#: Creates in flight at once (the gateway starts 4 at a time; more only wait for a slot).
CONCURRENCY = 6


def figure(name: str, value: float, unit: str = "s") -> None:
    """Report one measurement (shown with ``pytest -s``, and in the log of a failure)."""
    print(f"\nFIGURE {name}: {value:.2f} {unit}", flush=True)


def scale_env() -> dict[str, str]:
    return {
        "C2L_MAX_SESSIONS": str(N + 50),
        "C2L_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "C2L_HEALTH_INTERVAL": "300",  # 150 health checks a few seconds apart are noise here
    }


async def create_sessions(stack: Stack, subs: list[str]) -> list[dict[str, Any]]:
    """POST /api/streaming/create for every user, ``CONCURRENCY`` at a time; all must be 200."""
    created: list[dict[str, Any]] = []
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(http: httpx.AsyncClient, sub: str) -> None:
        async with limiter:
            r = await http.post(
                "/api/streaming/create", headers={"Authorization": f"Bearer {stack.token(sub)}"}
            )
            assert r.status_code == 200, r.text
            created.append(r.json())

    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
        async with trio.open_nursery() as nursery:
            for sub in subs:
                nursery.start_soon(one, http, sub)
    return created


async def wait_exit(stack: Stack, limit: float) -> int:
    rc = await trio.to_thread.run_sync(functools.partial(stack.proc.wait, limit))
    return int(rc)


def metrics_url(stack: Stack) -> str:
    return "http://" + stack.env["C2L_METRICS_ADDR"] + "/metrics"


async def metric(http: httpx.AsyncClient, stack: Stack, name: str) -> float:
    text = (await http.get(metrics_url(stack))).text
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


@contextlib.contextmanager
def serving(tmp: Path, env: dict[str, str]) -> Iterator[Stack]:
    """:func:`run_stack`, stopped with SIGTERM and time to remove everything if the test
    fails (run_stack's own stop kills after 10 s, which would leave 150 pods behind)."""
    with run_stack(tmp, env=env) as stack:
        try:
            yield stack
        finally:
            stop(stack.proc, timeout=400)


async def clean_start() -> None:
    """Nothing labelled before the test (what earlier tests left would skew the counts)."""
    async with PodmanRuntime(PODMAN_URL) as rt:
        await remove_labelled(rt)


async def test_sigterm_with_many_sessions_leaves_nothing(tmp_path: Path) -> None:
    await clean_start()
    subs = [f"scale-term-{i}@example.com" for i in range(N)]
    with serving(tmp_path, scale_env()) as stack:
        with trio.fail_after(600):
            t0 = time.monotonic()
            await create_sessions(stack, subs)
            figure(f"{N} sessions created", time.monotonic() - t0)
            found = await labelled()
            assert len(found.pods) == N
            t0 = time.monotonic()
            stack.proc.send_signal(signal.SIGTERM)
            rc = await wait_exit(stack, 400)
            took = time.monotonic() - t0
        left = await labelled()
        log = stack.log.read_text()
        assert rc == 0, log[-3000:]
        assert count(left) == 0, left
        assert "INCOMPLETE" not in log and "FAILED" not in log
        figure(f"SIGTERM with {N} sessions: exit 0, nothing left", took)
        figure(f"SIGTERM with {N} sessions: per session", took / N)


async def test_sigkill_then_restart_serves_while_leftovers_are_removed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    await clean_start()
    ollama: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01)
    )
    subs = [f"scale-kill-{i}@example.com" for i in range(N)]
    with serving(tmp_path / "first", scale_env()) as first:
        with trio.fail_after(400):
            await create_sessions(first, subs)
            assert len((await labelled()).pods) == N
        first.proc.kill()
        first.proc.wait(10)
    assert len((await labelled()).pods) == N  # a killed gateway leaves everything
    env = {**scale_env(), "C2L_TEST_SWEEP_DELAY": "0.1"}
    t0 = time.monotonic()
    with serving(tmp_path / "second", env) as second:  # returns once /health is 200
        health = time.monotonic() - t0
        figure(f"restart with {N} sessions left: /health answers", health)
        assert health < 5
        with trio.fail_after(500):
            async with httpx.AsyncClient(base_url=second.url, timeout=60) as http:
                # A new user and a user whose leftover pod is still there, at once.
                t1 = time.monotonic()
                newcomer, returning = "scale-new@example.com", subs[-1]
                for sub in (newcomer, returning):
                    second.start_agent(sub, ollama.url)
                async with trio.open_nursery() as users:
                    for sub in (newcomer, returning):
                        users.start_soon(wait_for_desktop, http, second.token(sub))
                ready = time.monotonic() - t1
                remaining = await metric(http, second, "c2l_sweep_remaining")
                figure("during the sweep: two users streaming", ready)
                figure("during the sweep: leftover sessions still to remove", remaining, "")
                assert await metric(http, second, "c2l_sweep_leftovers") == N
                assert remaining > 0  # it really was during the sweep
                # The returning user's pod is the new session's, not the leftover: it
                # streams, and its labels are this gateway's.
                uh = user_hash(returning)
                sessions = await create_sessions(second, [returning])
                await chat(sessions[0], second.token(returning))
                info = await podman_get(f"/pods/{pod_name(uh)}/json")
                assert info["Labels"]["cloudtolocalllm.session"] == sessions[0]["sessionId"]
                assert info["Labels"]["cloudtolocalllm.replica"] == replica_of(second)
                assert replica_of(second) != replica_of(first)
                remaining = await metric(http, second, "c2l_sweep_remaining")
                figure("stopped during the sweep, leftover sessions still to remove", remaining, "")
                assert remaining > 0
        # Stopped in the middle of the sweep: the stop removes the rest, and its own.
        for agent in second.agents.values():
            agent.terminate()
        t1 = time.monotonic()
        second.proc.send_signal(signal.SIGTERM)
        rc = await wait_exit(second, 400)
        figure("SIGTERM during the sweep: exit, nothing left", time.monotonic() - t1)
        log = second.log.read_text()
        assert rc == 0, log[-3000:]
        assert "sweep: removed" in log
    assert count(await labelled()) == 0


def replica_of(stack: Stack) -> str:
    """The replica id the gateway logged at start."""
    return stack.log.read_text().split("gateway replica ", 1)[1].split()[0]


async def podman_get(path: str) -> Any:
    async with podman_client() as client:
        return await _podman_get(client, path)


async def chat(session: dict[str, Any], token: str) -> None:
    """One streamed generation through the session."""
    async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
        await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
        assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
        body = {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 3}}
        await ws.send_message(wire.encode(wire.Request("c", "POST", "/api/generate", {}, body)))
        kinds = []
        while True:
            msg = wire.decode(await ws.get_message())
            if isinstance(msg, wire.Ping):
                continue
            kinds.append(type(msg).__name__)
            if isinstance(msg, (wire.ResponseEnd, wire.Error)):
                break
        assert kinds[0] == "ResponseStart" and kinds[-1] == "ResponseEnd", kinds
