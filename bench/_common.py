"""Helpers shared by ``bench/scale.py`` and ``bench/load.py`` (not a test: no asserts).

- figures: percentiles (nearest rank), summaries, the fixed-width table both modes print;
- ``/proc``: one process table (pid, parent, owner, name, CPU ticks), PSS from
  ``smaps_rollup``, host memory from ``meminfo``, listening TCP ports from ``net/tcp``;
  the parsers are pure functions of the file's text so that they can be tested on
  synthetic data (tests/test_bench_smoke.py);
- the Podman service user: its uid and subordinate uid range (the containers' processes),
  read from the owner of the socket, and which of its processes is which helper;
- a ``c2l serve`` subprocess (start, ``/health``, stop with a signal and a bound), the
  environment it runs with, and the Podman objects of a run's own users (count, remove).

bench/bench.py and bench/lifecycle.py are scripts other people run and change; these
helpers repeat the small parts of them that the two new modes need rather than import
them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import pwd
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio

from c2lcore import default_podman_url
from gateway import DevIssuer
from orchestrator import LABEL_USER, PROXY_SELECTOR, PodmanRuntime

API: Final = "/v4.0.0/libpod"
ROOT: Final = Path(__file__).resolve().parent.parent
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
#: Lifetime of the tokens the benchmarks sign: longer than any run, so that no
#: connection ends on expiry in the middle of a measurement.
TOKEN_TTL: Final = 7 * 24 * 3600


# --------------------------------------------------------------------------- figures


def pct(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` by nearest rank (p99 of 100 values: the 99th)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """``n``, ``p50``, ``p99`` and ``max`` of ``values`` (None for each when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99), "max": max(values)}


def fmt(value: float | None, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """``value * scale`` with ``digits`` decimals and ``unit``, or ``-`` for None."""
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A fixed-width text table: the first column left-aligned, the others right-aligned."""
    body = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in body) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            (c.ljust(w) if i == 0 else c.rjust(w))
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(body[0]), rule, *(line(r) for r in body[1:])])


def key_values(rows: Iterable[Sequence[str]]) -> str:
    """``name  value`` lines, the names padded to one width."""
    rows = [list(r) for r in rows]
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"{r[0]:<{width}}  {' '.join(r[1:])}".rstrip() for r in rows)


def describe(exc: BaseException) -> str:
    """One line for an exception (groups flattened, Ctrl-C named)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- NDJSON stamps

_STAMP: Final = "%Y-%m-%dT%H:%M:%S.%fZ"


def stamp_now() -> str:
    """``created_at`` as the fake Ollama writes it (UTC, microseconds)."""
    return dt.datetime.now(dt.UTC).strftime(_STAMP)


def produced_at(line: str) -> float:
    """The wall-clock time (epoch seconds) of an NDJSON line's ``created_at``."""
    stamp = json.loads(line)["created_at"]
    return dt.datetime.strptime(stamp, _STAMP).replace(tzinfo=dt.UTC).timestamp()


def chat_body(tokens: int) -> dict[str, Any]:
    """A streaming ``/api/chat`` request for ``tokens`` tokens (the fake's ``num_predict``)."""
    return {
        "model": "llama3.2:latest",
        "messages": [{"role": "user", "content": "benchmark"}],
        "options": {"num_predict": tokens},
    }


# --------------------------------------------------------------------------- /proc parsers


@attrs.frozen
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the benchmarks use."""

    comm: str
    ppid: int
    #: utime + stime, in clock ticks (``CLK_TCK`` a second)
    ticks: int


def parse_stat(text: str) -> ProcStat:
    """Parse ``/proc/<pid>/stat``; the name is in parentheses and may hold spaces or ')'."""
    open_, close = text.index("("), text.rindex(")")
    rest = text[close + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15
    return ProcStat(text[open_ + 1 : close], int(rest[1]), int(rest[11]) + int(rest[12]))


def parse_pss_kb(text: str) -> int:
    """The ``Pss:`` line of ``smaps_rollup`` (kB); ValueError when there is none."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise ValueError("no Pss line")


def parse_meminfo_used(text: str) -> int:
    """Host memory in use, in bytes: ``MemTotal - MemAvailable`` of ``/proc/meminfo``."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts:
            fields[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields["MemTotal"] - fields["MemAvailable"]


def parse_tcp_listeners(text: str) -> dict[int, int]:
    """Socket inode -> local port of the LISTEN sockets in ``/proc/net/tcp`` or ``tcp6``."""
    out: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != "0A":  # 0A is TCP_LISTEN
            continue
        port = int(parts[1].rsplit(":", 1)[1], 16)
        out[int(parts[9])] = port
    return out


def host_memory_used() -> int:
    """``MemTotal - MemAvailable`` now, in bytes."""
    return parse_meminfo_used(Path("/proc/meminfo").read_text())


def pss_bytes(pid: int) -> int | None:
    """The PSS of one process in bytes; None if it is gone or unreadable."""
    try:
        return parse_pss_kb(Path(f"/proc/{pid}/smaps_rollup").read_text()) * 1024
    except (OSError, ValueError):
        return None


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed; None if the process is gone."""
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def self_cpu_seconds() -> float:
    """CPU time of this process (every thread), user + system."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_fd_limit() -> int:
    """Raise this process's open-files limit to its hard limit (many sockets); the new one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------- processes


@attrs.frozen
class Proc:
    """One process of the table."""

    pid: int
    ppid: int
    uid: int
    comm: str
    ticks: int
    #: the REST service (``podman system service``): reported apart, never a session's
    is_service: bool = False


def processes(uids: Callable[[int], bool] | None = None) -> dict[int, Proc]:
    """Every process (or those whose owner passes ``uids``), read from /proc once."""
    out: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat().st_uid
            if uids is not None and not uids(uid):
                continue
            st = parse_stat(Path(entry.path, "stat").read_text())
            service = False
            if st.comm == "podman":
                service = b"system\x00service" in Path(entry.path, "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out[int(entry.name)] = Proc(int(entry.name), st.ppid, uid, st.comm, st.ticks, service)
    return out


def descendants(procs: Mapping[int, Proc], roots: Iterable[int]) -> set[int]:
    """``roots`` (those in ``procs``) and every process below them."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    seen: set[int] = set()
    todo = [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


#: The kinds of the service user's processes, by name (``comm``, 15 characters at most).
HELPER_KINDS: Final = {
    "conmon": "conmon",
    "rootlessport": "rootlessport",
    "exe": "rootlessport",  # rootlessport-child re-executes /proc/self/exe
    "slirp4netns": "slirp4netns",
    "catatonit": "infra/pause",
    "aardvark-dns": "aardvark-dns",
    "python3": "proxy",
}


def kind_of(proc: Proc) -> str:
    """What a process of the Podman service user is: ``HELPER_KINDS`` or ``podman`` / ``other``."""
    if proc.is_service:
        return "podman service"
    return HELPER_KINDS.get(proc.comm, "other")


@attrs.frozen
class ServiceUser:
    """The owner of the Podman socket and its subordinate uid range (the containers)."""

    name: str
    uid: int
    ranges: tuple[tuple[int, int], ...]

    def owns(self, uid: int) -> bool:
        """Whether ``uid`` is the service user or one of its containers' users."""
        return uid == self.uid or any(a <= uid < b for a, b in self.ranges)

    @classmethod
    def of_socket(cls, podman_url: str, subuid: str = "/etc/subuid") -> ServiceUser:
        owner = os.stat(podman_url.removeprefix("unix://")).st_uid
        name = pwd.getpwuid(owner).pw_name
        return cls(name, owner, parse_subuid(Path(subuid).read_text(), name, owner))


def parse_subuid(text: str, name: str, uid: int) -> tuple[tuple[int, int], ...]:
    """The ``[start, end)`` ranges of ``name`` (or its uid) in ``/etc/subuid`` text."""
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)):
            ranges.append((int(parts[1]), int(parts[1]) + int(parts[2])))
    return tuple(ranges)


@attrs.frozen
class CpuSample:
    """CPU ticks per process at one instant, with each process's kind."""

    at: float
    ticks: dict[int, int]
    kinds: dict[int, str]


def cpu_sample(groups: Mapping[str, Iterable[int]], service: ServiceUser | None) -> CpuSample:
    """Ticks of the processes in ``groups`` (kind -> pids) and of the service user's."""
    ticks: dict[int, int] = {}
    kinds: dict[int, str] = {}
    if service is not None:
        for p in processes(service.owns).values():
            ticks[p.pid], kinds[p.pid] = p.ticks, kind_of(p)
    for kind, pids in groups.items():
        for pid in pids:
            st = read_stat(pid)
            if st is not None:
                ticks[pid], kinds[pid] = st.ticks, kind
    return CpuSample(time.monotonic(), ticks, kinds)


def cpu_delta(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """CPU seconds per kind between two samples.

    A process that started in between counts from zero (it did all its work in the
    window); one that ended in between is lost (its last ticks cannot be read).
    """
    out: dict[str, float] = {}
    for pid, now in after.ticks.items():
        kind = after.kinds[pid]
        spent = now - before.ticks.get(pid, 0)
        out[kind] = out.get(kind, 0.0) + max(spent, 0) / CLK_TCK
    return out


# --------------------------------------------------------------------------- the gateway


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gateway_env(tmp: Path, podman_url: str, max_sessions: int) -> dict[str, str]:
    """The environment of a benchmark's ``c2l serve`` and agents.

    Its own configuration directory (dev key, audit key) in ``tmp``; no idle end while a
    run lasts; and ``/metrics`` on a free port of its own, so that it never collides with
    another gateway on this host (the default 127.0.0.1:9464 is taken by the first one).
    """
    return {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp),
        "C2L_PODMAN_URL": podman_url,
        "C2L_MAX_SESSIONS": str(max_sessions),
        "C2L_IDLE_TIMEOUT": "86400",
        "C2L_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "PYTHONUNBUFFERED": "1",
    }


@attrs.define
class Gateway:
    """One ``c2l serve`` subprocess of this run."""

    proc: trio.Process
    url: str
    log: Path
    started: float

    @classmethod
    async def start(cls, env: Mapping[str, str], log: Path) -> Gateway:
        port = free_port()
        with open(log, "wb") as out:  # the child keeps its own copy
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "c2l", "serve", "--port", str(port)],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
            )
        return cls(proc, f"http://127.0.0.1:{port}", log, time.monotonic())

    async def health(self, http: httpx.AsyncClient) -> dict[str, Any] | None:
        try:
            r = await http.get(f"{self.url}/health", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    async def wait_healthy(self, http: httpx.AsyncClient, limit: float) -> float:
        """Seconds from start until ``/health`` answered 200 (TooSlowError after ``limit``)."""
        with trio.fail_after(limit):
            while await self.health(http) is None:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"c2l serve exited with {self.proc.returncode}")
                await trio.sleep(0.1)
        return time.monotonic() - self.started

    async def stop(self, sig: int, limit: float) -> tuple[float, int | None]:
        """Send ``sig``: (seconds until exit, exit code); SIGKILL after ``limit`` (code None)."""
        t0 = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code: int | None = None
        with trio.move_on_after(limit):
            code = await self.proc.wait()
        if code is None:
            self.proc.kill()
            with trio.move_on_after(10):
                await self.proc.wait()
        return time.monotonic() - t0, code

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def create(
        self, http: httpx.AsyncClient, token: str, limit: float, retries: list[int]
    ) -> dict[str, Any]:
        """``POST /api/streaming/create`` until 200 (429/503 retried, counted in ``retries``)."""
        auth = {"Authorization": f"Bearer {token}"}
        with trio.fail_after(limit):
            while True:
                try:
                    r = await http.post(
                        f"{self.url}/api/streaming/create", headers=auth, timeout=limit
                    )
                except httpx.HTTPError:
                    if self.proc.returncode is not None:
                        raise RuntimeError(
                            f"c2l serve exited with {self.proc.returncode}"
                        ) from None
                    await trio.sleep(0.1)
                    continue
                if r.status_code == 200:
                    session: dict[str, Any] = r.json()
                    return session
                if r.status_code in (429, 503):
                    retries.append(r.status_code)
                    await trio.sleep(min(float(r.headers.get("Retry-After") or 1), 5))
                    continue
                raise RuntimeError(f"create: HTTP {r.status_code} {r.text[:300]}")


# --------------------------------------------------------------------------- Podman objects


class Podman:
    """Reads the labelled objects through the REST API; removes through PodmanRuntime."""

    def __init__(self, url: str) -> None:
        if not url.startswith("unix://"):
            raise SystemExit(f"C2L_PODMAN_URL={url!r}: the benchmark needs unix:///path.sock")
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

    async def containers(self) -> list[dict[str, Any]]:
        """Every labelled container, infra included (``Pid``, ``PodName``, ``Ports``...)."""
        return await self._get("/containers/json", all="true")

    async def labelled(self) -> dict[str, list[tuple[str, str]]]:
        """(name, user hash) of every labelled pod, container and network."""

        def user(obj: dict[str, Any], key: str = "Labels") -> str:
            return str((obj.get(key) or {}).get(LABEL_USER, ""))

        containers = await self.containers()
        pods = await self._get("/pods/json")
        networks = await self._get("/networks/json")
        return {
            "pods": [(p["Name"], user(p)) for p in pods],
            "containers": [(c["Names"][0], user(c)) for c in containers],
            "networks": [(n["name"], user(n, "labels")) for n in networks],
        }

    async def counts(self, users: AbstractSet[str]) -> dict[str, dict[str, int]]:
        """Labelled objects per kind: ``all`` of them and ``ours`` (of ``users``)."""
        objs = await self.labelled()
        return {
            "all": {kind: len(v) for kind, v in objs.items()},
            "ours": {kind: sum(u in users for _, u in v) for kind, v in objs.items()},
        }

    async def remove_users(self, users: AbstractSet[str], *, concurrency: int = 8) -> int:
        """Remove every labelled object of ``users`` (pods, containers, networks); how many."""
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
            objs = (await self.labelled())[kind]
            async with trio.open_nursery() as nursery:
                for name, owner in objs:
                    if owner in users:
                        nursery.start_soon(one, remove, name)
        return removed


def left_text(counts: Mapping[str, int]) -> str:
    return (
        f"{counts['pods']} pods, {counts['containers']} containers, {counts['networks']} networks"
    )


async def on_signals(scope: trio.CancelScope, results: dict[str, Any]) -> None:
    """Cancel ``scope`` on SIGTERM or SIGHUP (Ctrl-C raises KeyboardInterrupt by itself)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for sig in signals:
            results["error"] = f"interrupted by {signal.Signals(sig).name}"
            scope.cancel()


@attrs.define
class Run:
    """What every bench mode sets up first: its directory, Podman, the gateway's
    environment, a dev issuer, an HTTP client and the results (with the run's config)."""

    tmp: Path
    podman_url: str
    env: dict[str, str]
    issuer: DevIssuer
    podman: Podman
    http: httpx.AsyncClient
    results: dict[str, Any]

    @classmethod
    def open(
        cls,
        prefix: str,
        args: Any,
        *,
        max_sessions: int,
        max_connections: int,
        timeout: float,
    ) -> Run:
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        podman_url = os.environ.get("C2L_PODMAN_URL") or default_podman_url()
        fds = raise_fd_limit()
        http = httpx.AsyncClient(
            timeout=timeout,
            trust_env=False,
            limits=httpx.Limits(max_connections=max_connections),
        )
        config = {k: v for k, v in vars(args).items() if k != "json"}
        results: dict[str, Any] = {
            "config": {**config, "podman": podman_url, "logs": str(tmp), "open_files_limit": fds}
        }
        return cls(
            tmp,
            podman_url,
            gateway_env(tmp, podman_url, max_sessions),
            DevIssuer.load_or_create(tmp / "c2l" / "dev-jwt-key.pem"),
            Podman(podman_url),
            http,
            results,
        )
