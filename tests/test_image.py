"""The offline proxy image (``c2l image build``) against the real rootless Podman."""

from __future__ import annotations

import json
import os
import sys

import pytest
import trio

from c2l._image import HASH_LABEL, source_hash
from c2lcore import DEFAULT_IMAGE

from ._podman import inspect_image, open_podman, podman_url, run_container

pytestmark = pytest.mark.podman

TAG = os.environ.get("C2L_PROXY_IMAGE") or DEFAULT_IMAGE

#: Tools that must not be in the image: package managers, compilers, pip.
FORBIDDEN = (
    "apt",
    "apt-get",
    "dpkg",
    "dpkg-deb",
    "gcc",
    "cc",
    "c++",
    "ld",
    "pip",
    "pip3",
    "sh",
    "bash",
    "python3-config",
)

_PROBE = f"""
import importlib.util, json, os, shutil, sys
import proxy, proxy._server, wsproto, h11, attrs, wire
heavy = [m for m in ("trio", "asyncio", "ssl", "email") if m in sys.modules]
dirs = ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
found = [b for b in {list(FORBIDDEN)!r}
         if shutil.which(b, path=":".join(dirs)) is not None]
print(json.dumps({{
    "uid": os.getuid(),
    "gid": os.getgid(),
    "found": found,
    "pip_module": importlib.util.find_spec("pip") is not None,
    "trio_module": importlib.util.find_spec("trio") is not None,
    "heavy_imports": heavy,
    "proxy_file": proxy.__file__,
    "written_pycache": [p for p, _, fs in os.walk("/app") if any(f.endswith(".pyc") for f in fs)
                        and not p.endswith("__pycache__")],
    "version": sys.version_info[:2],
}}))
"""


async def _build(*extra: str) -> tuple[int, str]:
    with trio.fail_after(600):
        proc = await trio.run_process(
            [sys.executable, "-m", "c2l", "image", "build", "--tag", TAG, *extra],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "C2L_PODMAN_URL": podman_url()},
        )
    return proc.returncode, (proc.stdout + proc.stderr).decode()


async def test_build_labels_the_image_with_the_source_hash() -> None:
    code, output = await _build()
    assert code == 0, output
    async with open_podman() as client:
        info = await inspect_image(client, TAG)
    assert info is not None, f"{TAG} missing after a successful build"
    assert info["Config"]["Labels"][HASH_LABEL] == source_hash()
    assert info["Config"]["User"].split(":")[0] == "1001"
    assert info["Config"]["Cmd"] == ["python3", "-m", "proxy"]
    assert "PYTHONPATH=/app" in info["Config"]["Env"]
    assert info["Config"]["WorkingDir"] == "/app"


async def test_second_build_is_a_noop() -> None:
    code, _ = await _build()
    assert code == 0
    with trio.fail_after(30):
        code, output = await _build()
    assert code == 0, output
    assert f"image {TAG} is current" in output


async def test_image_runs_the_proxy_code_as_1001_without_tools() -> None:
    code, output = await _build()
    assert code == 0, output
    async with open_podman() as client:
        code, out, err = await run_container(client, TAG, ["python3", "-c", _PROBE])
    assert code == 0, err
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["uid"] == 1001
    assert probe["gid"] == 1001
    assert probe["found"] == []
    assert probe["pip_module"] is False
    # The proxy is trio-free so that it fits the memory target (DESIGN.md section 4).
    assert probe["trio_module"] is False
    assert probe["heavy_imports"] == []
    assert probe["proxy_file"] == "/app/proxy/__init__.py"
    assert probe["version"] == [3, 11]


async def test_image_default_user_cannot_write_app() -> None:
    # Even without the read-only root filesystem the code is root-owned and not
    # writable by the proxy's uid.
    async with open_podman() as client:
        code, out, err = await run_container(
            client,
            TAG,
            ["python3", "-c", "import os; print(os.access('/app/proxy', os.W_OK))"],
            read_only_filesystem=False,
        )
    assert code == 0, err
    assert out.strip() == "False"
