"""``c2l doctor``: one line per check, exit code non-zero only when sessions cannot run."""

from __future__ import annotations

import os
import re
import sys

import pytest
import trio

from c2l._doctor import FAIL, OK, WARN, Check, format_checks

from ._podman import podman_url

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
