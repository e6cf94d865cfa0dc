"""The command line explains itself: examples in every --help, one-line errors, no tracebacks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from c2l._cli import build_parser, main

C2L = [sys.executable, "-m", "c2l"]


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("serve",), ("image",), ("image", "build")..."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_every_command_is_covered() -> None:
    names = {" ".join(c) for c in COMMANDS}
    for expected in ("serve", "desktop", "token", "image build", "doctor", "sessions"):
        assert expected in names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "c2l")
def test_help_has_examples(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    examples = out.split("examples:", 1)[1]
    lines = [line.strip() for line in examples.splitlines()]
    # at least one runnable example of this very command
    assert any(line.startswith(" ".join(("c2l", *command))) for line in lines), out


BAD_INPUT = [
    (["serve", "--port", "x"], "--port"),
    (["serve", "--port", "70000"], "0-65535"),
    (["serve", "--idle-timeout", "-5"], "greater than 0"),
    (["serve", "--proxy-memory", "lots"], "512m"),
    (["serve", "--auth-mode", "magic"], "--auth-mode"),
    (["token"], "--sub"),
    (["token", "--sub", "a", "--ttl", "-5"], "greater than 0"),
    (["nope"], "invalid choice"),
    (["image"], "ACTION"),
    (["desktop", "--gateway", "ftp://x", "--token", "t"], "https://"),
    (["desktop", "--gateway", "http://127.0.0.1:1"], "--token"),
    (["desktop", "--gateway", "http://127.0.0.1:1", "--token-file", "/no/such/file"], "c2l token"),
    (["sessions", "--gateway", "http://127.0.0.1:1"], "c2l token"),
    (["sessions", "--gateway", "http://127.0.0.1:1", "--token", "x"], "127.0.0.1:1"),
    (["fake-ollama", "--port", "99999"], "0-65535"),
    (["image", "build", "--podman-url", "unix:///no/such.sock"], "c2l doctor"),
    (["serve", "--podman-url", "unix:///no/such.sock", "--port", "0"], "c2l doctor"),
]


@pytest.mark.parametrize(("argv", "hint"), BAD_INPUT, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_and_nonzero(argv: list[str], hint: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path),
        "C2L_PODMAN_WAIT": "1",
        "C2L_TOKEN": "",
    }
    env.pop("C2L_PODMAN_URL", None)
    proc = subprocess.run(
        [*C2L, *argv], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode not in (0, None), proc
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("c2l"), lines
    assert hint in lines[0], lines


def test_serve_shows_progress_while_waiting_for_podman(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "C2L_PODMAN_WAIT": "5"}
    argv = [*C2L, "serve", "--podman-url", "unix:///no/such.sock", "--port", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 1
    assert "waiting for the Podman service at unix:///no/such.sock" in proc.stdout
    assert "still waiting" in proc.stdout
    assert "podman system service" in proc.stderr


def test_unexpected_errors_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import c2l._cli as cli

    def boom(_: argparse.Namespace) -> int:
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_token", boom)
    assert main(["token", "--sub", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "c2l token: unexpected error: something broke (run with -v for details, and please"
        " report it)"
    ]
