"""A safe default: the development issuer serves loopback only (DESIGN.md section 2).

``c2l serve`` in dev auth mode on a non-loopback ``--host`` refuses to start with one line
that names ``C2L_AUTH_MODE=jwks`` and the override; with the override
(``--insecure-dev-auth`` or ``C2L_INSECURE_DEV_AUTH=1``) it warns at start, ``c2l doctor``
warns, and the web page shows a banner. No test here binds a non-loopback address: the
gateway never gets as far as serving (its Podman socket does not exist).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from c2l._cli import main
from c2l._doctor import OK, WARN, Check, run_checks
from c2lcore import Config, ConfigError, is_loopback

from ._hostile import open_gateway
from .conftest import free_port, need_podman

NOWHERE = "unix:///nonexistent/c2l-test/podman.sock"
NON_LOOPBACK = ["0.0.0.0", "::", "192.0.2.10", "10.1.2.3", "gateway.example.com", "128.0.0.1"]
LOOPBACK = ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "localhost", "LocalHost"]
OVERRIDE_WORDS = ("C2L_AUTH_MODE=jwks", "--insecure-dev-auth", "C2L_INSECURE_DEV_AUTH=1")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean ``C2L_*`` environment whose Podman socket does not exist (nothing serves)."""
    for name in list(os.environ):
        if name.startswith("C2L_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("C2L_PODMAN_URL", NOWHERE)
    monkeypatch.setenv("C2L_PODMAN_WAIT", "0.2")
    return monkeypatch


def _serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["serve", "--port", "0", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("host", NON_LOOPBACK)
def test_serve_refuses_dev_auth_on_a_non_loopback_host(
    host: str, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _serve(capsys, "--host", host)
    assert rc == 1
    assert out == ""  # not even the wait for Podman: refused before anything starts
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("c2l serve: ")
    assert host in line
    for word in OVERRIDE_WORDS:
        assert word in line, line


@pytest.mark.parametrize("host", LOOPBACK)
def test_dev_auth_serves_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    config = Config.from_env({}, host=host)
    assert config.auth_mode == "dev" and not config.insecure_dev_auth


@pytest.mark.parametrize("host", NON_LOOPBACK)
def test_non_loopback_is_fine_in_jwks_mode_or_with_the_override(host: str) -> None:
    assert not is_loopback(host)
    jwks = {
        "C2L_AUTH_MODE": "jwks",
        "C2L_JWKS_URL": "https://tenant.example/.well-known/jwks.json",
        "C2L_JWT_ISSUER": "https://tenant.example/",
        "C2L_JWT_AUDIENCE": "c2l",
    }
    assert Config.from_env(jwks, host=host).auth_mode == "jwks"
    assert Config.from_env({}, host=host, insecure_dev_auth=True).insecure_dev_auth
    for yes in ("1", "true", "yes", "on"):
        assert Config.from_env({"C2L_INSECURE_DEV_AUTH": yes}, host=host).insecure_dev_auth
    for no in ("0", "false", "no", "off"):
        with pytest.raises(ConfigError, match="C2L_INSECURE_DEV_AUTH=1"):
            Config.from_env({"C2L_INSECURE_DEV_AUTH": no}, host=host)
    with pytest.raises(ConfigError, match="C2L_INSECURE_DEV_AUTH"):
        Config.from_env({"C2L_INSECURE_DEV_AUTH": "perhaps"}, host="127.0.0.1")


def _warnings(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("form", ["flag", "environment"])
def test_the_override_warns_at_start(
    form: str,
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    args = ["--host", "0.0.0.0"]
    if form == "flag":
        args.append("--insecure-dev-auth")
    else:
        env.setenv("C2L_INSECURE_DEV_AUTH", "1")
    caplog.set_level(logging.INFO)
    rc, out, err = _serve(capsys, *args)
    # it got past the check and on to Podman, which is not there in this test
    assert rc == 1 and "no Podman service answers" in err, (out, err)
    warned = [w for w in _warnings(caplog.records) if "insecure" in w.lower()]
    assert len(warned) == 1, _warnings(caplog.records)
    assert "0.0.0.0" in warned[0] and "C2L_AUTH_MODE=jwks" in warned[0]
    assert "any user" in warned[0]


def test_no_warning_without_the_override(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rc, _, err = _serve(capsys, "--host", "127.0.0.1")
    assert rc == 1 and "no Podman service answers" in err
    assert not [w for w in _warnings(caplog.records) if "insecure" in w.lower()]


def test_the_refusal_is_one_line_from_the_console_script(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2L_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path), C2L_PODMAN_URL=NOWHERE, C2L_PODMAN_WAIT="0.2")
    proc = subprocess.run(
        [sys.executable, "-m", "c2l", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(word in proc.stderr for word in OVERRIDE_WORDS), proc.stderr


def _doctor_line(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, checks
    return found[0]


def test_doctor_warns_about_the_override_from_the_environment(env: pytest.MonkeyPatch) -> None:
    check = _doctor_line(run_checks(NOWHERE), "dev auth")
    assert check.status == OK
    assert "loopback only" in check.detail

    env.setenv("C2L_INSECURE_DEV_AUTH", "1")
    check = _doctor_line(run_checks(NOWHERE), "dev auth")
    assert check.status == WARN
    assert "C2L_INSECURE_DEV_AUTH=1" in check.detail
    assert "any user" in check.detail
    assert "C2L_AUTH_MODE=jwks" in check.hint

    env.setenv("C2L_AUTH_MODE", "jwks")  # the override means nothing without the dev issuer
    check = _doctor_line(run_checks(NOWHERE), "dev auth")
    assert check.status == OK
    assert "jwks" in check.detail


BANNER = re.compile(r'<div id="insecure-dev-auth" role="alert">([^<]*)</div>')


@pytest.mark.parametrize("override", [False, True])
async def test_the_page_shows_a_banner_with_the_override(tmp_path: Path, override: bool) -> None:
    with trio.fail_after(20):
        async with (
            open_gateway(tmp_path, metrics_addr="127.0.0.1:0", insecure_dev_auth=override) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        ):
            page = await http.get("/")
    assert page.status_code == 200
    found = BANNER.findall(page.text)
    if not override:
        assert found == [] and 'id="insecure-dev-auth"' not in page.text
        return
    assert len(found) == 1
    assert "any user" in found[0] and "C2L_AUTH_MODE=jwks" in found[0]
    # visible: its style is in the page's own stylesheet, which the CSP allows by hash
    assert "#insecure-dev-auth" in page.text.split("</style>")[0]
    assert "unsafe-inline" not in page.headers["content-security-policy"]


@pytest.mark.podman
def test_run_sh_refuses_a_non_loopback_host_in_dev_mode(tmp_path: Path) -> None:
    """``C2L_HOST=<not loopback> bash scripts/run.sh`` stops with the gateway's one line."""
    need_podman()  # run.sh sets the host up; skip (or fail in CI) where it cannot have
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2L_")}
    # TEST-NET-1: not an address of this machine, so even a regression binds nothing
    env.update(C2L_HOST="192.0.2.10", C2L_PORT=str(free_port()), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.Popen(
        ["bash", str(root / "scripts/run.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # run.sh's trap stops what it started
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"run.sh did not refuse:\n{out[-3000:]}")
    assert proc.returncode != 0, out[-3000:]
    refusal = [line for line in out.splitlines() if line.startswith("c2l serve: ")]
    assert len(refusal) == 1, out[-3000:]
    assert all(word in refusal[0] for word in OVERRIDE_WORDS), refusal
    assert "CloudToLocalLLM is running" not in out


def test_private_tunnels_are_warned_about_at_start_and_by_doctor(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """C2L_ALLOW_PRIVATE_TUNNELS (development and tests only, DESIGN.md section 5)."""
    check = _doctor_line(run_checks(NOWHERE), "tunnels")
    assert check.status == OK
    caplog.set_level(logging.INFO)
    _serve(capsys, "--host", "127.0.0.1")
    assert not [w for w in _warnings(caplog.records) if "TUNNELS" in w]

    env.setenv("C2L_ALLOW_PRIVATE_TUNNELS", "1")
    check = _doctor_line(run_checks(NOWHERE), "tunnels")
    assert check.status == WARN
    assert "C2L_ALLOW_PRIVATE_TUNNELS=1" in check.detail
    assert "unset" in check.hint
    caplog.clear()
    rc, _, err = _serve(capsys, "--host", "127.0.0.1")
    assert rc == 1 and "no Podman service answers" in err
    warned = [w for w in _warnings(caplog.records) if "C2L_ALLOW_PRIVATE_TUNNELS=1" in w]
    assert len(warned) == 1, _warnings(caplog.records)
    assert "development and tests only" in warned[0]

    env.setenv("C2L_ALLOW_PRIVATE_TUNNELS", "maybe")
    assert _doctor_line(run_checks(NOWHERE), "tunnels").status == "FAIL"
