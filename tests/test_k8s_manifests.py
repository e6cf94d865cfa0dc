"""The Kubernetes objects (orchestrator/_k8s_objects.py) and ``c2l k8s manifests``.

The official schemas (kubernetes-validate, strict: unknown fields fail) for the two newest
Kubernetes versions the package ships, then what the schemas do not check and the API
server or the project would refuse: names, label values, quantities, the NetworkPolicy's
selectors against the pods they are for, the hardening of every container.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor

import wire
from c2l._k8s import PLACEHOLDER_SECRET, manifests_text
from c2lcore import DEFAULT_IMAGE, user_hash
from orchestrator import LABEL_PROXY, LABEL_REPLICA, LABEL_SESSION, LABEL_USER
from orchestrator import _k8s_objects as k8s
from orchestrator._session import new_session_id

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes.yaml"
C2L = [sys.executable, "-m", "c2l"]
#: The two newest Kubernetes versions whose strict schemas the package ships.
VERSIONS = sorted(
    {major_minor(v) for v in all_versions()}, key=lambda v: tuple(map(int, v.split(".")))
)[-2:]

UH = user_hash("alice@example.com")
SESSION = "AbCdEfGhIjKlMnOpQrStUv"
REPLICA = "c2l-gateway-5d8f7c9b6d-x7k2q"
OWNER = {"name": REPLICA, "uid": "3f1d2c4b-8a9e-4f00-9b1a-1234567890ab"}


def _pod(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "user_hash": UH,
        "session_id": SESSION,
        "replica": REPLICA,
        "image": DEFAULT_IMAGE,
        "namespace": "cloudtolocalllm",
        "secret_name": k8s.secret_name(UH),
        "memory": 512 * 1024**2,
        "cpus": 0.5,
        "owner": OWNER,
    }
    args.update(kw)
    return k8s.session_pod(**args)


def _secret() -> dict[str, Any]:
    return k8s.session_secret(
        user_hash=UH,
        session_id=SESSION,
        replica=REPLICA,
        namespace="cloudtolocalllm",
        secret="s3cr3t",
    )


def _all_objects() -> list[dict[str, Any]]:
    return [
        *k8s.deployment_manifests(),
        *k8s.deployment_manifests(
            namespace="c2l-test", image="r.example/gw:1", proxy_image="r.example/px:1", replicas=5
        ),
        _pod(),
        _pod(owner=None, memory=300 * 1024**2 + 1, cpus=1.25, tmp_size=1024**2),
        _secret(),
    ]


def _by_kind(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for obj in objects:
        if obj["kind"] == "Pod":
            specs.append(obj["spec"])
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            specs.append(obj["spec"]["template"]["spec"])
    return specs


# --------------------------------------------------------------------------- official schemas


def test_two_recent_versions_are_checked() -> None:
    assert len(VERSIONS) == 2
    assert tuple(map(int, VERSIONS[0].split("."))) >= (1, 30)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(version: str) -> None:
    objects = _all_objects()
    kinds = {o["kind"] for o in objects}
    assert kinds >= {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
        "Service", "NetworkPolicy", "PodDisruptionBudget", "Pod", "Secret",
    }  # fmt: skip
    for obj in objects:
        assert kubernetes_validate.validate(obj, version, strict=True) == version


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_validation_refuses_a_misspelt_field(version: str) -> None:
    # The guard the test above relies on: strict mode fails an unknown field.
    pod = _pod()
    pod["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, version, strict=True)


# --------------------------------------------------------------------------- names, labels

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _dns_label(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS_LABEL.fullmatch(name))


def _label_ok(key: str, value: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return False
    return len(value) <= 63 and bool(_LABEL_VALUE.fullmatch(value))


def _label_maps(obj: Any) -> list[dict[str, str]]:
    """Every ``labels`` and ``matchLabels`` mapping anywhere in ``obj``."""
    found: list[dict[str, str]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if (
                key in ("labels", "matchLabels", "selector")
                and isinstance(value, dict)
                and all(isinstance(v, str) for v in value.values())
            ):
                found.append(value)
            found.extend(_label_maps(value))
    elif isinstance(obj, list):
        for item in obj:
            found.extend(_label_maps(item))
    return found


def test_names_are_dns_labels() -> None:
    objects = _all_objects()
    for obj in objects:
        assert _dns_label(obj["metadata"]["name"]), obj["metadata"]["name"]
        if "namespace" in obj["metadata"]:
            assert _dns_label(obj["metadata"]["namespace"])
    for spec in _pod_specs(objects):
        for c in spec["containers"]:
            assert _dns_label(c["name"])
            for port in c.get("ports", []):
                assert len(port["name"]) <= 15
                assert _PORT_NAME.fullmatch(port["name"])
                assert re.search("[a-z]", port["name"])
        for v in spec.get("volumes", []):
            assert _dns_label(v["name"])
    pod = _pod()
    assert pod["metadata"]["name"] == f"c2l-pod-{UH}"
    assert len(UH) == 16
    assert _secret()["metadata"]["name"] == f"c2l-secret-{UH}"


def test_label_keys_and_values_are_valid() -> None:
    maps = _label_maps(_all_objects())
    assert len(maps) > 20
    for labels in maps:
        for key, value in labels.items():
            assert _label_ok(key, value), (key, value)


def test_the_project_checks_refuse_what_the_api_server_would() -> None:
    # A session id that ends in '-' or starts with '_' is a valid token_urlsafe but not
    # a label value: the builder says so instead of the API server's 422.
    for bad in ("-AbCdEf", "AbCdEf_", "x" * 64):
        with pytest.raises(ValueError, match="label"):
            _pod(session_id=bad)
    assert not _label_ok(LABEL_SESSION, "-AbCdEf")
    with pytest.raises(ValueError, match="name"):
        k8s.deployment_manifests(namespace="Bad_Namespace")
    with pytest.raises(ValueError, match="name"):
        _pod(secret_name="c2l-secret-" + "a" * 60)
    with pytest.raises(ValueError, match="cpus"):
        _pod(cpus=0.0001)


def test_session_ids_are_valid_label_values() -> None:
    for _ in range(1000):
        sid = new_session_id()
        assert _label_ok(LABEL_SESSION, sid), sid


def test_session_pod_labels_are_the_podman_ones_plus_the_replica() -> None:
    assert _pod()["metadata"]["labels"] == {
        LABEL_PROXY: "true",
        LABEL_USER: UH,
        LABEL_SESSION: SESSION,
        LABEL_REPLICA: REPLICA,
    }
    assert _secret()["metadata"]["labels"] == _pod()["metadata"]["labels"]


# --------------------------------------------------------------------------- quantities

_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
}  # fmt: skip


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity (the forms the project writes) as a number."""
    m = _QUANTITY.fullmatch(text)
    assert m, f"{text!r} is not a Kubernetes quantity"
    return Decimal(m.group(1)) * _SUFFIX[m.group(2)]


def test_quantities_parse_and_limits_cover_requests() -> None:
    checked = 0
    for spec in _pod_specs(_all_objects()):
        for c in spec["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert set(limits) == {"memory", "cpu"}
            for res in ("memory", "cpu"):
                assert parse_quantity(limits[res]) >= parse_quantity(requests[res]) > 0
                checked += 1
        for v in spec.get("volumes", []):
            if "emptyDir" in v:
                assert parse_quantity(v["emptyDir"]["sizeLimit"]) > 0
    assert checked == 2 * 4
    res = _pod()["spec"]["containers"][0]["resources"]
    assert res == {
        "limits": {"memory": "512Mi", "cpu": "500m"},
        "requests": {"memory": "64Mi", "cpu": "50m"},
    }
    odd = _pod(memory=300 * 1024**2 + 1, cpus=1.25)["spec"]["containers"][0]["resources"]
    assert parse_quantity(odd["limits"]["memory"]) == 300 * 1024**2 + 1
    assert parse_quantity(odd["limits"]["cpu"]) == Decimal("1.25")
    assert k8s.memory_quantity(3 * 1024**3) == "3Gi"


# --------------------------------------------------------------------------- selectors


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects ``labels``."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_network_policies_select_the_right_pods() -> None:
    objects = k8s.deployment_manifests()
    gateway = _by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    session = _pod()["metadata"]["labels"]
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"c2l-default-deny", "c2l-proxy", "c2l-gateway"}

    deny = policies["c2l-default-deny"]
    assert _selects(deny["podSelector"], gateway)
    assert _selects(deny["podSelector"], session)
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny
    assert "egress" not in deny

    proxy = policies["c2l-proxy"]
    assert _selects(proxy["podSelector"], session)
    assert not _selects(proxy["podSelector"], gateway)
    assert sorted(proxy["policyTypes"]) == ["Egress", "Ingress"]
    assert proxy.get("egress", []) == []  # sends nothing
    [rule] = proxy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": wire.PROXY_PORT}]
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace's pods only, no ipBlock
    assert _selects(peer["podSelector"], gateway)
    assert not _selects(peer["podSelector"], session)  # proxies cannot reach each other

    gw = policies["c2l-gateway"]
    assert _selects(gw["podSelector"], gateway)
    assert not _selects(gw["podSelector"], session)
    to_proxies = [r for r in gw["egress"] if any("podSelector" in p for p in r.get("to", []))]
    assert any(
        _selects(p["podSelector"], session)
        and r["ports"] == [{"protocol": "TCP", "port": wire.PROXY_PORT}]
        for r in to_proxies
        for p in r["to"]
        if "namespaceSelector" not in p
    )


def test_deployment_service_and_budget_select_the_gateway_pods() -> None:
    objects = k8s.deployment_manifests()
    deployment = _by_kind(objects, "Deployment")
    template = deployment["spec"]["template"]["metadata"]["labels"]
    session = _pod()["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"],
        {"matchLabels": _by_kind(objects, "Service")["spec"]["selector"]},
        _by_kind(objects, "PodDisruptionBudget")["spec"]["selector"],
    ):
        assert _selects(selector, template)
        assert not _selects(selector, session)
    svc = _by_kind(objects, "Service")["spec"]["ports"][0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert svc["targetPort"] in [p["name"] for p in container["ports"]]


# --------------------------------------------------------------------------- hardening


def _check_hardened(spec: dict[str, Any]) -> None:
    pod_ctx = spec.get("securityContext", {})
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for v in spec.get("volumes", []):
        assert set(v) - {"name"} <= {"emptyDir", "secret", "configMap", "projected"}, v
    containers = spec["containers"] + spec.get("initContainers", [])
    assert containers
    for c in containers:
        ctx = c.get("securityContext", {})

        def get(key: str, ctx: dict[str, Any] = ctx) -> Any:
            return ctx.get(key, pod_ctx.get(key))

        assert get("runAsNonRoot") is True, c["name"]
        assert get("runAsUser") == 1001
        assert get("runAsGroup") == 1001
        assert ctx.get("readOnlyRootFilesystem") is True
        assert ctx.get("allowPrivilegeEscalation") is False
        assert not ctx.get("privileged")
        assert ctx.get("capabilities") == {"drop": ["ALL"]}
        assert get("seccompProfile") == {"type": "RuntimeDefault"}
        for port in c.get("ports", []):
            assert "hostPort" not in port and "hostIP" not in port


def test_every_container_of_every_pod_is_hardened() -> None:
    specs = _pod_specs(_all_objects())
    assert len(specs) == 4
    for spec in specs:
        _check_hardened(spec)


def test_the_hardening_check_catches_a_weakened_pod() -> None:
    for breaks in (
        lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        lambda s: s["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["NET_RAW"]}
        ),
        lambda s: (
            s["securityContext"].update(runAsUser=0)
            or s["containers"][0]["securityContext"].pop("runAsUser")
        ),
        lambda s: s.update(hostNetwork=True),
        lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda s: (
            s["containers"][0]["securityContext"].pop("seccompProfile")
            and s["securityContext"].pop("seccompProfile")
        ),
        lambda s: s["containers"].append({"name": "side", "image": "x"}),
    ):
        spec = _pod()["spec"]
        breaks(spec)
        with pytest.raises(AssertionError):
            _check_hardened(spec)


def test_session_pod_is_the_session_model() -> None:
    pod = _pod()
    spec = pod["spec"]
    [c] = spec["containers"]
    assert c["name"] == "proxy"
    assert c["image"] == DEFAULT_IMAGE
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    # /tmp: memory-backed, bounded; the only writable place.
    [mount] = c["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Mi"}
    # Readiness from the proxy's /health, which needs no secret.
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert probe["port"] == wire.PROXY_PORT
    assert c["ports"][0]["containerPort"] == wire.PROXY_PORT
    env = {e["name"]: e for e in c["env"]}
    # The secret comes from the Secret, never as a literal in the Pod.
    assert "value" not in env[wire.SECRET_ENV]
    assert env[wire.SECRET_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": k8s.secret_name(UH), "key": k8s.SECRET_KEY}
    }
    assert wire.SOCKET_ENV not in env  # TCP on the pod IP
    assert env["C2L_PROXY_PORT"]["value"] == str(wire.PROXY_PORT)
    assert env["C2L_PROXY_MEMORY"]["value"] == str(512 * 1024**2)
    assert env["C2L_SESSION_ID"]["value"] == SESSION
    assert env["C2L_USER_HASH"]["value"] == UH
    [ref] = pod["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": OWNER["name"],
        "uid": OWNER["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }
    assert "ownerReferences" not in _pod(owner=None)["metadata"]


def test_session_secret_holds_the_secret_and_no_made_up_owner() -> None:
    secret = _secret()
    assert base64.b64decode(secret["data"][k8s.SECRET_KEY]) == b"s3cr3t"
    assert secret["immutable"] is True
    assert "ownerReferences" not in secret["metadata"]  # set by the runtime: the Pod's uid


# --------------------------------------------------------------------------- deployment


def test_role_allows_exactly_the_runtime_and_nothing_cluster_wide() -> None:
    objects = k8s.deployment_manifests()
    assert not [o for o in objects if o["kind"].startswith("Cluster")]
    role = _by_kind(objects, "Role")
    rules = {
        (group, res): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
    }
    assert rules == {
        ("", "pods"): sorted(["get", "list", "watch", "create", "delete"]),
        ("", "secrets"): sorted(["get", "create", "patch", "delete"]),
        ("metrics.k8s.io", "pods"): ["get", "list"],
    }
    binding = _by_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = _by_kind(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "cloudtolocalllm"}
    ]
    template = _by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert template["serviceAccountName"] == sa["metadata"]["name"]


def test_gateway_deployment_runs_the_kubernetes_runtime() -> None:
    objects = k8s.deployment_manifests(proxy_image="r.example/px:2", replicas=4)
    dep = _by_kind(objects, "Deployment")
    assert dep["spec"]["replicas"] == 4
    [c] = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["C2L_RUNTIME"]["value"] == "kubernetes"
    assert env["C2L_PROXY_IMAGE"]["value"] == "r.example/px:2"
    for name, path in (
        ("C2L_K8S_NAMESPACE", "metadata.namespace"),
        ("C2L_REPLICA_ID", "metadata.name"),
        ("C2L_REPLICA_UID", "metadata.uid"),
    ):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert _by_kind(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    ns = _by_kind(objects, "Namespace")["metadata"]
    assert ns["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == ns["name"]


def test_shipped_manifests_are_the_generators_output() -> None:
    assert DEPLOY.read_text() == manifests_text(), (
        "deploy/kubernetes.yaml is stale: run `c2l k8s manifests > deploy/kubernetes.yaml`"
    )
    docs = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d]
    assert docs == k8s.deployment_manifests()


# --------------------------------------------------------------------------- the command


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2L_")}
    return subprocess.run(
        [*C2L, "k8s", "manifests", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_default_output_is_the_shipped_file() -> None:
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == DEPLOY.read_text()


def test_cli_flags_are_applied() -> None:
    proc = _run(
        "--namespace", "c2l-prod", "--image", "r.example/gw:7", "--proxy-image", "r.example/px:7",
        "--replicas", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs == k8s.deployment_manifests(
        namespace="c2l-prod", image="r.example/gw:7", proxy_image="r.example/px:7", replicas=2
    )
    dep = _by_kind(docs, "Deployment")
    assert dep["metadata"]["namespace"] == "c2l-prod"
    assert dep["spec"]["replicas"] == 2
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "r.example/gw:7"
    assert {"name": "C2L_PROXY_IMAGE", "value": "r.example/px:7"} in c["env"]
    assert _by_kind(docs, "Namespace")["metadata"]["name"] == "c2l-prod"
    assert "--namespace c2l-prod" in proc.stdout.splitlines()[0]


def test_cli_session_pod() -> None:
    proc = _run(
        "--session-pod", "alice", "--namespace", "c2l-prod", "--proxy-image", "r.example/px:7"
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    pod, secret = docs
    uh = user_hash("alice")
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["name"] == f"c2l-pod-{uh}"
    assert pod["metadata"]["namespace"] == "c2l-prod"
    assert pod["spec"]["containers"][0]["image"] == "r.example/px:7"
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"memory": "512Mi", "cpu": "500m"}
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == f"c2l-secret-{uh}"
    assert base64.b64decode(secret["data"][k8s.SECRET_KEY]).decode() == PLACEHOLDER_SECRET
    assert "PLACEHOLDER" in PLACEHOLDER_SECRET
    assert "PLACEHOLDER" in proc.stdout.split("---")[0]  # said in the header too
    for version in VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_cli_refuses_bad_values_in_one_line() -> None:
    for args in (("--namespace", "Bad_NS"), ("--replicas", "0")):
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
