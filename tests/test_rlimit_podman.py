"""The proxy's address-space limit (RLIMIT_AS), which needs no cgroups.

On rootless cgroup v1 hosts (this machine kind) Podman drops the memory, CPU and pids
limits; the resource limit still holds. Checked on a live session of a real ``c2l serve``:
the container carries the limit, a process started in it cannot map past it (MemoryError),
and the user's session keeps streaming.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import httpx
import pytest
import trio

from c2lcore import user_hash
from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama
from orchestrator import RUNTIME_RESERVE, ProxySpec, container_name
from orchestrator._podman import container_body

from ._stack import exec_in, podman_client, podman_get, run_stack, wait_for_desktop
from .test_e2e_podman import TOKENS, chat

MiB = 1024**2
ALICE = "alice@rlimit.example"

ALLOCATE = """
import sys
try:
    block = bytearray(int(sys.argv[1]))
except MemoryError:
    print("MemoryError")
    sys.exit(3)
print("allocated", len(block))
"""


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01)
    )
    return fake


def test_the_container_asks_for_an_address_space_limit_from_its_memory() -> None:
    spec = ProxySpec("n", "p", "i", {}, {}, memory=256 * MiB)
    limit = 256 * MiB + RUNTIME_RESERVE
    assert spec.address_space == limit
    # Only RLIMIT_AS: no CPU-time limit (it would end long sessions) and no per-uid
    # process limit (every proxy is the same host uid, so it would be shared by all).
    assert container_body(spec)["r_limits"] == [{"type": "as", "hard": limit, "soft": limit}]


def _address_space(pid: int) -> tuple[str, str]:
    """(soft, hard) ``Max address space`` of a host process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            soft, hard = line.split()[3:5]
            return soft, hard  # bytes, or "unlimited"
    raise AssertionError(f"no address space line for pid {pid}")


def _vm_peak(pid: int) -> int:
    """Peak virtual memory size (bytes) of a host process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmPeak:")[1].split()[0]) * 1024


@pytest.mark.podman
async def test_a_process_past_the_address_space_limit_fails_and_the_session_lives(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    limit = 256 * MiB + RUNTIME_RESERVE
    with run_stack(tmp_path, env={"C2L_PROXY_MEMORY": "256m"}) as stack:
        stack.start_agent(ALICE, fake_ollama.url)
        token = stack.token(ALICE)
        name = container_name(user_hash(ALICE))
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http, podman_client() as pc:
            with trio.fail_after(180):
                session = await wait_for_desktop(http, token)

                # the created container carries the limit, soft and hard
                info = await podman_get(pc, f"/containers/{name}/json")
                ulimits = {u["Name"]: u for u in info["HostConfig"].get("Ulimits") or []}
                assert ulimits.get("RLIMIT_AS", {}).get("Soft") == limit, ulimits
                assert ulimits["RLIMIT_AS"]["Hard"] == limit
                assert "RLIMIT_CPU" not in ulimits, ulimits

                # the live proxy process holds itself to the memory setting (it needs no
                # reserve for runc once it runs), and lives well within it
                pid = int(info["State"]["Pid"])
                assert _address_space(pid) == (str(256 * MiB), str(256 * MiB))
                peak = _vm_peak(pid)
                print(f"proxy VmPeak {peak / MiB:.1f} MiB under a limit of {limit / MiB:g} MiB")
                assert peak < 256 * MiB

                # a process started in the container cannot map past the limit ...
                code, out = await exec_in(pc, name, ["python3", "-c", ALLOCATE, str(limit)])
                assert (code, out.split()) == (3, ["MemoryError"]), (code, out)
                # ... while the same allocation well under it works: it is the limit
                code, out = await exec_in(pc, name, ["python3", "-c", ALLOCATE, str(64 * MiB)])
                assert code == 0 and "allocated" in out, (code, out)

                # the user's session is untouched: same proxy, same session, still streams
                got = await chat(session, token, "still there?", fake_ollama)
                text = "".join(json.loads(c)["message"]["content"] for c in got.lines[:-1])
                assert text == "".join(make_tokens("still there?", TOKENS))
                after = await podman_get(pc, f"/containers/{name}/json")
                assert after["State"]["Running"] and int(after["State"]["Pid"]) == pid
                r = await http.get(
                    "/api/streaming/status", headers={"Authorization": f"Bearer {token}"}
                )
                assert r.json()["sessionId"] == session["sessionId"]


def test_the_proxy_holds_itself_to_its_memory_setting() -> None:
    """In a child process: after the proxy's own limit, mapping past the setting fails."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from proxy._server import _limit_address_space\n"
        "_limit_address_space(sys.argv[1])\n"
        "print(*resource.getrlimit(resource.RLIMIT_AS))\n"
        "try:\n"
        "    bytearray(int(sys.argv[1]))\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
    )
    limit = 512 * MiB
    done = subprocess.run(
        [sys.executable, "-c", code, str(limit)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == [str(limit), str(limit), "MemoryError"], done


def test_the_proxy_without_a_memory_setting_keeps_its_limit() -> None:
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from proxy._server import _limit_address_space\n"
        "before = resource.getrlimit(resource.RLIMIT_AS)\n"
        "_limit_address_space('')\n"
        "print(before == resource.getrlimit(resource.RLIMIT_AS))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True"], done
