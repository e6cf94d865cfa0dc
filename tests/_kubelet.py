"""A fake Kubernetes API whose "kubelet" runs each session pod's real proxy.

The fake API server (``orchestrator.testing.FakeKubernetes``) simulates a kubelet that only
flips a pod's status. Here every new session pod gets a real proxy (``proxy.serve_proxy``,
in-process) listening on the pod's IP and the proxy port, a loopback address of its own
(127.0.1.N:8080), with the session secret read from the pod's Secret as the kubelet would
put it in the container's environment; deleting the pod stops it. So gateways (in-process
or separate processes) dial real proxies by pod IP, as in a cluster.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

import wire
from orchestrator import LABEL_PROXY
from orchestrator._k8s_objects import SECRET_KEY
from orchestrator.testing import FakeKubernetes
from proxy import serve_proxy

_hosts = itertools.count(1)


@attrs.define(eq=False)
class KubeletFake(FakeKubernetes):
    """:class:`FakeKubernetes` whose pods run real proxies on 127.0.1.N:8080."""

    proxies: dict[str, trio.CancelScope] = attrs.Factory(dict)

    async def start_pod(self, name: str, namespace: str = "default") -> None:
        pod = self.objects.get(("pods", namespace, name))
        if pod is None:
            return
        if pod["metadata"].get("labels", {}).get(LABEL_PROXY) != "true":
            await super().start_pod(name, namespace)  # not a session's (a gateway replica's)
            return
        env = {e["name"]: e for e in pod["spec"]["containers"][0].get("env", [])}
        ref = env[wire.SECRET_ENV]["valueFrom"]["secretKeyRef"]
        secret_obj = self.objects[("secrets", namespace, ref["name"])]
        secret = base64.b64decode(secret_obj["data"][ref.get("key", SECRET_KEY)]).decode()
        n = next(_hosts)
        ip = f"127.0.1.{n}"
        self.set_phase(name, "Running", namespace)
        scope = trio.CancelScope()
        self.proxies[name] = scope

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_proxy(ip, wire.PROXY_PORT, secret=secret, task_status=task_status)

        await self.nursery.start(run)
        self.assign_ip(name, ip, namespace)
        if ("pods", namespace, name) in self.objects:
            self.set_ready(name, True, namespace)

    def _remove(self, plural: str, namespace: str, name: str) -> None:
        if plural == "pods":
            scope = self.proxies.pop(name, None)
            if scope is not None:
                scope.cancel()
        super()._remove(plural, namespace, name)


@asynccontextmanager
async def open_kubelet_fake(**kw: Any) -> AsyncIterator[KubeletFake]:
    """A :class:`KubeletFake` (``auto_start``) running for the block."""
    async with trio.open_nursery() as nursery:
        fake = KubeletFake(nursery, auto_start=True, **kw)
        try:
            yield fake
        finally:
            for watcher in list(fake._watchers):
                fake._break(watcher)
            nursery.cancel_scope.cancel()
