"""The Kubernetes objects of a deployment, as plain data (DESIGN.md section 6).

Pure functions, no I/O: the Kubernetes runtime sends what :func:`session_pod` and
:func:`session_secret` build, and ``c2l k8s manifests`` prints what
:func:`deployment_manifests` builds, so the shipped manifests and the session pods the
runtime makes come from one place (the NetworkPolicy's selectors are built from the same
labels as the pods they select).

A session's Pod is hardened as the Podman container is (``orchestrator._podman``): uid and
gid 1001, read-only root filesystem, every capability dropped, no privilege escalation, the
runtime's default seccomp profile, cgroup limits from ``C2L_PROXY_MEMORY``/``C2L_PROXY_CPUS``
with small requests (so that 1000 sessions schedule), a memory-backed ``/tmp`` with a size
limit, no service-account token, no service links, never restarted. It differs from Podman
where Kubernetes works otherwise: the proxy listens on TCP ``wire.PROXY_PORT`` (gateways
reach it by pod IP; the NetworkPolicy admits only them), and its session secret comes from a
Secret (``valueFrom.secretKeyRef``), never from the Pod's own spec.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Final

import wire
from c2lcore import DEFAULT_IMAGE

from ._runtime import LABEL_PROXY, object_labels, pod_name

#: The key, in a session's Secret, holding the session secret.
SECRET_KEY: Final = "secret"
#: The name of the proxy's only container.
PROXY_CONTAINER: Final = "proxy"
#: uid and gid of every process of ours, as on Podman (``ProxySpec.user``).
RUN_AS: Final = 1001
#: The gateway's container image; there is no registry of the project's: push the image to
#: yours and pass ``--image`` (and ``--proxy-image`` for the proxy's).
DEFAULT_GATEWAY_IMAGE: Final = "localhost/c2l-gateway:latest"
DEFAULT_NAMESPACE: Final = "cloudtolocalllm"
#: The port the gateway serves HTTP and WebSocket on, in its container and in its Service.
GATEWAY_PORT: Final = 8080
#: Names of the deployment's own objects.
GATEWAY: Final = "c2l-gateway"
GATEWAY_CONFIG: Final = "c2l-gateway-config"
#: Labels of the gateway's pods (and the Deployment's selector). Session pods carry none
#: of them, and gateway pods none of ``LABEL_PROXY``: the NetworkPolicies tell them apart.
GATEWAY_LABELS: Final[dict[str, str]] = {
    "app.kubernetes.io/name": "cloudtolocalllm",
    "app.kubernetes.io/component": "gateway",
}
#: What the runtime does in its namespace, and nothing cluster-wide (Role ``c2l-gateway``).
#: Kept as data so that a fake API server can refuse whatever a runtime does beyond it.
RUNTIME_RULES: Final[list[dict[str, Any]]] = [
    # Session pods: create (create-or-adopt by the deterministic name; 409 = adopt), get
    # (the adopted pod), list + watch (the routing table, readiness and deaths of every
    # replica's pods, and the sweep of this replica's own at start), delete (teardown, the
    # sweep). No update/patch: a session pod is never changed, only replaced. No exec, no
    # logs, no pods/status.
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    # Session secrets, the shared keys and the tunnel registrations (orchestrator._shared):
    # create (a session's secret, before its Pod; the audit key and the c2l-direct signing
    # key, made by whichever replica comes first, 409 = read the other's; a registration),
    # get (a pod adopted from another replica: its secret is needed to dial it; the shared
    # keys; a user's registration, by name), patch (the session secret's ownerReference to
    # its Pod once the Pod exists, so the garbage collector removes both; a renewed
    # registration's expiry and content), delete (teardown; an expired or removed
    # registration). No list/watch: no replica needs every secret at once. A registration
    # names a user's desktop URL, which is theirs: a Secret, not a ConfigMap.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch", "delete"]},
    # Memory and CPU of each session for the admin API, where the cluster runs the metrics
    # API (metrics-server); read-only, and unused where it does not exist.
    {"apiGroups": ["metrics.k8s.io"], "resources": ["pods"], "verbs": ["get", "list"]},
]

#: DNS-1123 label (names of pods, services, ...: at most 63 characters).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: A label value: at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def secret_name(user_hash: str) -> str:
    """``c2l-secret-<userhash>``: the Secret holding a session's secret."""
    return f"c2l-secret-{user_hash}"


def memory_quantity(memory: int) -> str:
    """``memory`` bytes as a Kubernetes quantity: ``"512Mi"``, or plain bytes when uneven."""
    if memory <= 0:
        raise ValueError(f"memory must be a number of bytes above 0, not {memory}")
    for suffix, size in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if memory % size == 0:
            return f"{memory // size}{suffix}"
    return str(memory)


def cpu_quantity(cpus: float) -> str:
    """``cpus`` cores as a Kubernetes quantity in millicores: 0.5 is ``"500m"``."""
    milli = round(cpus * 1000)
    if milli <= 0:
        raise ValueError(f"cpus must be at least 0.001 of a core, not {cpus}")
    return f"{milli}m"


def check_name(name: str) -> str:
    """``name``, if it is a DNS-1123 label (what a pod's or a service's name must be)."""
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a Kubernetes object name: at most 63 of a-z, 0-9 and '-',"
            " starting and ending with a letter or digit"
        )
    return name


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """``labels``, if every value is a valid label value (the API server refuses others)."""
    for key, value in labels.items():
        if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            raise ValueError(
                f"label {key}={value!r} is not a Kubernetes label value: at most 63 of"
                " A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit"
            )
    return labels


def owner_reference(owner: dict[str, str]) -> dict[str, Any]:
    """An ownerReference to the Pod ``owner`` (``{"name": ..., "uid": ...}``).

    ``controller: true``: the replica is the only thing that manages the object (creates,
    adopts, deletes it), and ``kubectl drain`` then treats a session pod as managed instead
    of refusing it without ``--force``. ``blockOwnerDeletion: false``: deleting a gateway
    pod, even in the foreground, must not wait for its sessions, and setting it true would
    need the right to update ``pods/finalizers`` on the owner, which the Role does not give.
    """
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": owner["name"],
        "uid": owner["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


def _hardened_container_context() -> dict[str, Any]:
    return {
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _hardened_pod_context() -> dict[str, Any]:
    return {
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


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
    resume_window: float = 30.0,
) -> dict[str, Any]:
    """The Pod ``c2l-pod-<userhash>`` of one session (DESIGN.md section 6).

    Labels as on Podman plus ``cloudtolocalllm.replica``; ``owner`` (the replica's own Pod,
    ``{"name", "uid"}``) becomes its ownerReference, so that the garbage collector removes
    the sessions of a replica that is gone. The proxy reads its secret from the Secret
    ``secret_name`` (key :data:`SECRET_KEY`), which may be created after the Pod: the
    kubelet holds the container until it exists. Raises ValueError for a name or label value
    the API server would refuse (a session id must start and end with a letter or digit).
    """
    labels = check_labels(object_labels(user_hash, session_id, replica))
    metadata: dict[str, Any] = {
        "name": check_name(pod_name(user_hash)),
        "namespace": namespace,
        "labels": labels,
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner_reference(owner)]
    port = wire.PROXY_PORT
    env: list[dict[str, Any]] = [
        {
            "name": wire.SECRET_ENV,
            "valueFrom": {"secretKeyRef": {"name": check_name(secret_name), "key": SECRET_KEY}},
        },
        {"name": "C2L_SESSION_ID", "value": session_id},
        {"name": "C2L_USER_HASH", "value": user_hash},
        # The proxy holds its own address space to this (as on Podman; an rlimit holds
        # wherever the cgroup limit does not).
        {"name": "C2L_PROXY_MEMORY", "value": str(memory)},
        # How long the proxy keeps a dropped client's answers for a resume.
        {"name": "C2L_RESUME_WINDOW", "value": f"{resume_window:g}"},
        # No C2L_PROXY_SOCKET: the proxy listens on TCP, on the pod's own IP.
        {"name": "C2L_PROXY_HOST", "value": "0.0.0.0"},
        {"name": "C2L_PROXY_PORT", "value": str(port)},
    ]
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "proxy", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "resources": {
            "limits": {"memory": memory_quantity(memory), "cpu": cpu_quantity(cpus)},
            "requests": {"memory": request_memory, "cpu": request_cpu},
        },
        # /health needs no secret and carries no user data (proxy/_server.py).
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": port, "scheme": "HTTP"},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "securityContext": _hardened_container_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [container],
            "volumes": [
                {
                    "name": "tmp",
                    "emptyDir": {"medium": "Memory", "sizeLimit": memory_quantity(tmp_size)},
                }
            ],
            "restartPolicy": "Never",
            # As Podman's stop timeout: the proxy stops at once on SIGTERM anyway.
            "terminationGracePeriodSeconds": 2,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _hardened_pod_context(),
        },
    }


def session_secret(
    *, user_hash: str, session_id: str, replica: str, namespace: str, secret: str
) -> dict[str, Any]:
    """The Secret holding one session's secret, labelled as its Pod.

    It has no ownerReference: the owner is the session's Pod, whose uid exists only once
    the Pod is created, so the runtime creates the Pod first and then this Secret with
    ``metadata.ownerReferences = [owner_reference({"name": pod, "uid": uid})]``.
    Immutable: it never changes, and the kubelet need not watch it.
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": check_name(secret_name(user_hash)),
            "namespace": namespace,
            "labels": check_labels(object_labels(user_hash, session_id, replica)),
        },
        "type": "Opaque",
        "immutable": True,
        "data": {SECRET_KEY: base64.b64encode(secret.encode()).decode("ascii")},
    }


def _meta(name: str, namespace: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": "cloudtolocalllm",
            "app.kubernetes.io/component": component,
        },
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _gateway_deployment(
    namespace: str, image: str, proxy_image: str, replicas: int
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "C2L_RUNTIME", "value": "kubernetes"},
        _field_env("C2L_K8S_NAMESPACE", "metadata.namespace"),
        # The replica's id is its pod's name; its uid makes the session pods' owner.
        _field_env("C2L_REPLICA_ID", "metadata.name"),
        _field_env("C2L_REPLICA_UID", "metadata.uid"),
        {"name": "C2L_PROXY_IMAGE", "value": proxy_image},
        # Anything the gateway writes (nothing in jwks mode) goes to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
    ]
    probe: dict[str, Any] = {"httpGet": {"path": "/health", "port": "http", "scheme": "HTTP"}}
    container: dict[str, Any] = {
        "name": "gateway",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["c2l", "serve", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "env": env,
        "envFrom": [{"configMapRef": {"name": GATEWAY_CONFIG}}],
        "resources": {
            "requests": {"memory": "256Mi", "cpu": "250m"},
            "limits": {"memory": "1Gi", "cpu": "2"},
        },
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
        "securityContext": _hardened_container_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(GATEWAY, namespace, "gateway"),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(GATEWAY_LABELS)},
            # One replica at a time: a replaced replica's sessions end (clients reconnect).
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": dict(GATEWAY_LABELS)},
                "spec": {
                    "serviceAccountName": GATEWAY,
                    # The runtime talks to the API with this pod's service account.
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": _hardened_pod_context(),
                    "containers": [container],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}
                    ],
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": dict(GATEWAY_LABELS)},
                        }
                    ],
                },
            },
        },
    }


def _network_policies(namespace: str) -> list[dict[str, Any]]:
    proxy_port = {"protocol": "TCP", "port": wire.PROXY_PORT}
    default_deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("c2l-default-deny", namespace, "network"),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    proxies = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("c2l-proxy", namespace, "network"),
        "spec": {
            # Every session pod, whoever made it; proxies cannot reach each other, nor
            # anything else: no egress at all.
            "podSelector": {"matchLabels": {LABEL_PROXY: "true"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": dict(GATEWAY_LABELS)}}],
                    "ports": [proxy_port],
                }
            ],
            "egress": [],
        },
    }
    gateway = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("c2l-gateway", namespace, "network"),
        "spec": {
            "podSelector": {"matchLabels": dict(GATEWAY_LABELS)},
            "policyTypes": ["Ingress", "Egress"],
            # Clients come through the Service (a load balancer or an ingress controller).
            "ingress": [{"ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]}],
            "egress": [
                # The session pods, by pod IP.
                {
                    "to": [{"podSelector": {"matchLabels": {LABEL_PROXY: "true"}}}],
                    "ports": [proxy_port],
                },
                # Cluster DNS.
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            },
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                # The Kubernetes API (its address is not a pod: no selector can name it),
                # the JWKS of the identity provider and the desktops' tunnels (HTTPS).
                {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]},
            ],
        },
    }
    return [default_deny, proxies, gateway]


def deployment_manifests(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str = DEFAULT_GATEWAY_IMAGE,
    proxy_image: str = DEFAULT_IMAGE,
    replicas: int = 3,
) -> list[dict[str, Any]]:
    """Every object of a deployment in ``namespace``, in the order to apply them.

    Namespace, the gateway's ServiceAccount, Role (:data:`RUNTIME_RULES`) and RoleBinding,
    its ConfigMap (the identity provider's settings, to be filled in), Deployment and
    Service, the NetworkPolicies (default deny; proxies reachable only from gateways on the
    proxy port, with no egress; gateways' own traffic) and a PodDisruptionBudget.
    """
    check_name(namespace)
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    sa_subject = {"kind": "ServiceAccount", "name": GATEWAY, "namespace": namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": namespace,
                "labels": {
                    "app.kubernetes.io/name": "cloudtolocalllm",
                    # Pod Security Admission: every pod here must meet "restricted".
                    "pod-security.kubernetes.io/enforce": "restricted",
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(GATEWAY, namespace, "gateway"),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(GATEWAY, namespace, "gateway"),
            "rules": [dict(rule) for rule in RUNTIME_RULES],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(GATEWAY, namespace, "gateway"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY},
            "subjects": [sa_subject],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(GATEWAY_CONFIG, namespace, "gateway"),
            # Fill in before deploying: the gateway refuses to start without them.
            "data": {
                "C2L_AUTH_MODE": "jwks",
                "C2L_JWKS_URL": "",
                "C2L_JWT_ISSUER": "",
                "C2L_JWT_AUDIENCE": "",
            },
        },
        _gateway_deployment(namespace, image, proxy_image, replicas),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(GATEWAY, namespace, "gateway"),
            "spec": {
                "type": "ClusterIP",
                "selector": dict(GATEWAY_LABELS),
                "ports": [
                    {"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}
                ],
            },
        },
        *_network_policies(namespace),
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(GATEWAY, namespace, "gateway"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(GATEWAY_LABELS)}},
        },
    ]
