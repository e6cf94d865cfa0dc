"""``c2l doctor``: one line per check, exit code non-zero only when sessions cannot run."""

from __future__ import annotations

import os
import re
import sys

import pytest
import trio

from c2l._doctor import FAIL, OK, WARN, Check, format_checks, limits_check

from ._podman import API, open_podman, podman_url

_LINE = re.compile(r"^(OK|WARN|FAIL|SKIP)\s{2,}(\S.*?)\s{2,}(\S.*)$")


async def _doctor(*args: str) -> tuple[int, str]:
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "c2l", "doctor", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()


@pytest.mark.podman
async def test_doctor_passes_on_this_host() -> None:
    code, output = await _doctor("--podman-url", podman_url())
    assert code == 0, output
    checks = {m.group(2): m.group(1) for m in map(_LINE.match, output.splitlines()) if m}
    # As root, scripts/_setup.sh wrote the service user's configuration, so the keyring
    # check must pass; an ordinary user's own configuration may only earn a warning.
    must_pass = ["podman", "REST socket", "OCI runtime", "proxy image"]
    if os.geteuid() == 0:
        must_pass.append("keyring")
    for name in must_pass:
        assert checks.get(name) == OK, f"{name}: {checks.get(name)}\n{output}"
    assert checks.get("resource limits") in (OK, WARN)
    assert "FAIL" not in checks.values()
    # the limits line says which limit holds by which mechanism on this very host
    async with open_podman() as client:
        host = (await client.get(f"{API}/info")).json()["host"]
    expected = limits_check(
        host["cgroupVersion"],
        host["security"]["rootless"],
        host.get("cgroupControllers") or (),
        "",
    )
    line = next(line for line in output.splitlines() if "resource limits" in line)
    assert line.split("resource limits", 1)[1].strip() == expected.detail, output
    assert "RLIMIT_AS" in line, line


@pytest.mark.parametrize(
    ("cgroup", "rootless", "controllers", "status", "detail"),
    [
        # this machine kind: Podman drops every cgroup limit, only the rlimit holds
        (
            "v1",
            True,
            [],
            WARN,
            "cgroup v1 rootless: memory as RLIMIT_AS only (C2L_PROXY_MEMORY + 1 GiB per process);"
            " cpu and pids not enforced",
        ),
        (
            "v2",
            True,
            ["cpuset", "cpu", "io", "memory", "pids"],
            OK,
            "cgroup v2 rootless: memory, cpu and pids by cgroups; "
            "memory also as RLIMIT_AS per process",
        ),
        # systemd delegates memory and pids to users by default, not cpu
        (
            "v2",
            True,
            ["memory", "pids"],
            WARN,
            "cgroup v2 rootless: memory and pids by cgroups; "
            "memory also as RLIMIT_AS per process; cpu not enforced",
        ),
        (
            "v1",
            False,
            [],
            OK,
            "cgroup v1: memory, cpu and pids by cgroups; memory also as RLIMIT_AS per process",
        ),
    ],
)
def test_limits_line_names_the_mechanism_of_each_limit(
    cgroup: str, rootless: bool, controllers: list[str], status: str, detail: str
) -> None:
    check = limits_check(cgroup, rootless, controllers, "c2lsvc")
    assert (check.name, check.status, check.detail) == ("resource limits", status, detail)
    assert bool(check.hint) == (status == WARN)


async def test_doctor_fails_clearly_without_a_socket(tmp_path: os.PathLike[str]) -> None:
    missing = f"unix://{tmp_path}/nope/podman.sock"
    code, output = await _doctor("--podman-url", missing)
    assert code != 0, output
    line = next(line for line in output.splitlines() if "REST socket" in line)
    assert line.startswith("FAIL"), output
    assert missing in line
    assert "fix:" in output
    assert "cannot run sessions" in output


def test_format_aligns_columns_and_hints_only_on_problems() -> None:
    text = format_checks(
        [
            Check("podman", OK, "podman version 4.3.1", "never shown"),
            Check("resource limits", WARN, "ignored", "use cgroup v2"),
            Check("x", FAIL, "broken", "fix it"),
        ]
    )
    lines = text.splitlines()
    assert "never shown" not in text
    assert lines[0].index("podman version") == lines[1].index("ignored") == lines[3].index("broken")
    assert lines[2].strip() == "fix: use cgroup v2"
    assert lines[4].strip() == "fix: fix it"
