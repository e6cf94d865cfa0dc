"""The generated session Pod, run with ``podman kube play`` on real rootless Podman.

No cluster runs on these machines; Podman 4.3's kube play is the nearest thing that runs
the Pod as written. What it does with it, measured here (Debian 12, Podman 4.3.1, rootless,
cgroup v1):

- Every ``containerPort`` is published on the host (0.0.0.0) unless the pod says otherwise,
  so the local run drops ``ports`` and reaches ``/health`` from inside the container (an
  exec of Python): nothing listens on the host.
- A ``kind: Secret`` document is stored as a Podman secret holding the YAML as written, and
  ``secretKeyRef`` then fails ("secret ... is not valid JSON"): Podman 4.3 reads the secret
  as JSON of the Secret's ``data`` map. The local run creates that Podman secret itself
  (``POST /secrets/create``, the JSON of ``data``), so ``valueFrom.secretKeyRef`` is still
  the path the proxy's secret takes.
- ``resources`` are not dropped on rootless cgroup v1 as the REST create drops them: runc
  fails ("cannot set memory limit"), for limits and for the memory request alike. They are
  kept where Podman has cgroup v2 with the memory controller, and checked; dropped here.
  The proxy's own RLIMIT_AS from ``C2L_PROXY_MEMORY`` holds either way (checked).
- Ignored: ``runAsNonRoot`` (the uid 1001 is what holds), the ``seccompProfile`` field (the
  container gets Podman's default filter anyway: ``Seccomp: 2``), ``readinessProbe`` (no
  healthcheck is made), ``sizeLimit`` and ``medium: Memory`` (the emptyDir becomes an
  ordinary volume on disk, named after the pod's volume: the local run gives it a unique
  name and removes it).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
import trio
import yaml

import wire
from orchestrator import _k8s_objects as k8s

from ._stack import container_logs, exec_in, podman_client, podman_get
from .conftest import PROXY_IMAGE, need_podman

pytestmark = pytest.mark.podman

#: Runs in the proxy's container: /health from inside (the proxy may still be starting),
#: then what the kernel says about the proxy (pid 1) and about this process.
PROBE = """
import json, os, time, urllib.request
deadline = time.monotonic() + 20
while True:
    try:
        health = json.load(urllib.request.urlopen("http://127.0.0.1:PORT/health", timeout=2))
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
status = dict(l.split(":", 1) for l in open("/proc/1/status"))
limits = [l for l in open("/proc/1/limits") if l.startswith("Max address space")]
try:
    open("/rootfs-is-writable", "w")
    root_ro = False
except OSError:
    root_ro = True
with open("/tmp/writable", "w") as f:
    f.write("ok")
print(json.dumps({
    "health": health,
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "status": {k: v.strip() for k, v in status.items()},
    "as_limit": limits[0].split()[3] if limits else None,
    "root_ro": root_ro,
    "secret": os.environ.get("SECRET_ENV"),
}))
""".replace("PORT", str(wire.PROXY_PORT)).replace("SECRET_ENV", wire.SECRET_ENV)


def for_kube_play(pod: dict[str, Any], *, keep_resources: bool, volume: str) -> dict[str, Any]:
    """The generated Pod, changed only where Podman 4.3's kube play needs it (see above)."""
    pod = json.loads(json.dumps(pod))
    [container] = pod["spec"]["containers"]
    del container["ports"]  # would be published on 0.0.0.0
    if not keep_resources:
        del container["resources"]  # runc: "cannot set memory limit" (rootless cgroup v1)
    [vol] = pod["spec"]["volumes"]
    for mount in container["volumeMounts"]:
        if mount["name"] == vol["name"]:
            mount["name"] = volume
    vol["name"] = volume
    return pod


async def test_kube_play_runs_the_hardened_session_pod() -> None:
    need_podman()
    uh = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    session_id = "kubeplay" + secrets.token_hex(4)
    memory = 512 * 1024**2
    pod = k8s.session_pod(
        user_hash=uh,
        session_id=session_id,
        replica="kubeplay-test",
        image=PROXY_IMAGE,
        namespace="default",
        secret_name=k8s.secret_name(uh),
        memory=memory,
        cpus=0.5,
    )
    sec = k8s.session_secret(
        user_hash=uh,
        session_id=session_id,
        replica="kubeplay-test",
        namespace="default",
        secret=secret,
    )
    pod_name = pod["metadata"]["name"]
    ctr = f"{pod_name}-{k8s.PROXY_CONTAINER}"  # kube play names containers <pod>-<container>
    volume = f"c2l-kubeplay-{uh}"
    async with podman_client() as client:
        if (await client.get(f"/images/{PROXY_IMAGE}/exists")).status_code != 204:
            pytest.fail(f"no image {PROXY_IMAGE}: run `c2l image build` first")
        info = await podman_get(client, "/info")
        v2_memory = info["host"]["cgroupVersion"] == "v2" and "memory" in (
            info["host"].get("cgroupControllers") or []
        )
        played = for_kube_play(pod, keep_resources=v2_memory, volume=volume)
        try:
            with trio.fail_after(120):
                r = await client.post(
                    "/secrets/create",
                    params={"name": sec["metadata"]["name"]},
                    content=json.dumps(sec["data"]),
                )
                assert r.status_code == 200, r.text
                r = await client.post(
                    "/play/kube",
                    content=yaml.safe_dump(played),
                    headers={"Content-Type": "application/yaml"},
                )
                assert r.status_code == 200, r.text
                code, out = await exec_in(client, ctr, ["python3", "-c", PROBE])
                assert code == 0, out + await container_logs(client, ctr)
                seen = json.loads(out.strip().splitlines()[-1])
                c = await podman_get(client, f"/containers/{ctr}/json")
                p = await podman_get(client, f"/pods/{pod_name}/json")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await client.delete(f"/pods/{pod_name}", params={"force": "true"})
                await client.delete(f"/volumes/{volume}", params={"force": "true"})
                await client.delete(f"/secrets/{sec['metadata']['name']}")
        # Nothing left: the pod, its volume and the secret are gone.
        assert (await client.get(f"/pods/{pod_name}/exists")).status_code == 404
        assert (await client.get(f"/volumes/{volume}/exists")).status_code == 404
        assert (await client.get(f"/secrets/{sec['metadata']['name']}/json")).status_code == 404

    # It answers /health, with no secret, and it got its secret from the Secret.
    assert seen["health"]["status"] == "healthy"
    assert seen["secret"] == secret
    # The hardening landed: the process's view...
    assert (seen["uid"], seen["gid"], seen["groups"]) == (1001, 1001, [])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(seen["status"][cap], 16) == 0, (cap, seen["status"][cap])
    assert seen["status"]["NoNewPrivs"] == "1"
    assert seen["status"]["Seccomp"] == "2"  # a filter: Podman's default profile
    assert seen["root_ro"] is True
    assert seen["as_limit"] == str(memory)  # the proxy's own rlimit, from C2L_PROXY_MEMORY
    # ... and Podman's.
    assert c["Config"]["User"] == "1001:1001"
    host = c["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"]
    assert not host.get("Privileged")
    assert {"CAP_NET_RAW", "CAP_SETUID", "CAP_CHOWN", "CAP_SYS_CHROOT"} <= set(host["CapDrop"])
    assert not c["EffectiveCaps"]
    assert not host.get("CapAdd")
    assert host["RestartPolicy"]["Name"] == "no"
    [mount] = [m for m in c["Mounts"] if m["Destination"] == "/tmp"]
    assert mount["Type"] == "volume"  # medium: Memory is not a tmpfs here
    # Nothing published on the host, by the proxy or by the pod's infra container.
    assert not host.get("PortBindings")
    assert not (p.get("InfraConfig") or {}).get("PortBindings")
    if v2_memory:
        assert host["Memory"] == memory
    else:
        assert host["Memory"] == 0  # dropped for the local run (rootless cgroup v1)
