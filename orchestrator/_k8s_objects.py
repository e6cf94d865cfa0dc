"""The Kubernetes objects of one session: its Pod and its Secret (DESIGN.md section 6).

Minimal stand-in written alongside the runtime (:mod:`._kubernetes`); the full builders
(deployment manifests, the project's own checks) replace this module when merged. Only the
names below are relied on by the runtime.
"""

from __future__ import annotations

import base64
from typing import Any, Final

import wire

from ._runtime import object_labels, pod_name

#: The key of the session secret in its Secret's ``data``.
SECRET_KEY: Final = "secret"


def secret_name(user_hash: str) -> str:
    """``c2l-secret-<userhash>``."""
    return f"c2l-secret-{user_hash}"


def session_pod(
    *,
    user_hash: str,
    session_id: str,
    replica: str,
    image: str,
    namespace: str,
    secret_name: str,
    memory: int,
    cpus: float,
    request_memory: str = "64Mi",
    request_cpu: str = "50m",
    tmp_size: int = 16 * 1024**2,
    owner: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The hardened proxy Pod of one session, as a Kubernetes object."""
    metadata: dict[str, Any] = {
        "name": pod_name(user_hash),
        "namespace": namespace,
        "labels": object_labels(user_hash, session_id, replica),
    }
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 2,
            "securityContext": {
                "runAsUser": 1001,
                "runAsGroup": 1001,
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "proxy",
                    "image": image,
                    "env": [
                        {
                            "name": wire.SECRET_ENV,
                            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": SECRET_KEY}},
                        },
                        {"name": "C2L_SESSION_ID", "value": session_id},
                        {"name": "C2L_USER_HASH", "value": user_hash},
                        {"name": "C2L_PROXY_MEMORY", "value": str(memory)},
                    ],
                    "ports": [{"name": "proxy", "containerPort": wire.PROXY_PORT}],
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": wire.PROXY_PORT},
                        "periodSeconds": 2,
                    },
                    "resources": {
                        "limits": {"memory": str(memory), "cpu": f"{round(cpus * 1000)}m"},
                        "requests": {"memory": request_memory, "cpu": request_cpu},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [
                {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(tmp_size)}}
            ],
        },
    }


def session_secret(
    *, user_hash: str, session_id: str, replica: str, namespace: str, secret: str
) -> dict[str, Any]:
    """The Secret that holds one session's secret (owned by its Pod once that exists)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(user_hash),
            "namespace": namespace,
            "labels": object_labels(user_hash, session_id, replica),
        },
        "data": {SECRET_KEY: base64.b64encode(secret.encode()).decode("ascii")},
    }
