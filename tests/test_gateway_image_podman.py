"""The gateway's image (``c2l image build --gateway``), for Kubernetes (DESIGN.md section 6).

Built offline as the proxy's is (Debian's Python 3.11 and the project with everything it
requires under /app), it runs as uid 1001 on a read-only root filesystem: the whole
gateway imports (its compiled dependencies load under the image's interpreter), ``c2l k8s
manifests`` prints the deployment, and ``c2l serve`` answers ``/health`` on the Kubernetes
runtime's configuration path as far as that goes without a cluster (it says so and exits).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import trio

from c2l._image import HASH_LABEL, gateway_recipe, source_hash

from ._podman import inspect_image, open_podman, podman_url, run_container

pytestmark = pytest.mark.podman

TAG = "localhost/c2l-gateway:test"

_PROBE = """
import json, os, sys
import gateway, orchestrator, desktop, c2l._k8s, c2l._cli
import cryptography.hazmat.primitives.asymmetric.rsa, msgspec, lightkube, yaml, quart_trio
from orchestrator._kubernetes import KubernetesRuntime
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "version": sys.version_info[:2],
                  "gateway": gateway.__file__}))
"""


async def _build() -> tuple[int, str]:
    with trio.fail_after(600):
        proc = await trio.run_process(
            [sys.executable, "-m", "c2l", "image", "build", "--gateway", "--tag", TAG],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "C2L_PODMAN_URL": podman_url()},
        )
    return proc.returncode, (proc.stdout + proc.stderr).decode()


async def test_the_gateway_image_runs_the_whole_gateway_as_1001() -> None:
    code, output = await _build()
    assert code == 0, output
    async with open_podman() as client:
        info = await inspect_image(client, TAG)
        assert info is not None
        assert info["Config"]["Labels"][HASH_LABEL] == source_hash(recipe=gateway_recipe())
        assert info["Config"]["User"].split(":")[0] == "1001"
        assert info["Config"]["Cmd"] == ["python3", "-m", "c2l", "serve", "--host", "0.0.0.0"]
        code, out, err = await run_container(client, TAG, ["python3", "-c", _PROBE])
        assert code == 0, err
        probe = json.loads(out.strip().splitlines()[-1])
        assert (probe["uid"], probe["gid"], probe["version"]) == (1001, 1001, [3, 11])
        assert probe["gateway"] == "/app/gateway/__init__.py"
        code, out, err = await run_container(
            client, TAG, ["python3", "-m", "c2l", "k8s", "manifests", "--session-pod", "alice"]
        )
        assert code == 0, err
        assert "kind: Pod" in out and "c2l-pod-" in out
        # c2l serve on the Kubernetes runtime, with no cluster: one clear line, exit 1.
        code, out, err = await run_container(
            client,
            TAG,
            ["python3", "-m", "c2l", "serve", "--host", "0.0.0.0"],
            env={
                "C2L_RUNTIME": "kubernetes",
                "C2L_AUTH_MODE": "jwks",
                "C2L_JWKS_URL": "https://idp.example/jwks",
                "C2L_JWT_ISSUER": "https://idp.example/",
                "C2L_JWT_AUDIENCE": "c2l",
            },
        )
        assert code == 1, (out, err)
        assert "Kubernetes" in err, err
