"""The command line explains itself: examples in every --help, one-line errors, no tracebacks."""

from __future__ import annotations

import argparse
import ast
import logging
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import c2l._cli as cli
from c2l._cli import CommandError, build_parser, log_handler, main, map_exceptions
from c2lcore import Config

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
    def boom(_: argparse.Namespace) -> int:
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_token", boom)
    assert main(["token", "--sub", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "c2l token: unexpected error: something broke (run with -v for details, and please"
        " report it)"
    ]


def _serve_once(status: int, body: bytes) -> tuple[ThreadingHTTPServer, str]:
    """A local HTTP server answering every GET with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("verbose", [False, True])
def test_library_chatter_only_with_verbose(verbose: bool) -> None:
    # httpx logs each request at INFO ("HTTP Request: GET ..."): c2l serve made four such
    # lines per session created. They are heard with -v only; our own lines always are.
    server, url = _serve_once(403, b'{"message": "needs c2l:admin"}')
    try:
        argv = [*C2L, *(["-v"] if verbose else []), "sessions", "--gateway", url, "--token", "t"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1, proc
    assert ("HTTP Request: GET" in proc.stderr) is verbose, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("c2l sessions:")]
    assert len(errors) == 1, proc.stderr
    assert "HTTP 403: needs c2l:admin" in errors[0]


def test_the_desktop_agent_keeps_httpx_quiet_even_with_verbose() -> None:
    # The agent's requests go to the user's own Ollama: their URLs are user data.
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "HTTP Request: GET /x", (), None)
    ours = logging.LogRecord("c2l.desktop", logging.INFO, __file__, 1, "connected", (), None)
    loud = logging.LogRecord("httpx", logging.WARNING, __file__, 1, "retrying", (), None)
    for verbose, quiet, heard in [
        (False, False, False),
        (True, False, True),
        (True, True, False),
        (False, True, False),
    ]:
        handler = log_handler(verbose=verbose, quiet_libraries=quiet)
        assert bool(handler.filter(record)) is heard
        assert handler.filter(ours)
        assert handler.filter(loud)


def test_fake_ollama_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*C2L, "fake-ollama", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith(f"c2l fake-ollama: cannot listen on 127.0.0.1:{port}:"), proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_map_exceptions_translates_only_what_it_is_told() -> None:
    class Expected(Exception):
        pass

    with pytest.raises(CommandError, match=r"^the fix$") as raised, map_exceptions(Expected):
        raise Expected("the fix")
    assert raised.value.exit_code == 1
    with pytest.raises(CommandError) as raised, map_exceptions(Expected, exit_code=2):
        raise Expected("bad setting")
    assert raised.value.exit_code == 2
    with pytest.raises(KeyError), map_exceptions(Expected):
        raise KeyError("a bug stays a bug")


def test_serve_entry_point_raises_the_components_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run_gateway knows nothing of the CLI: no CommandError, no exception group, the
    # orchestrator's own exception with the message the CLI prints.
    from gateway import run_gateway
    from orchestrator import RuntimeUnavailable

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = Config(
        podman_url=f"unix://{tmp_path}/no/podman.sock",
        port=0,
        metrics_addr="127.0.0.1:0",
        dev_key_path=tmp_path / "dev.pem",
    )
    with pytest.raises(RuntimeUnavailable, match=r"not reachable: run `c2l doctor`"):
        run_gateway(config)


def test_no_function_of_the_cli_package_is_over_80_lines() -> None:
    for path in sorted(Path(cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 80, f"{path.name}: {node.name} has {length} lines"
