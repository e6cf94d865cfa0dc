"""The one Podman REST client (orchestrator/_podman_api.py), against a stand-in on a unix socket.

Every caller, the runtime (async) and the command line (blocking: c2l serve's wait,
c2l doctor, c2l image build), reaches Podman with the same prefix and gets the same
exceptions for the same answers. No Podman needed: a small HTTP server on a unix socket
answers like Podman 4.3 does.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import trio

from c2l._cli import _podman_ping
from c2l._doctor import _connect, _Host
from c2l._image import image_labels
from orchestrator import (
    AsyncPodmanClient,
    ObjectNotFound,
    PodmanClient,
    PodmanRuntime,
    RuntimeObjectError,
    RuntimeUnavailable,
)

API = "/v4.0.0/libpod"

#: path -> (status, body) as Podman 4.3.1 answers them.
ANSWERS: dict[str, tuple[int, object]] = {
    f"{API}/_ping": (200, "OK"),
    f"{API}/version": (200, {"Version": "4.3.1"}),
    f"{API}/info": (200, {"host": {}, "store": {}}),
    f"{API}/images/localhost%2Fc2l-proxy%3Alatest/json": (
        200,
        {"Id": "abc", "Config": {"Labels": {"io.c2l.source-hash": "h"}}},
    ),
    f"{API}/images/missing/json": (404, {"message": "missing: image not known"}),
    # a pod removed with its network between a listing and a call: 500, not 404
    f"{API}/pods/gone/json": (500, {"message": "no pod with name or ID gone found"}),
    f"{API}/pods/busy/json": (409, {"message": "pod busy is in use"}),
}


class _Podman(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    paths: list[str]
    #: seconds ``/version`` takes (a busy service: /_ping still answers at once)
    version_delay: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Podman

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.path.endswith("/version"):
            time.sleep(self.server.version_delay)
        status, body = ANSWERS.get(self.path, (404, {"message": f"no route {self.path}"}))
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "text/plain" if isinstance(body, str) else "application/json"
        )
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        pass


_SERVERS: dict[str, _Podman] = {}


def _podman_server(url: str) -> _Podman:
    return _SERVERS[url]


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(``unix://`` URL, the paths asked so far) of a Podman stand-in."""
    path = tmp_path / "podman.sock"
    server = _Podman(str(path), _Handler)
    server.paths = []
    _SERVERS[f"unix://{path}"] = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"unix://{path}", server.paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_every_blocking_caller_uses_the_one_prefix(podman: tuple[str, list[str]]) -> None:
    url, paths = podman
    assert _podman_ping(url) == "4.3.1"  # c2l serve's wait
    host = _Host(podman_url=url, user="u", home=Path("/nonexistent"), uid=0)
    checks = list(_connect(host))  # c2l doctor
    assert [(c.name, c.status) for c in checks] == [("REST socket", "OK")], checks
    assert host.client is not None
    host.client.close()
    with PodmanClient(url) as client:  # c2l image build
        assert image_labels(client, "localhost/c2l-proxy:latest") == {"io.c2l.source-hash": "h"}
        assert image_labels(client, "missing") is None
    assert paths, "nothing reached the stand-in"
    assert all(p.startswith(f"{API}/") for p in paths), paths


async def test_the_runtime_uses_it_too(podman: tuple[str, list[str]]) -> None:
    url, paths = podman
    with trio.fail_after(10):
        async with PodmanRuntime(url) as runtime:
            await runtime.ping()
            with pytest.raises(ObjectNotFound):
                await runtime.inspect_pod("gone")
    assert paths == [f"{API}/_ping", f"{API}/pods/gone/json"]


@pytest.mark.parametrize(
    ("path", "error", "text"),
    [
        ("/images/missing/json", ObjectNotFound, "missing: image not known (HTTP 404)"),
        ("/pods/gone/json", ObjectNotFound, "no pod with name or ID gone found (HTTP 500)"),
        ("/pods/busy/json", RuntimeObjectError, "pod busy is in use (HTTP 409)"),
    ],
)
async def test_errors_are_the_same_blocking_and_async(
    podman: tuple[str, list[str]], path: str, error: type[Exception], text: str
) -> None:
    url, _ = podman
    with PodmanClient(url) as client, pytest.raises(error) as blocking:
        client.request("GET", path, what="inspect it", kind="pod", name="x")
    api = AsyncPodmanClient(url)
    try:
        with trio.fail_after(10), pytest.raises(error) as cancellable:
            await api.request("GET", path, what="inspect it", kind="pod", name="x")
    finally:
        await api.aclose()
    for raised in (blocking.value, cancellable.value):
        assert type(raised) is error
        assert str(raised) == f"podman could not inspect it: {text}"
        assert isinstance(raised, RuntimeObjectError)
        assert (raised.kind, raised.name) == ("pod", "x")
    assert str(blocking.value) == str(cancellable.value)


async def test_no_service_is_runtime_unavailable_for_both(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/none.sock"
    with PodmanClient(url) as client, pytest.raises(RuntimeUnavailable, match="c2l doctor"):
        client.request("GET", "/_ping", what="answer a ping")
    api = AsyncPodmanClient(url)
    try:
        with trio.fail_after(10), pytest.raises(RuntimeUnavailable, match="c2l doctor"):
            await api.request("GET", "/_ping", what="answer a ping")
    finally:
        await api.aclose()
    assert _podman_ping(url) is None


def test_a_busy_service_whose_version_is_slow_still_counts_as_answering(
    podman: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """c2l serve's start-up wait pings ``/_ping``: a ``/version`` slower than the ping's
    bound (4.4 s seen with a thousand pods) must not keep the gateway from starting."""
    import c2l._cli

    url, paths = podman
    server = _podman_server(url)
    server.version_delay = 3.0
    assert _podman_ping(url) == "4.3.1"  # the version, late but within its own bound
    monkeypatch.setattr(c2l._cli, "VERSION_TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    assert _podman_ping(url) == "?"  # answering, its version unknown
    assert time.monotonic() - t0 < 2.5
    assert f"{API}/_ping" in paths


@pytest.mark.parametrize("url", ["ftp://host", "/run/podman.sock", ""])
def test_an_unusable_url_is_named(url: str) -> None:
    with pytest.raises(RuntimeUnavailable, match=r"use unix:///path/podman\.sock"):
        PodmanClient(url)
    with pytest.raises(RuntimeUnavailable, match=r"use unix:///path/podman\.sock"):
        AsyncPodmanClient(url)
