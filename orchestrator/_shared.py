"""State that every gateway replica needs (DESIGN.md section 6).

One gateway on one host keeps its keys in files (0600, under the user's configuration
directory) and its users' tunnel registrations in memory: :class:`LocalState`. Several
replicas on Kubernetes must share them, or a user's tunnel registered through one replica
would be unknown to the next, and each replica would sign with a key of its own: so there
they live in Secrets of the namespace (:class:`KubernetesState`):

- a key (the audit trail's HMAC key, the ``c2l-direct`` signing key) is the Secret
  ``c2l-key-<name>``, made by whichever replica asks first; a replica that loses the race
  (409) reads the winner's, so all replicas end up with the same bytes;
- a record (a tunnel registration) is the Secret ``c2l-<kind>-<key>`` labelled
  ``cloudtolocalllm.state=<kind>`` with its expiry in an annotation; an expired record
  reads as missing and is deleted by whoever reads it.

Secrets, not ConfigMaps: a registration names a user's desktop URL, which is theirs; the
gateway's Role reads and writes Secrets of its namespace anyway.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from ._errors import ObjectNotFound, RuntimeObjectError
from ._kubernetes import KubernetesRuntime, _model
from ._runtime import LABEL_PROXY

#: The label that marks a Secret as shared gateway state, with its kind as the value.
LABEL_STATE: Final = "cloudtolocalllm.state"
#: The annotation holding a record's expiry (seconds since the epoch).
EXPIRES_ANNOTATION: Final = "cloudtolocalllm.io/expires"
_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SharedState(Protocol):
    """Keys and expiring records shared by every replica of a deployment."""

    async def key(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The bytes kept as ``name``; ``make()`` gives them if nobody has yet."""
        ...

    async def put(self, kind: str, key: str, record: dict[str, Any], expires_at: float) -> None:
        """Keep ``record`` as ``kind``/``key`` until ``expires_at`` (epoch seconds)."""
        ...

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The live record ``kind``/``key``, or None (missing or expired)."""
        ...

    async def delete(self, kind: str, key: str) -> bool:
        """Forget ``kind``/``key``; whether there was a live one."""
        ...


def _check_name(*parts: str) -> str:
    name = "-".join(parts)
    if len(name) > 63 or not _NAME.match(name):
        raise ValueError(f"{name!r} is not a DNS-1123 label of at most 63 characters")
    return name


@attrs.define
class LocalState:
    """One replica's state: keys in 0600 files under ``directory``, records in memory."""

    directory: Path | None = None
    _records: dict[tuple[str, str], tuple[dict[str, Any], float]] = attrs.field(factory=dict)

    async def key(self, name: str, make: Callable[[], bytes]) -> bytes:
        if self.directory is None:
            raise ValueError("this LocalState keeps records only (no directory for keys)")
        path = self.directory / _check_name(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = make()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return data

    async def put(self, kind: str, key: str, record: dict[str, Any], expires_at: float) -> None:
        self._records[(kind, key)] = (dict(record), expires_at)

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        found = self._records.get((kind, key))
        if found is None:
            return None
        if found[1] <= time.time():
            del self._records[(kind, key)]
            return None
        return dict(found[0])

    async def delete(self, kind: str, key: str) -> bool:
        live = await self.get(kind, key) is not None  # (an expired one is dropped there)
        self._records.pop((kind, key), None)
        return live


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@attrs.define
class KubernetesState:
    """The deployment's state in Secrets of the runtime's namespace (module docstring)."""

    runtime: KubernetesRuntime

    def _secret(
        self, name: str, data: dict[str, str], labels: dict[str, str], expires: float | None
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": name,
            "namespace": self.runtime.namespace,
            "labels": {LABEL_PROXY: "false", **labels},
        }
        if expires is not None:
            meta["annotations"] = {EXPIRES_ANNOTATION: f"{expires:.3f}"}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "data": data,
        }

    async def _read(self, name: str) -> dict[str, Any] | None:
        rt = self.runtime
        try:
            with rt._translating(f"read secret {name}", "secret", name):
                obj: dict[str, Any] = (
                    await rt.client.get(Secret, name, namespace=rt.namespace)
                ).to_dict()
        except ObjectNotFound:
            return None
        return obj

    async def _create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when it exists already (409)."""
        rt, name = self.runtime, obj["metadata"]["name"]
        try:
            with rt._translating(f"create secret {name}", "secret", name):
                await rt.client.create(_model(Secret, obj))
        except RuntimeObjectError as exc:
            if exc.status != 409:
                raise
            return False
        return True

    async def key(self, name: str, make: Callable[[], bytes]) -> bytes:
        sname = _check_name("c2l-key", name)
        for _ in range(3):  # read; make; if another replica made it meanwhile, read theirs
            obj = await self._read(sname)
            if obj is not None:
                try:
                    return base64.b64decode(obj["data"]["value"], validate=True)
                except (KeyError, TypeError, ValueError):
                    raise RuntimeObjectError(
                        f"secret {sname} holds no readable 'value'", kind="secret", name=sname
                    ) from None
            data = make()
            if await self._create(
                self._secret(sname, {"value": _b64(data)}, {LABEL_STATE: "key"}, None)
            ):
                return data
        raise RuntimeObjectError(f"secret {sname} keeps vanishing", kind="secret", name=sname)

    async def put(self, kind: str, key: str, record: dict[str, Any], expires_at: float) -> None:
        rt, sname = self.runtime, _check_name("c2l", kind, key)
        data = {"record": _b64(json.dumps(record).encode())}
        obj = self._secret(sname, data, {LABEL_STATE: _check_name(kind)}, expires_at)
        if await self._create(obj):
            return
        patch = {"metadata": {"annotations": obj["metadata"]["annotations"]}, "data": data}
        with rt._translating(f"update secret {sname}", "secret", sname):
            await rt.client.patch(
                Secret, sname, patch, namespace=rt.namespace, patch_type=PatchType.MERGE
            )

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        sname = _check_name("c2l", kind, key)
        obj = await self._read(sname)
        if obj is None:
            return None
        try:
            expires = float(obj["metadata"]["annotations"][EXPIRES_ANNOTATION])
            record = json.loads(base64.b64decode(obj["data"]["record"], validate=True))
        except (KeyError, TypeError, ValueError):
            record, expires = None, 0.0  # unreadable: as good as expired
        if expires <= time.time() or not isinstance(record, dict):
            await self.runtime._delete(Secret, sname, None)
            return None
        return record

    async def delete(self, kind: str, key: str) -> bool:
        live = await self.get(kind, key) is not None
        await self.runtime._delete(Secret, _check_name("c2l", kind, key), None)
        return live
