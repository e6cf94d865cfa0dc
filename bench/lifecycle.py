"""The gateway's lifecycle at scale on this machine (not a test: it asserts nothing).

Against a real ``c2l serve`` on real rootless Podman, with no desktops:

1. create N sessions (N users, one session each) through ``POST /api/streaming/create``
   with bounded concurrency: the total time, and create-to-ready p50/p99/max per 100
   live sessions (by order of completion);
2. SIGTERM: how long until the gateway exits, its exit code, and what is left labelled
   ``cloudtolocalllm.proxy=true`` (pods, containers including infra, networks);
3. with ``--restart``: N sessions again, SIGKILL, a new ``c2l serve``: how long until
   ``/health`` answers, until a new user's session is ready, until an earlier user (whose
   pod may still be being removed) has a session again, and until no leftover remains;
   then SIGTERM of that gateway as in 2.

It prints a table and, with ``--json PATH``, writes the figures. Whatever happens
(Ctrl-C, SIGTERM, an error), it stops the gateway it started and removes, bounded by
``--cleanup-timeout``, the objects labelled for its own users, and nothing else: other
labelled objects are counted, never touched. The gateway started here sweeps labelled
leftovers of earlier runs itself at start; run it when nothing else uses the Podman service:

    .venv/bin/python bench/lifecycle.py --sessions 1000 --restart --json /tmp/lifecycle.json

Podman needs a lock per pod and per container (three per session): scripts/_setup.sh sets
``num_locks = 8192``, enough for about 2700 sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from _common import Gateway, pct

from c2lcore import default_podman_url, user_hash
from gateway import DevIssuer
from orchestrator import LABEL_USER, PROXY_SELECTOR, PodmanRuntime

API = "/v4.0.0/libpod"


@attrs.frozen
class Labelled:
    """Labelled Podman objects: (name, user hash) per kind."""

    pods: tuple[tuple[str, str], ...] = ()
    containers: tuple[tuple[str, str], ...] = ()  # infra containers included
    networks: tuple[tuple[str, str], ...] = ()

    def counts(
        self, users: AbstractSet[str] | None = None, *, but: AbstractSet[str] = frozenset()
    ) -> dict[str, int]:
        """Per kind, the objects of ``users`` (all when None), leaving out ``but``."""

        def keep(owner: str) -> bool:
            return (users is None or owner in users) and owner not in but

        return {
            "pods": sum(keep(u) for _, u in self.pods),
            "containers": sum(keep(u) for _, u in self.containers),
            "networks": sum(keep(u) for _, u in self.networks),
        }


class Podman:
    """Reads labelled objects through the Podman REST API; removes through PodmanRuntime."""

    def __init__(self, url: str) -> None:
        if not url.startswith("unix://"):
            raise SystemExit(f"C2L_PODMAN_URL={url!r}: this script needs unix:///path.sock")
        transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix://"))
        self.client = httpx.AsyncClient(
            transport=transport, base_url="http://podman" + API, timeout=120, trust_env=False
        )
        self.runtime = PodmanRuntime(url, timeout=120)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.runtime.aclose()

    async def _get(self, path: str, **params: str) -> list[dict[str, Any]]:
        filters = json.dumps({"label": [PROXY_SELECTOR]})
        r = await self.client.get(path, params={"filters": filters, **params})
        r.raise_for_status()
        return list(r.json() or ())

    async def labelled(self) -> Labelled:
        """Everything labelled ``cloudtolocalllm.proxy=true``."""
        containers = await self._get("/containers/json", all="true")
        pods = await self._get("/pods/json")
        networks = await self._get("/networks/json")
        return Labelled(
            tuple((p["Name"], (p.get("Labels") or {}).get(LABEL_USER, "")) for p in pods),
            tuple((c["Names"][0], (c.get("Labels") or {}).get(LABEL_USER, "")) for c in containers),
            tuple((n["name"], (n.get("labels") or {}).get(LABEL_USER, "")) for n in networks),
        )

    async def remove_users(self, users: set[str], *, concurrency: int = 8) -> int:
        """Remove every labelled object of ``users`` (pods, then containers, then networks)."""
        removed = 0
        limiter = trio.CapacityLimiter(concurrency)

        async def one(remove: Callable[[str], Awaitable[None]], name: str) -> None:
            nonlocal removed
            async with limiter:
                try:
                    await remove(name)
                    removed += 1
                except Exception as exc:  # report and go on: remove all that can be
                    print(f"  could not remove {name}: {exc}", file=sys.stderr)

        rt = self.runtime
        for kind, remove in (
            ("pods", rt.remove_pod),
            ("containers", rt.remove_container),
            ("networks", rt.remove_network),
        ):
            objs = getattr(await self.labelled(), kind)
            async with trio.open_nursery() as nursery:
                for name, owner in objs:
                    if owner in users:
                        nursery.start_soon(one, remove, name)
        return removed


@attrs.define
class Bench:
    args: argparse.Namespace
    tmp: Path
    podman: Podman
    http: httpx.AsyncClient
    issuer: DevIssuer
    env: dict[str, str]
    run: str = attrs.field(factory=lambda: secrets.token_hex(3))
    #: user hashes of every user this run made sessions for (cleanup removes only these)
    users: set[str] = attrs.field(factory=set)
    gateway: Gateway | None = None
    results: dict[str, Any] = attrs.field(factory=dict)
    n_gateways: int = 0

    def sub(self, name: str) -> str:
        sub = f"lifecycle-{self.run}-{name}"
        self.users.add(user_hash(sub))
        return sub

    async def start_gateway(self) -> Gateway:
        self.n_gateways += 1
        log = self.tmp / f"gateway-{self.n_gateways}.log"
        self.gateway = await Gateway.start(self.env, log)
        return self.gateway

    async def create(self, sub: str, limit: float) -> float:
        """Seconds until the user's session is ready (retrying while the gateway is busy)."""
        t0 = time.monotonic()
        assert self.gateway is not None
        auth = {"Authorization": f"Bearer {self.issuer.sign(sub)}"}
        with trio.fail_after(limit):
            while True:
                try:
                    r = await self.http.post(
                        f"{self.gateway.url}/api/streaming/create", headers=auth, timeout=limit
                    )
                except httpx.HTTPError:
                    if self.gateway.proc.returncode is not None:
                        raise RuntimeError(
                            f"c2l serve exited with {self.gateway.proc.returncode}"
                        ) from None
                    await trio.sleep(0.1)  # not listening yet
                    continue
                if r.status_code == 200:
                    return time.monotonic() - t0
                if r.status_code in (429, 503):
                    self.results.setdefault("retries", 0)
                    self.results["retries"] += 1
                    await trio.sleep(min(float(r.headers.get("Retry-After") or 1), 5))
                    continue
                raise RuntimeError(f"create for {sub}: HTTP {r.status_code} {r.text[:300]}")

    async def create_many(self, phase: str) -> dict[str, Any]:
        """N sessions with bounded concurrency; latency per ``--bucket`` live sessions."""
        n, bucket = self.args.sessions, self.args.bucket
        done: list[float] = []  # create-to-ready, in order of completion
        at: list[float] = []  # completion, seconds since the first request
        limiter = trio.CapacityLimiter(self.args.concurrency)

        async def one(i: int) -> None:
            async with limiter:
                done.append(await self.create(self.sub(f"{phase}-{i}"), self.args.create_timeout))
                at.append(time.monotonic() - t0)
                if len(done) % bucket == 0 or len(done) == n:
                    print(f"  {len(done)}/{n} sessions ready", flush=True)

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        total = time.monotonic() - t0
        buckets = []
        for start in range(0, n, bucket):
            part = done[start : start + bucket]
            buckets.append(
                {
                    "live": f"{start + 1}-{start + len(part)}",
                    "wall": at[start + len(part) - 1] - (at[start - 1] if start else 0.0),
                    "p50": statistics.median(part),
                    "p99": pct(part, 99),
                    "max": max(part),
                }
            )
        assert self.gateway is not None
        health = await self.gateway.health(self.http) or {}
        return {
            "sessions": n,
            "seconds": total,
            "per_second": n / total,
            "buckets": buckets,
            "live_per_health": health.get("sessions"),
        }

    async def leftovers(self, *, but: AbstractSet[str] = frozenset()) -> dict[str, Any]:
        objs = await self.podman.labelled()
        return {"all": objs.counts(but=but), "ours": objs.counts(self.users, but=but)}

    async def shutdown(self, sig: int = signal.SIGTERM) -> dict[str, Any]:
        assert self.gateway is not None
        seconds, code = await self.gateway.stop(sig, self.args.stop_timeout)
        left = await self.leftovers()
        return {
            "signal": signal.Signals(sig).name,
            "seconds": seconds,
            "exit": code,
            "left": left,
            "steps": _shutdown_steps(self.gateway.log),
        }

    async def restart(self) -> dict[str, Any]:
        """SIGKILL with N live, a new gateway: health, new user, earlier user, no leftovers."""
        assert self.gateway is not None
        killed = self.gateway
        killed.proc.kill()
        await killed.proc.wait()
        before = (await self.leftovers())["ours"]
        gw = await self.start_gateway()
        fresh, earlier = self.sub("fresh"), self.sub("restart-0")  # earlier: pod left behind
        out: dict[str, Any] = {"left_at_kill": before, "progress": []}
        limit = self.args.sweep_timeout

        async def health() -> None:
            out["health_s"] = await gw.wait_healthy(self.http, limit)

        async def new_user() -> None:
            await self.create(fresh, limit)
            out["new_user_ready_s"] = time.monotonic() - gw.started

        async def earlier_user() -> None:
            await self.create(earlier, limit)
            out["earlier_user_ready_s"] = time.monotonic() - gw.started

        async def swept() -> None:
            # The new sessions are labelled too: count only what the killed gateway left.
            mine = {user_hash(fresh), user_hash(earlier)}
            with trio.move_on_after(limit):
                while True:
                    left = (await self.leftovers(but=mine))["ours"]
                    out["progress"].append([round(time.monotonic() - gw.started, 1), left])
                    if not any(left.values()):
                        out["swept_s"] = time.monotonic() - gw.started
                        return
                    await trio.sleep(self.args.poll_interval)

        async with trio.open_nursery() as nursery:
            for task in (health, new_user, earlier_user, swept):
                nursery.start_soon(task)
        return out

    async def cleanup(self) -> None:
        """Stop the gateway, then remove what is labelled for this run's users (bounded)."""
        if self.gateway is not None and self.gateway.proc.returncode is None:
            await self.gateway.stop(signal.SIGTERM, 60)
        t0 = time.monotonic()
        removed = 0
        with trio.move_on_after(self.args.cleanup_timeout):
            removed = await self.podman.remove_users(self.users)
        left = (await self.leftovers())["ours"]
        if removed or any(left.values()):
            print(
                f"cleanup: removed {removed} object(s) in {time.monotonic() - t0:.1f} s;"
                f" still left of this run: {left}",
                flush=True,
            )


#: The gateway's log lines that mark a shutdown's steps (orchestrator/_janitor.py).
_STEPS = ("got SIGTERM", "got SIGINT", "networks at once", "every object removed", "could not")


def _shutdown_steps(log: Path) -> list[tuple[float, str]]:
    """The shutdown's steps from the gateway's log: (seconds after the signal, message)."""
    steps: list[tuple[float, str]] = []
    t0: float | None = None
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return steps
    for line in lines:
        if not any(mark in line for mark in _STEPS):
            continue
        try:  # "2026-12-01 18:38:48,589 INFO name: message"
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            at = stamp + int(line[20:23]) / 1000
        except ValueError:
            continue
        if "got SIG" in line:
            t0 = at
        elif t0 is not None:
            steps.append((round(at - t0, 1), line.split(": ", 1)[-1]))
    return steps


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return f"{type(exc).__name__}: {exc}"


def _table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []

    def left(d: dict[str, int]) -> str:
        return f"{d['pods']} pods, {d['containers']} containers, {d['networks']} networks"

    def created(name: str, c: dict[str, Any]) -> None:
        rows.append(
            (
                f"{name}: {c['sessions']} sessions",
                f"{c['seconds']:.1f} s ({c['per_second']:.1f}/s),"
                f" /health says {c['live_per_health']} live",
            )
        )
        for b in c["buckets"]:
            rows.append(
                (
                    f"  sessions {b['live']}",
                    f"{b['wall']:.1f} s; ready p50 {b['p50']:.2f} s  p99 {b['p99']:.2f} s"
                    f"  max {b['max']:.2f} s",
                )
            )

    def stopped(name: str, s: dict[str, Any]) -> None:
        killed = "no exit, SIGKILL after " if s["exit"] is None else ""
        rows.append((f"{name}: exit", f"{killed}{s['seconds']:.1f} s, exit code {s['exit']}"))
        rows.append((f"{name}: left labelled", left(s["left"]["all"])))
        for at, message in s.get("steps", ()):
            rows.append((f"{name}: at {at:.1f} s", message[:100]))

    if "create" in results:
        created("create", results["create"])
    if "sigterm" in results:
        stopped("SIGTERM", results["sigterm"])
    if "create_again" in results:
        created("create again", results["create_again"])
    r = results.get("restart")
    if r:
        rows.append(("SIGKILL: left at kill", left(r["left_at_kill"])))
        for key, name in (
            ("health_s", "restart: /health answers"),
            ("new_user_ready_s", "restart: new user ready"),
            ("earlier_user_ready_s", "restart: earlier user ready"),
            ("swept_s", "restart: no leftovers"),
        ):
            value = r.get(key)
            rows.append((name, f"{value:.1f} s" if value is not None else "not within bound"))
    if "sigterm_after_restart" in results:
        stopped("SIGTERM after restart", results["sigterm_after_restart"])
    if results.get("retries"):
        rows.append(("creates retried (429/503)", str(results["retries"])))
    if results.get("error"):
        rows.append(("ERROR", results["error"]))
    width = max(len(k) for k, _ in rows) if rows else 0
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="c2l-lifecycle-"))
    podman_url = os.environ.get("C2L_PODMAN_URL") or default_podman_url()
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp),
        "C2L_PODMAN_URL": podman_url,
        "C2L_MAX_SESSIONS": str(args.sessions + 10),
        # No session may end on idle while the others are still being created.
        "C2L_IDLE_TIMEOUT": "86400",
        "PYTHONUNBUFFERED": "1",
    }
    issuer = DevIssuer.load_or_create(tmp / "c2l" / "dev-jwt-key.pem")
    podman = Podman(podman_url)
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    http = httpx.AsyncClient(timeout=30, trust_env=False, limits=limits)
    bench = Bench(args, tmp, podman, http, issuer, env)
    results = bench.results
    results["config"] = {
        "sessions": args.sessions,
        "concurrency": args.concurrency,
        "restart": args.restart or args.restart_only,
        "podman": podman_url,
        "logs": str(tmp),
    }
    print(f"logs in {tmp}; Podman at {podman_url}", flush=True)
    code = 0
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                        async for sig in signals:
                            results["error"] = f"interrupted by {signal.Signals(sig).name}"
                            scope.cancel()

                nursery.start_soon(on_signal)
                before = await bench.leftovers()
                results["labelled_before"] = before["all"]
                if any(before["all"].values()):
                    print(f"note: labelled objects before the run: {before['all']}", flush=True)

                gw = await bench.start_gateway()
                print(f"gateway up in {await gw.wait_healthy(http, 120):.1f} s", flush=True)
                if args.restart_only:
                    # One creation, then straight to SIGKILL and restart (the restart's
                    # figures at full size without also paying for a SIGTERM cycle).
                    results["create_again"] = await bench.create_many("first")
                    print("SIGKILL and restart ...", flush=True)
                    results["restart"] = await bench.restart()
                    print("SIGTERM ...", flush=True)
                    results["sigterm_after_restart"] = await bench.shutdown(signal.SIGTERM)
                    nursery.cancel_scope.cancel()
                    return code
                results["create"] = await bench.create_many("first")
                print("SIGTERM ...", flush=True)
                results["sigterm"] = await bench.shutdown(signal.SIGTERM)
                if args.restart:
                    if any(results["sigterm"]["left"]["ours"].values()):
                        print("removing what the SIGTERM left, before the restart ...", flush=True)
                        with trio.move_on_after(args.cleanup_timeout):
                            await podman.remove_users(bench.users)
                    gw = await bench.start_gateway()
                    await gw.wait_healthy(http, args.sweep_timeout)
                    results["create_again"] = await bench.create_many("restart")
                    print("SIGKILL and restart ...", flush=True)
                    results["restart"] = await bench.restart()
                    print("SIGTERM ...", flush=True)
                    results["sigterm_after_restart"] = await bench.shutdown(signal.SIGTERM)
                nursery.cancel_scope.cancel()
    except BaseException as exc:  # Ctrl-C included: report, clean up, exit non-zero
        results["error"] = _describe(exc)
        code = 1
    finally:
        with trio.CancelScope(shield=True):
            try:
                await bench.cleanup()
            finally:
                await http.aclose()
                await podman.aclose()
        if results.get("error") and bench.n_gateways:
            log = tmp / f"gateway-{bench.n_gateways}.log"
            print(f"--- last lines of {log}", *log.read_text().splitlines()[-15:], sep="\n")
        print(_table(results))
        if args.json:
            await trio.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.json}")
    return 1 if results.get("error") else code


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sessions", type=int, default=1000, help="sessions (%(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="creations in flight (%(default)s)")
    ap.add_argument("--bucket", type=int, default=100, help="report per this many (%(default)s)")
    ap.add_argument("--restart", action="store_true", help="also measure SIGKILL and restart")
    ap.add_argument(
        "--restart-only",
        action="store_true",
        help="create N, then SIGKILL and restart at once (no first SIGTERM cycle)",
    )
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument(
        "--create-timeout", type=float, default=300, help="per session, s (%(default)s)"
    )
    ap.add_argument(
        "--stop-timeout", type=float, default=900, help="SIGKILL after, s (%(default)s)"
    )
    ap.add_argument(
        "--sweep-timeout", type=float, default=1800, help="restart bounds, s (%(default)s)"
    )
    ap.add_argument(
        "--cleanup-timeout", type=float, default=1200, help="removal bound, s (%(default)s)"
    )
    ap.add_argument(
        "--poll-interval", type=float, default=2.0, help="leftover polling, s (%(default)s)"
    )
    sys.exit(trio.run(main, ap.parse_args()))
