"""An in-process fake of the Kubernetes API server: namespaced Pods and Secrets.

Served to lightkube through an injected httpx2 transport (:meth:`FakeKubernetes.transport`)
rather than a socket: requests are answered by plain functions, and a watch is a response
whose body is fed, line by line, from a trio memory channel, so it streams exactly as a
server's chunked body does (``httpx2.MockTransport`` and ``ASGITransport`` would buffer a
whole body first, and a watch never ends). No port, no thread, and the test's clock
(``autojump_clock``) drives the grace periods. For clients in other processes (two
gateway replicas), :func:`serve_fake_kubernetes_http` serves the same fake over real HTTP
on 127.0.0.1 and :func:`write_kubeconfig` points a KUBECONFIG at it (real clock there).

It implements what the runtime relies on, the way the API server does: create (201, or
409 AlreadyExists), get, list with ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``)
and a list ``resourceVersion``, merge patches, graceful delete (``deletionTimestamp`` and
a MODIFIED event, then after the grace period removal and DELETED), garbage collection by
``ownerReferences`` (an object all of whose owners are gone is deleted), watches from a
``resourceVersion`` (history replayed, then live; an ERROR event with a 410 Status when the
version is older than :meth:`FakeKubernetes.compact` kept), and JSON ``Status`` errors.
Every object it receives (a create's body, a patch's result) is validated with
``kubernetes_validate`` in strict mode against the schemas of :data:`SCHEMA_VERSION`;
an invalid one is refused with 422 Invalid, so the fake cannot simply agree with the
runtime. Test controls play the kubelet's part: :meth:`set_phase`, :meth:`set_ready`,
:meth:`assign_ip`, :meth:`terminate`, and faults: :meth:`hold`, :meth:`fail`,
:meth:`set_down` (an API outage: connections refused, open watches broken).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import itertools
import json
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import h11
import httpx2
import kubernetes_validate
import trio

#: The Kubernetes version whose official schemas every received object must satisfy.
SCHEMA_VERSION: Final = "1.36.0"
_KINDS: Final = {"pods": "Pod", "secrets": "Secret"}
_CLOCK_EPOCH: Final = 1_800_000_000.0  # timestamps are trio time from here


class _Broken:
    """Sentinel sent down a watch's channel: the connection breaks (an API outage)."""


@attrs.define(eq=False)
class Hold:
    """A held API call: it has reached the server and waits for :meth:`release`."""

    reached: trio.Event = attrs.Factory(trio.Event)
    released: trio.Event = attrs.Factory(trio.Event)

    def release(self) -> None:
        """Let the call be processed (as if the server got to it now)."""
        self.released.set()


@attrs.define(eq=False)
class _Watcher:
    plural: str
    namespace: str
    selector: Callable[[dict[str, str]], bool]
    send: trio.MemorySendChannel[bytes | _Broken]


class _Stream(httpx2.AsyncByteStream):
    """A response body read from a channel: a watch's stream of JSON lines."""

    def __init__(self, fake: FakeKubernetes, watcher: _Watcher, receive: Any) -> None:
        self._fake = fake
        self._watcher = watcher
        self._receive: trio.MemoryReceiveChannel[bytes | _Broken] = receive

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._receive:
            if isinstance(chunk, _Broken):
                raise httpx2.ReadError("fake API server: connection lost")
            yield chunk

    async def aclose(self) -> None:
        self._fake._unwatch(self._watcher)
        await self._receive.aclose()


class _Transport(httpx2.AsyncBaseTransport):
    def __init__(self, fake: FakeKubernetes) -> None:
        self._fake = fake

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        return await self._fake._handle(request, body)


def _status(code: int, reason: str, message: str, **details: Any) -> httpx2.Response:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return _json(code, status)


def _json(code: int, obj: Any) -> httpx2.Response:
    return httpx2.Response(
        code, headers={"Content-Type": "application/json"}, content=json.dumps(obj).encode()
    )


def parse_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """A label selector's equality-based form (``a=b,c!=d,e``) as a predicate on labels."""
    terms: list[tuple[str, str, str]] = []  # (operator, key, value)
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append(("!=", key, value))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append(("=", key, value))
        elif term.startswith("!"):
            terms.append(("!", term[1:], ""))
        else:
            terms.append(("", term, ""))

    def match(labels: dict[str, str]) -> bool:
        for op, key, value in terms:
            ok = {
                "!=": labels.get(key) != value,
                "=": labels.get(key) == value,
                "!": key not in labels,
                "": key in labels,
            }[op]
            if not ok:
                return False
        return True

    return match


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


@attrs.define(eq=False)
class FakeKubernetes:
    """The fake API server; make one with :func:`open_fake_kubernetes`.

    ``auto_start``: a created pod is scheduled, gets an IP, runs and turns ready by itself
    after ``start_delay`` seconds (as a kubelet would); otherwise tests drive it.
    """

    nursery: trio.Nursery
    auto_start: bool = False
    start_delay: float = 0.1
    #: Objects by (plural, namespace, name), as the server stores them.
    objects: dict[tuple[str, str, str], dict[str, Any]] = attrs.Factory(dict)
    #: The metrics API's figures by (namespace, pod), see :meth:`set_metrics`.
    metrics: dict[tuple[str, str], dict[str, str]] = attrs.Factory(dict)
    #: Every API call except watches, as (method, path, query string), in order.
    calls: list[tuple[str, str, str]] = attrs.Factory(list)
    #: Bodies refused as invalid (422), with the validator's message.
    refused: list[tuple[dict[str, Any], str]] = attrs.Factory(list)
    _rv: int = 0
    _history: list[tuple[int, str, str, str, dict[str, Any]]] = attrs.Factory(list)
    _oldest: int = 0  # a watch from an older resourceVersion gets 410 Gone
    _watchers: list[_Watcher] = attrs.Factory(list)
    _holds: dict[int, Hold] = attrs.Factory(dict)
    _fails: dict[int, int] = attrs.Factory(dict)
    _down: bool = False
    #: The trio time of every request refused during an outage (:meth:`set_down`).
    refused_at: list[float] = attrs.Factory(list)
    _ips: Iterator[int] = attrs.Factory(lambda: itertools.count(2))

    # -- the client side -----------------------------------------------------------

    def transport(self) -> httpx2.AsyncBaseTransport:
        """An httpx2 transport that delivers every request to this fake."""
        return _Transport(self)

    @property
    def watches(self) -> int:
        """How many watches are open (a watch whose client went away no longer counts)."""
        return len(self._watchers)

    # -- test controls -------------------------------------------------------------

    def hold(self, index: int) -> Hold:
        """Hold the ``index``-th API call (0-based, in :attr:`calls` order) until released."""
        self._holds[index] = hold = Hold()
        return hold

    def fail(self, index: int, code: int = 500) -> None:
        """Answer the ``index``-th API call with an error ``code`` instead of processing it."""
        self._fails[index] = code

    def set_down(self, down: bool) -> None:
        """An API outage: new requests are refused, open watches break."""
        self._down = down
        if down:
            for watcher in list(self._watchers):
                self._break(watcher)

    def end_watches(self) -> None:
        """Close every open watch cleanly, as the API server does at a watch's timeout
        (the client watches again from the last resourceVersion it saw)."""
        for watcher in list(self._watchers):
            self._unwatch(watcher)
            watcher.send.close()

    def compact(self) -> None:
        """Forget the event history: a watch from any version seen so far gets 410 Gone."""
        self._history.clear()
        self._oldest = self._rv + 1
        self._rv += 1  # (as if some other object changed) a new list is past the compaction

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The stored pod (a copy), or None."""
        obj = self.objects.get(("pods", namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def names(self, plural: str) -> list[str]:
        """Names of the stored objects of a kind (``pods``, ``secrets``), sorted."""
        return sorted(name for (p, _, name) in self.objects if p == plural)

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object directly (validated), e.g. a gateway replica's own pod."""
        plural = {v: k for k, v in _KINDS.items()}[obj["kind"]]
        namespace = obj["metadata"].get("namespace", "default")
        answer = self._create(plural, namespace, copy.deepcopy(obj))
        if answer.status_code != 201:
            raise ValueError(f"fake API refused {obj['metadata'].get('name')}: {answer.text}")
        return dict(json.loads(answer.content))

    def set_phase(self, name: str, phase: str, namespace: str = "default") -> None:
        """The pod's ``status.phase`` (Pending, Running, Succeeded, Failed)."""
        self._update_status(namespace, name, lambda status: status.update(phase=phase))

    def assign_ip(self, name: str, ip: str | None = None, namespace: str = "default") -> str:
        """Give the pod an IP (the next free 10.0.0.x unless given); return it."""
        ip = ip or f"10.0.0.{next(self._ips)}"
        self._update_status(
            namespace, name, lambda status: status.update(podIP=ip, podIPs=[{"ip": ip}])
        )
        return ip

    def set_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        """The pod's Ready condition and its container's ``ready``."""

        def update(status: dict[str, Any]) -> None:
            flag = "True" if ready else "False"
            conditions = [c for c in status.get("conditions", []) if c["type"] != "Ready"]
            status["conditions"] = [*conditions, {"type": "Ready", "status": flag}]
            for cs in status.get("containerStatuses", []):
                cs["ready"] = ready

        self._update_status(namespace, name, update)

    def terminate(
        self, name: str, exit_code: int, reason: str = "Error", namespace: str = "default"
    ) -> None:
        """The container ended (``reason="OOMKilled"`` for the OOM killer): with
        ``restartPolicy: Never`` the pod goes to Failed (Succeeded on exit code 0)."""

        def update(status: dict[str, Any]) -> None:
            status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            status["conditions"] = [
                c for c in status.get("conditions", []) if c["type"] != "Ready"
            ] + [{"type": "Ready", "status": "False"}]
            for cs in status.get("containerStatuses", []):
                cs["ready"] = False
                cs["state"] = {"terminated": {"exitCode": exit_code, "reason": reason}}

        self._update_status(namespace, name, update)

    async def start_pod(self, name: str, namespace: str = "default") -> None:
        """What a kubelet does for a new pod: Running with an IP, then ready."""
        self.set_phase(name, "Running", namespace)
        self.assign_ip(name, namespace=namespace)
        await trio.sleep(self.start_delay)
        if ("pods", namespace, name) in self.objects:
            self.set_ready(name, True, namespace)

    def set_metrics(self, name: str, *, memory: str, cpu: str, namespace: str = "default") -> None:
        """What the metrics API (metrics-server) reports for a pod's container ``proxy``:
        its working set (``memory``, e.g. ``"20Mi"``) and CPU rate (``cpu``, e.g.
        ``"3m"``). Without any, the fake has no metrics API (404), as a cluster without
        metrics-server."""
        self.metrics[(namespace, name)] = {"memory": memory, "cpu": cpu}

    def _metrics(self, parts: list[str], query: dict[str, str]) -> httpx2.Response:
        # /apis/metrics.k8s.io/v1beta1/namespaces/<ns>/pods
        if not self.metrics or len(parts) != 6 or parts[3] != "namespaces" or parts[5] != "pods":
            return _status(404, "NotFound", "the server could not find the requested resource")
        namespace = parts[4]
        selector = parse_selector(query.get("labelSelector", ""))
        items = []
        for (ns, name), usage in sorted(self.metrics.items()):
            pod = self.objects.get(("pods", ns, name))
            if ns != namespace or pod is None or not selector(pod["metadata"].get("labels", {})):
                continue
            items.append(
                {
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "labels": pod["metadata"]["labels"],
                    },
                    "timestamp": self._timestamp(),
                    "window": "10s",
                    "containers": [{"name": "proxy", "usage": dict(usage)}],
                }
            )
        return _json(
            200,
            {
                "kind": "PodMetricsList",
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {},
                "items": items,
            },
        )

    def force_delete(self, plural: str, name: str, namespace: str = "default") -> None:
        """Remove an object at once (grace 0), e.g. a replica's pod whose node died."""
        self._remove(plural, namespace, name)

    # -- request handling ----------------------------------------------------------

    async def _handle(self, request: httpx2.Request, body: bytes) -> httpx2.Response:
        if self._down:
            self.refused_at.append(trio.current_time())
            raise httpx2.ConnectError("fake API server: connection refused", request=request)
        path = request.url.path
        query = dict(request.url.params)
        parts = path.strip("/").split("/")
        if parts[:3] == ["apis", "metrics.k8s.io", "v1beta1"]:
            return self._metrics(parts, query)
        # /api/v1/namespaces/<ns>/<plural>[/<name>]
        if len(parts) not in (5, 6) or parts[:3] != ["api", "v1", "namespaces"]:
            return _status(404, "NotFound", f"the server could not find {path}")
        namespace, plural = parts[3], parts[4]
        name = parts[5] if len(parts) == 6 else None
        if plural not in _KINDS:
            return _status(404, "NotFound", f"the server doesn't have a resource type {plural}")
        method = request.method
        if method == "GET" and name is None and query.get("watch") in ("true", "1"):
            return self._watch(plural, namespace, query)
        index = len(self.calls)
        self.calls.append((method, path, request.url.query.decode()))
        hold = self._holds.pop(index, None)
        if hold is not None:
            hold.reached.set()
            await hold.released.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self._down:
            raise httpx2.ReadError("fake API server: connection lost", request=request)
        code = self._fails.pop(index, None)
        if code is not None:
            return _status(code, "InternalError", f"injected failure of call {index}")
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return _status(400, "BadRequest", "the body is not JSON")
        if name is None:
            if method == "GET":
                return self._list(plural, namespace, query)
            if method == "POST":
                if not isinstance(data, dict):
                    return _status(400, "BadRequest", "the body is not an object")
                return self._create(plural, namespace, data)
        else:
            if method == "GET":
                obj = self.objects.get((plural, namespace, name))
                if obj is None:
                    return self._not_found(plural, name)
                return _json(200, obj)
            if method == "PATCH":
                return self._patch(plural, namespace, name, data, request)
            if method == "DELETE":
                return self._delete(plural, namespace, name, query, data)
        return _status(405, "MethodNotAllowed", f"{method} {path} is not supported")

    def _not_found(self, plural: str, name: str) -> httpx2.Response:
        return _status(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)

    def _validate(self, obj: dict[str, Any]) -> str | None:
        try:
            kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            message = str(exc).splitlines()[0]
            self.refused.append((copy.deepcopy(obj), message))
            return message
        return None

    def _create(self, plural: str, namespace: str, obj: dict[str, Any]) -> httpx2.Response:
        kind = _KINDS[plural]
        if obj.get("kind") != kind or obj.get("apiVersion") != "v1":
            return _status(400, "BadRequest", f"expected a v1 {kind}")
        message = self._validate(obj)
        if message is not None:
            return _status(422, "Invalid", f"{kind} is invalid: {message}", kind=plural)
        meta = obj["metadata"]
        name = meta.get("name")
        if not name:
            return _status(422, "Invalid", f"{kind}: metadata.name: Required value")
        if meta.get("namespace", namespace) != namespace:
            return _status(400, "BadRequest", "the namespace of the object does not match")
        if (plural, namespace, name) in self.objects:
            return _status(
                409, "AlreadyExists", f'{plural} "{name}" already exists', name=name, kind=plural
            )
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=self._timestamp(),
        )
        if kind == "Pod":
            obj["status"] = {
                "phase": "Pending",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": "ContainerCreating"}},
                    }
                    for c in obj["spec"]["containers"]
                ],
            }
        self._store(plural, namespace, obj, "ADDED")
        # Owners that are already gone: the garbage collector deletes the new object.
        self.nursery.start_soon(self._collect_garbage)
        if kind == "Pod" and self.auto_start:
            self.nursery.start_soon(self.start_pod, name, namespace)
        return _json(201, obj)

    def _patch(
        self,
        plural: str,
        namespace: str,
        name: str,
        data: Any,
        request: httpx2.Request,
    ) -> httpx2.Response:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return self._not_found(plural, name)
        content_type = request.headers.get("content-type", "")
        if content_type not in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            return _status(415, "UnsupportedMediaType", f"patch type {content_type!r}")
        if not isinstance(data, dict):
            return _status(400, "BadRequest", "the patch is not an object")
        result = _merge_patch(obj, data)
        received = {k: v for k, v in result.items() if k != "status"}
        message = self._validate(received)
        if message is not None:
            return _status(422, "Invalid", f"{_KINDS[plural]} is invalid: {message}")
        for key in ("uid", "name", "namespace", "creationTimestamp"):
            result["metadata"][key] = obj["metadata"][key]
        self._store(plural, namespace, result, "MODIFIED")
        self.nursery.start_soon(self._collect_garbage)
        return _json(200, result)

    def _delete(
        self, plural: str, namespace: str, name: str, query: dict[str, str], data: Any
    ) -> httpx2.Response:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return self._not_found(plural, name)
        options = data if isinstance(data, dict) else {}
        grace = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        self._begin_delete(plural, namespace, name, None if grace is None else int(grace))
        current = self.objects.get((plural, namespace, name))
        return _json(200, current if current is not None else obj)

    def _begin_delete(self, plural: str, namespace: str, name: str, grace: int | None) -> None:
        obj = self.objects[(plural, namespace, name)]
        if plural != "pods":
            self._remove(plural, namespace, name)
            return
        if grace is None:
            grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
        if obj["metadata"].get("deletionTimestamp"):
            return  # already terminating: the first grace period stands
        if grace <= 0:
            self._remove(plural, namespace, name)
            return
        updated = copy.deepcopy(obj)
        updated["metadata"]["deletionTimestamp"] = self._timestamp()
        updated["metadata"]["deletionGracePeriodSeconds"] = grace
        self._store(plural, namespace, updated, "MODIFIED")
        uid = obj["metadata"]["uid"]
        self.nursery.start_soon(self._finish_delete, plural, namespace, name, uid, grace)

    async def _finish_delete(
        self, plural: str, namespace: str, name: str, uid: str, grace: int
    ) -> None:
        await trio.sleep(grace)
        obj = self.objects.get((plural, namespace, name))
        if obj is not None and obj["metadata"]["uid"] == uid:
            self._remove(plural, namespace, name)

    def _remove(self, plural: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((plural, namespace, name), None)
        if obj is None:
            return
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._emit(plural, namespace, "DELETED", obj)
        self.nursery.start_soon(self._collect_garbage)

    async def _collect_garbage(self) -> None:
        # The garbage collector: an object whose owners are all gone is deleted (in the
        # background, as Kubernetes' default propagation does).
        await trio.lowlevel.checkpoint()
        uids = {obj["metadata"]["uid"] for obj in self.objects.values()}
        for (plural, namespace, name), obj in list(self.objects.items()):
            owners = obj["metadata"].get("ownerReferences") or []
            orphan = owners and not any(o["uid"] in uids for o in owners)
            if orphan and (plural, namespace, name) in self.objects:
                self._begin_delete(plural, namespace, name, None)

    def _update_status(self, namespace: str, name: str, update: Callable[[Any], None]) -> None:
        obj = self.objects.get(("pods", namespace, name))
        if obj is None:
            raise KeyError(f"no pod {namespace}/{name}")
        obj = copy.deepcopy(obj)
        update(obj["status"])
        self._store("pods", namespace, obj, "MODIFIED")

    def _store(self, plural: str, namespace: str, obj: dict[str, Any], event: str) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self.objects[(plural, namespace, obj["metadata"]["name"])] = obj
        self._emit(plural, namespace, event, copy.deepcopy(obj))

    def _emit(self, plural: str, namespace: str, event: str, obj: dict[str, Any]) -> None:
        self._history.append((self._rv, plural, namespace, event, obj))
        line = json.dumps({"type": event, "object": obj}).encode() + b"\n"
        labels = obj["metadata"].get("labels") or {}
        for watcher in list(self._watchers):
            if (watcher.plural, watcher.namespace) == (plural, namespace) and watcher.selector(
                labels
            ):
                try:
                    watcher.send.send_nowait(line)
                except trio.WouldBlock:
                    self._break(watcher)  # the API server drops watchers that fall behind

    def _break(self, watcher: _Watcher) -> None:
        self._unwatch(watcher)
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            watcher.send.send_nowait(_Broken())
        watcher.send.close()

    def _unwatch(self, watcher: _Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def _timestamp(self) -> str:
        seconds = _CLOCK_EPOCH + trio.current_time()
        when = datetime.datetime.fromtimestamp(math.floor(seconds), tz=datetime.UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _matching(self, plural: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        match = parse_selector(selector)
        return [
            obj
            for (p, ns, _), obj in sorted(self.objects.items())
            if (p, ns) == (plural, namespace) and match(obj["metadata"].get("labels") or {})
        ]

    def _list(self, plural: str, namespace: str, query: dict[str, str]) -> httpx2.Response:
        items = self._matching(plural, namespace, query.get("labelSelector", ""))
        return _json(
            200,
            {
                "kind": _KINDS[plural] + "List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            },
        )

    def _watch(self, plural: str, namespace: str, query: dict[str, str]) -> httpx2.Response:
        selector = query.get("labelSelector", "")
        send, receive = trio.open_memory_channel[bytes | _Broken](1000)
        watcher = _Watcher(plural, namespace, parse_selector(selector), send)
        version = query.get("resourceVersion")
        if version not in (None, "", "0") and int(version) < self._oldest:
            gone = {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": f"too old resource version: {version} ({self._oldest})",
                    "reason": "Expired",
                    "code": 410,
                },
            }
            send.send_nowait(json.dumps(gone).encode() + b"\n")
            send.close()
            return httpx2.Response(
                200,
                headers={"Content-Type": "application/json"},
                stream=_Stream(self, watcher, receive),
            )
        if version in (None, "", "0"):
            backlog = [
                {"type": "ADDED", "object": obj}
                for obj in self._matching(plural, namespace, selector)
            ]
        else:
            backlog = [
                {"type": event, "object": obj}
                for rv, p, ns, event, obj in self._history
                if rv > int(version)
                and (p, ns) == (plural, namespace)
                and watcher.selector(obj["metadata"].get("labels") or {})
            ]
        for event in backlog:
            send.send_nowait(json.dumps(event).encode() + b"\n")
        self._watchers.append(watcher)
        return httpx2.Response(
            200,
            headers={"Content-Type": "application/json"},
            stream=_Stream(self, watcher, receive),
        )


@asynccontextmanager
async def open_fake_kubernetes(
    *, auto_start: bool = False, start_delay: float = 0.1
) -> AsyncIterator[FakeKubernetes]:
    """A :class:`FakeKubernetes` whose background work (grace periods, garbage collection,
    simulated kubelet) runs in a nursery of its own for the block."""
    async with trio.open_nursery() as nursery:
        fake = FakeKubernetes(nursery, auto_start=auto_start, start_delay=start_delay)
        try:
            yield fake
        finally:
            for watcher in list(fake._watchers):
                fake._break(watcher)
            nursery.cancel_scope.cancel()


# -- over real HTTP ----------------------------------------------------------------------


async def serve_fake_kubernetes_http(
    fake: FakeKubernetes,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` over HTTP/1.1 on ``host``:``port`` (0: a free port) until cancelled,
    so that clients in other processes (gateway replicas) share it; ``task_status.started``
    gets the base URL (``http://127.0.0.1:PORT``, for :func:`write_kubeconfig`).

    Every request goes to the same handler as :meth:`FakeKubernetes.transport`'s, so the
    fake's objects, holds, failures and kubelet controls behave the same. A watch's body is
    sent chunk by chunk as the fake emits its events (chunked transfer encoding) and ends
    only when the fake ends it; when its client disconnects, the watch is released in the
    fake (:attr:`FakeKubernetes.watches`). During an outage (:meth:`FakeKubernetes.set_down`)
    every request's connection is closed without an answer, and an open watch's connection
    is dropped mid-body. With ``token``, a request without ``Authorization: Bearer <token>``
    is answered 401.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    task_status.started(url)
    await trio.serve_listeners(functools.partial(_serve_connection, fake, url, token), listeners)


async def _serve_connection(
    fake: FakeKubernetes, base: str, token: str | None, stream: trio.SocketStream
) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            received = await _receive_request(conn, stream)
            if received is None:
                return
            if not await _exchange(fake, base, token, conn, stream, *received):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # h11 says the connection must close (Connection: close, HTTP/1.0)
            conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        return  # the client went away, or spoke something other than HTTP/1.1
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _receive_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body; None if the client closed the connection first."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _exchange(
    fake: FakeKubernetes,
    base: str,
    token: str | None,
    conn: h11.Connection,
    stream: trio.SocketStream,
    event: h11.Request,
    body: bytes,
) -> bool:
    """Answer one request; False if the connection must be dropped (the client went away,
    the fake is down or broke a watch)."""
    request = httpx2.Request(
        event.method.decode("ascii"),
        base + event.target.decode("ascii"),
        headers=list(event.headers),
        content=body,
    )
    client_gone = complete = False
    async with trio.open_nursery() as nursery:

        async def until_client_goes() -> None:
            # The client sends nothing while it waits for an answer (httpx does not
            # pipeline), so the end of its stream means it is gone: a watch it left must
            # not stay open in the fake, so the answer is cancelled and its body closed.
            nonlocal client_gone
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some():
                    conn.receive_data(data)  # kept by h11 for the next request
            client_gone = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(until_client_goes)
        if token is not None and request.headers.get("authorization") != f"Bearer {token}":
            response = _status(401, "Unauthorized", "Unauthorized")
        else:
            try:
                response = await fake._handle(request, body)
            except httpx2.TransportError:
                nursery.cancel_scope.cancel()
                return False  # the fake is down: no answer, the connection closes
        try:
            complete = await _send_response(conn, stream, response)
        finally:
            with trio.CancelScope(shield=True):
                # A watch's unwatches it in the fake. httpx2 closes a response whose body
                # iteration ends (even cancelled); this covers the body never iterated.
                await response.aclose()
        nursery.cancel_scope.cancel()
    return complete and not client_gone


async def _send_response(
    conn: h11.Connection, stream: trio.SocketStream, response: httpx2.Response
) -> bool:
    """Send ``response``, its body as the fake produces it; False if the fake broke it."""
    # h11 frames the body itself: Content-Length when the fake gave one, else chunked.
    headers = [
        (name, value)
        for name, value in response.headers.raw
        if name.lower() not in (b"transfer-encoding", b"connection")
    ]
    await stream.send_all(
        conn.send(h11.Response(status_code=response.status_code, headers=headers))
    )
    try:
        async for chunk in response.aiter_bytes():
            await stream.send_all(conn.send(h11.Data(data=chunk)))
    except httpx2.TransportError:
        return False  # a broken watch (an outage, a watcher fallen behind): drop it
    await stream.send_all(conn.send(h11.EndOfMessage()))
    return True


def write_kubeconfig(
    path: str | os.PathLike[str],
    server_url: str,
    namespace: str = "default",
    token: str = "test",
) -> None:
    """Write a KUBECONFIG at ``path`` for ``server_url`` (see
    :func:`serve_fake_kubernetes_http`): one context, current, whose user has a static
    bearer ``token`` (no exec plugin). JSON, which is YAML too."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
        ],
        "preferences": {},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
