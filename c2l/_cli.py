"""The ``c2l`` console script: one entry point, a subcommand per job (DESIGN.md section 2).

This is the top layer: it parses arguments, calls each component's plain entry point
(``gateway.run_gateway``, ``desktop.run_agent``, ...) and, at this one boundary, turns the
errors a user can act on into one line and an exit code (:func:`map_exceptions`, in the
manner of httpcore's). Anything else is an unexpected error: one line too, and the
traceback with ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn, TypeAlias

from c2lcore import DEFAULT_IMAGE, PRIVATE_TUNNELS_WARNING, Config, ConfigError, default_podman_url


class CommandError(Exception):
    """A failure the user can act on: printed as one line, no traceback.

    ``exit_code`` is 1, or 2 for settings that cannot be used (as argparse's usage errors).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def map_exceptions(*expected: type[Exception], exit_code: int = 1) -> Iterator[None]:
    """Turn the ``expected`` errors of a component into :class:`CommandError` (same message).

    The components raise their own exceptions with messages that name the fix; which of
    them are a user's to act on is decided here, at the CLI's boundary.
    """
    try:
        yield
    except expected as exc:
        raise CommandError(str(exc), exit_code=exit_code) from exc


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors that point at ``--help`` (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help' for usage and examples)\n")


_EPILOG_MAIN = """\
examples:
  c2l serve                                          # the gateway on 127.0.0.1:8080
  c2l desktop --gateway http://127.0.0.1:8080 --token "$(c2l token --sub alice)"
  c2l doctor                                         # is this host ready for rootless Podman?
  open http://127.0.0.1:8080/ in a browser          # the web chat page

Run 'c2l COMMAND --help' for a command's options and examples.
"""

_EPILOG_IMAGE = """\
examples:
  c2l image build                # build localhost/c2l-proxy:latest (no registry needed)
  c2l image build --force        # rebuild even if the current image is there
  c2l image build --gateway      # the gateway's image, for Kubernetes (c2l k8s manifests)
"""


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 0-65535")
    return value


def _positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number greater than 0")
    return value


#: How long ``c2l serve`` waits for the Podman REST service to answer before giving up.
PODMAN_WAIT_S = 20.0


_EPILOG_SERVE = """\
examples:
  c2l serve                                  # dev issuer, local rootless Podman, port 8080
  C2L_AUTH_MODE=jwks C2L_JWKS_URL=https://tenant/.well-known/jwks.json \\
    C2L_JWT_ISSUER=https://tenant/ C2L_JWT_AUDIENCE=c2l \\
    c2l serve --host 0.0.0.0 --port 443 --tls-cert cert.pem --tls-key key.pem \\
    --public-url https://c2l.example.com
  (development auth, the default, serves loopback only: see --insecure-dev-auth)
"""

_EPILOG_DESKTOP = """\
examples:
  c2l desktop --gateway http://127.0.0.1:8080 --token "$(c2l token --sub alice)"
  c2l desktop --gateway https://c2l.example.com --token-file ~/.config/c2l/token
"""


# --------------------------------------------------------------------------- commands


def _serve(args: argparse.Namespace) -> int:
    from gateway import ServeError, run_gateway
    from orchestrator import OrchestratorError

    config = Config.from_env(
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_mode=args.auth_mode,
        jwks_url=args.jwks_url,
        jwt_issuer=args.jwt_issuer,
        jwt_audience=args.jwt_audience,
        oidc_client_id=args.oidc_client_id,
        podman_url=args.podman_url,
        proxy_image=args.proxy_image,
        idle_timeout=args.idle_timeout,
        cleanup_interval=args.cleanup_interval,
        health_interval=args.health_interval,
        heartbeat_interval=args.heartbeat_interval,
        resume_window=args.resume_window,
        max_sessions=args.max_sessions,
        proxy_memory=args.proxy_memory,
        max_blob=args.max_blob,
        proxy_cpus=args.proxy_cpus,
        insecure_dev_auth=args.insecure_dev_auth,
        public_url=args.public_url,
        metrics_addr=args.metrics_addr,
    )
    if config.dev_auth_warning:
        where = f"{config.host}:{config.port}"
        logging.getLogger("c2l.serve").warning("%s (serving on %s)", config.dev_auth_warning, where)
    if config.allow_private_tunnels:
        logging.getLogger("c2l.serve").warning("%s", PRIVATE_TUNNELS_WARNING)
    if config.oidc_warning:
        logging.getLogger("c2l.serve").warning("%s", config.oidc_warning)
    try:
        wait = float(os.environ.get("C2L_PODMAN_WAIT") or PODMAN_WAIT_S)
    except ValueError:
        raise CommandError("C2L_PODMAN_WAIT is not a number of seconds: unset it") from None
    if config.runtime == "podman":  # on Kubernetes the API server is checked at start
        _wait_for_podman(config.podman_url, wait)
    with map_exceptions(ServeError, OrchestratorError):
        run_gateway(config)
    return 0


def _podman_ping(url: str) -> str | None:
    """The Podman version answering at ``url`` ("?" if it answers but not with its
    version in time), or None when nothing answers.

    The ping is ``/_ping``, which Podman answers at once; ``/version`` can take seconds on a
    busy service (4.4 s here with a thousand pods and a sweep going on), so it is asked
    only for the start-up note, with a bound of its own.
    """
    from orchestrator import OrchestratorError, PodmanClient

    try:
        with PodmanClient(url, timeout=2) as podman:
            podman.request("GET", "/_ping", what="answer a ping")
            try:
                answer = podman.request(
                    "GET", "/version", what="report its version", timeout=VERSION_TIMEOUT_S
                )
            except OrchestratorError:
                return "?"
    except OrchestratorError:
        return None
    version = answer.get("Version") if isinstance(answer, dict) else None
    return str(version) if version else "?"


#: How long ``c2l serve``'s start-up note waits for Podman's version (cosmetic).
VERSION_TIMEOUT_S = 5.0


def _wait_for_podman(url: str, timeout: float) -> None:
    """Wait (with progress) until the Podman REST service at ``url`` answers."""
    if not url.startswith("unix://"):
        return  # a TCP service: the orchestrator reports it if it does not answer
    version = _podman_ping(url)
    if version is None:
        print(f"c2l serve: waiting for the Podman service at {url} ...", flush=True)
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 3
        while version is None and time.monotonic() < deadline:
            time.sleep(0.5)
            version = _podman_ping(url)
            left = deadline - time.monotonic()
            if version is None and time.monotonic() >= next_note and left >= 1:
                print(f"c2l serve: still waiting for Podman ({left:.0f} s left) ...", flush=True)
                next_note += 3
    if version is None:
        raise CommandError(
            f"no Podman service answers at {url} after {timeout:.0f} s: start it with"
            f" `podman system service --time=0 {url} &` (or scripts/run.sh), then run"
            " `c2l doctor`"
        )
    print(f"c2l serve: Podman {version} answers at {url}", flush=True)


def _token(args: argparse.Namespace) -> int:
    from gateway import DevIssuer

    config = Config.from_env()
    issuer = DevIssuer.load_or_create(config.dev_key_path)
    print(issuer.sign(args.sub, admin=args.admin, ttl=args.ttl))
    return 0


def _desktop(args: argparse.Namespace) -> int:
    from desktop import (
        DEFAULT_DIRECT_PORT,
        NGROK_AUTHTOKEN_ENV,
        NGROK_SERVER_ADDR_ENV,
        AgentConfig,
        AgentConfigError,
        DirectEndpointError,
        NgrokTunnel,
        StaticToken,
        TokenFile,
        TokenSource,
        TunnelProvider,
        UrlTunnel,
        run_agent,
    )

    if args.token_file:
        path = Path(args.token_file).expanduser()
        if not path.is_file():
            raise CommandError(
                f"token file {path} not found: write your token there first, e.g."
                f" `c2l token --sub alice > {path}`"
            )
        if not os.access(path, os.R_OK):
            raise CommandError(f"token file {path} is not readable: chmod 600 it as your user")
    with map_exceptions(AgentConfigError, exit_code=2):
        token: TokenSource
        if args.token_file:
            token = TokenFile(Path(args.token_file).expanduser())
        elif args.token and args.token.strip():
            token = StaticToken(args.token)
        else:
            raise AgentConfigError("--token is empty: pass a JWT (c2l token --sub USER)")
        tunnel: TunnelProvider | None = None
        if args.tunnel == "url":
            if not args.tunnel_url:
                raise AgentConfigError("--tunnel url needs --tunnel-url https://...")
            tunnel = UrlTunnel(args.tunnel_url)
        elif args.tunnel == "ngrok":
            # The authtoken never goes on the command line (ps shows argv to every user).
            authtoken = os.environ.get(NGROK_AUTHTOKEN_ENV, "")
            if args.ngrok_authtoken_file:
                try:
                    authtoken = Path(args.ngrok_authtoken_file).expanduser().read_text().strip()
                except OSError as exc:
                    raise AgentConfigError(
                        f"--ngrok-authtoken-file {args.ngrok_authtoken_file}: {exc.strerror}"
                    ) from None
            tunnel = NgrokTunnel(
                authtoken,
                domain=args.ngrok_domain,
                # For tests only: a listener on 127.0.0.1 instead of ngrok's cloud.
                server_addr=os.environ.get(NGROK_SERVER_ADDR_ENV) or None,
            )
        elif args.tunnel_url or args.ngrok_domain or args.ngrok_authtoken_file:
            raise AgentConfigError("--tunnel-url and --ngrok-* need --tunnel url or ngrok")
        direct_port = args.direct_port
        if direct_port is None and (tunnel is not None or args.no_bridge):
            direct_port = DEFAULT_DIRECT_PORT
        config = AgentConfig(
            gateway_url=args.gateway,
            token=token,
            ollama_url=args.ollama,
            direct_port=direct_port,
            tunnel=tunnel,
            bridge=not args.no_bridge,
            **({"name": args.name} if args.name is not None else {}),
        )
    with map_exceptions(DirectEndpointError):
        run_agent(config)
    return 0


def _fake_ollama(args: argparse.Namespace) -> int:
    from desktop.testing import run_fake_ollama

    try:
        run_fake_ollama(args.host, args.port, delay=args.delay)
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    return 0


def _sessions(args: argparse.Namespace) -> int:
    from ._sessions import SessionsError, cli_sessions

    with map_exceptions(SessionsError):
        return cli_sessions(args)


def _image_build(args: argparse.Namespace) -> int:
    from orchestrator import OrchestratorError
    from orchestrator._k8s_objects import DEFAULT_GATEWAY_IMAGE

    from ._image import PROXY, ImageBuildError, build, gateway_recipe

    podman_url = args.podman_url or os.environ.get("C2L_PODMAN_URL") or default_podman_url()
    with map_exceptions(ImageBuildError, OrchestratorError):
        if args.gateway:
            build(args.tag or DEFAULT_GATEWAY_IMAGE, podman_url, bool(args.force), gateway_recipe())
        else:
            tag = args.tag or os.environ.get("C2L_PROXY_IMAGE") or DEFAULT_IMAGE
            build(tag, podman_url, bool(args.force), PROXY)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import run_doctor

    podman_url = args.podman_url or os.environ.get("C2L_PODMAN_URL") or default_podman_url()
    return run_doctor(podman_url)


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="c2l",
        description="CloudToLocalLLM: reach the Ollama on your desktop from any browser.",
        epilog=_EPILOG_MAIN,
        formatter_class=_FMT,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_serve,
        _add_desktop,
        _add_token,
        _add_sessions,
        _add_image,
        _add_doctor,
        _add_fake_ollama,
        _add_chat,
        _add_k8s,
    ):
        add(sub)
    return parser


_FMT = argparse.RawDescriptionHelpFormatter
_Subcommands: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _add_serve(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "serve", help="run the gateway and orchestrator", epilog=_EPILOG_SERVE, formatter_class=_FMT
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port to listen on (default 8080)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS and WSS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--auth-mode", choices=["dev", "jwks"], help="C2L_AUTH_MODE")
    p.add_argument("--jwks-url", help="C2L_JWKS_URL")
    p.add_argument("--jwt-issuer", help="C2L_JWT_ISSUER")
    p.add_argument("--jwt-audience", help="C2L_JWT_AUDIENCE")
    p.add_argument(
        "--oidc-client-id",
        help="C2L_OIDC_CLIENT_ID: the page's client id at the issuer (jwks mode): offers Sign in",
    )
    p.add_argument("--podman-url", help="C2L_PODMAN_URL, e.g. unix:///run/c2l/podman.sock")
    p.add_argument("--proxy-image", help="C2L_PROXY_IMAGE")
    p.add_argument("--idle-timeout", type=_positive_float, help="C2L_IDLE_TIMEOUT seconds (600)")
    p.add_argument(
        "--cleanup-interval", type=_positive_float, help="C2L_CLEANUP_INTERVAL seconds (60)"
    )
    p.add_argument(
        "--health-interval", type=_positive_float, help="C2L_HEALTH_INTERVAL seconds (30)"
    )
    p.add_argument(
        "--heartbeat-interval", type=_positive_float, help="C2L_HEARTBEAT_INTERVAL seconds (30)"
    )
    p.add_argument(
        "--resume-window",
        type=_positive_float,
        help="C2L_RESUME_WINDOW seconds (30): how long a dropped client's answers are kept",
    )
    p.add_argument("--max-sessions", type=_positive_int, help="C2L_MAX_SESSIONS")
    p.add_argument("--proxy-memory", help="C2L_PROXY_MEMORY (512m)")
    p.add_argument("--proxy-cpus", type=_positive_float, help="C2L_PROXY_CPUS (0.5)")
    p.add_argument(
        "--max-blob", help="C2L_MAX_BLOB: largest blob upload to /api/ollama/api/blobs (64m)"
    )
    p.add_argument(
        "--public-url", help="C2L_PUBLIC_URL: the URL clients use, e.g. https://c2l.example.com"
    )
    p.add_argument(
        "--metrics-addr", help="C2L_METRICS_ADDR: host:port of /metrics (127.0.0.1:9464)"
    )
    p.add_argument(
        "--insecure-dev-auth",
        action="store_true",
        default=None,
        help="C2L_INSECURE_DEV_AUTH=1: allow development auth off loopback (anyone can sign in)",
    )
    p.set_defaults(func=_serve)


def _add_desktop(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "desktop",
        help="run the desktop agent",
        epilog=_EPILOG_DESKTOP,
        formatter_class=_FMT,
    )
    p.add_argument("--gateway", required=True, help="gateway base URL, e.g. https://host")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", help="JWT for the gateway")
    tok.add_argument("--token-file", help="file holding the JWT (re-read when it changes)")
    p.add_argument(
        "--ollama", default="http://127.0.0.1:11434", help="local Ollama base URL (%(default)s)"
    )
    # The direct route (DESIGN.md section 5): an endpoint on 127.0.0.1 and its tunnel.
    p.add_argument(
        "--tunnel",
        choices=("off", "ngrok", "url"),
        default="off",
        help="give the direct endpoint a public URL: ngrok (NGROK_AUTHTOKEN), or url"
        " (--tunnel-url, forwarded by you) (%(default)s)",
    )
    p.add_argument("--tunnel-url", help="the public https URL that reaches --direct-port")
    p.add_argument(
        "--direct-port",
        type=_port,
        help="port of the direct endpoint on 127.0.0.1 (0: any free port; 11480 when a"
        " tunnel or --no-bridge is used; without them no direct endpoint runs)",
    )
    p.add_argument("--ngrok-domain", help="a reserved ngrok domain, e.g. me.ngrok.app")
    p.add_argument(
        "--ngrok-authtoken-file",
        help="file holding the ngrok authtoken (else NGROK_AUTHTOKEN; never on the command line)",
    )
    p.add_argument(
        "--no-bridge",
        action="store_true",
        help="do not connect /ws/bridge: serve only the direct route (blocked WebSockets)",
    )
    p.add_argument(
        "--name",
        help="this desktop's name, 1-64 characters of A-Z a-z 0-9 . _ - (default: the host"
        " name); each of a user's desktops needs its own, a newer agent of the same name"
        " replaces the older one",
    )
    p.set_defaults(func=_desktop)


def _add_token(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "token",
        help="print a JWT from the local development issuer",
        epilog="examples:\n  c2l token --sub alice\n  c2l token --sub root --admin --ttl 600\n",
        formatter_class=_FMT,
    )
    p.add_argument("--sub", required=True, help="the user (JWT subject)")
    p.add_argument("--admin", action="store_true", help="grant c2l:admin")
    p.add_argument(
        "--ttl", type=_positive_int, default=3600, help="lifetime in seconds (%(default)s)"
    )
    p.set_defaults(func=_token)


def _add_sessions(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "sessions",
        help="list live sessions through the admin API",
        epilog=(
            "examples:\n"
            "  c2l sessions --gateway http://127.0.0.1:8080 --token-file admin.token\n"
            '  C2L_TOKEN="$(c2l token --sub root --admin)" c2l sessions --gateway URL\n'
        ),
        formatter_class=_FMT,
    )
    p.add_argument("--gateway", required=True, help="gateway base URL, e.g. https://host")
    stok = p.add_mutually_exclusive_group()
    stok.add_argument("--token", help="admin JWT (default: $C2L_TOKEN)")
    stok.add_argument("--token-file", help="file holding the admin JWT")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead")
    p.set_defaults(func=_sessions)


def _add_image(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "image", help="manage the proxy image", epilog=_EPILOG_IMAGE, formatter_class=_FMT
    )
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = isub.add_parser(
        "build",
        help="build the proxy image offline (no container registry needed)",
        epilog="examples:\n  c2l image build\n  c2l image build --tag localhost/c2l-proxy:dev\n",
        formatter_class=_FMT,
    )
    b.add_argument("--tag", help="image name (default: C2L_PROXY_IMAGE or localhost/c2l-proxy)")
    b.add_argument("--podman-url", help="C2L_PODMAN_URL")
    b.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    b.add_argument(
        "--gateway",
        action="store_true",
        help="build the gateway's image instead (Kubernetes; default localhost/c2l-gateway)",
    )
    b.set_defaults(func=_image_build)


def _add_doctor(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this host for rootless Podman readiness",
        epilog="examples:\n  c2l doctor\n  C2L_PODMAN_URL=unix:///run/c2l/podman.sock c2l doctor\n",
        formatter_class=_FMT,
    )
    p.add_argument("--podman-url", help="C2L_PODMAN_URL")
    p.set_defaults(func=_doctor)


def _add_fake_ollama(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "fake-ollama",
        help="run a fake Ollama for development and tests",
        epilog="examples:\n  c2l fake-ollama --port 11434 --delay 0.05\n",
        formatter_class=_FMT,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=11434)
    p.add_argument(
        "--delay", type=_positive_float, default=0.02, help="seconds per token (%(default)s)"
    )
    p.set_defaults(func=_fake_ollama)


_EPILOG_CHAT = """\
examples:
  c2l chat --gateway https://c2l.example.com --token-file ~/.config/c2l/token \\
    --model llama3.2 --message "why is the sky blue?"
  c2l chat --prefer-local --gateway http://127.0.0.1:8080 --token "$(c2l token --sub alice)" \\
    --model llama3.2                            # interactive: one message per line, Ctrl-D ends
routes, in order (DESIGN.md section 5): the local Ollama with --prefer-local; the gateway
(which says cloud or direct); the desktop's tunnel, only when the gateway is unreachable
(your token then goes through the tunnel); the local Ollama as the last resort.
"""


def _chat(args: argparse.Namespace) -> int:
    from ._chat import ChatError, cli_chat

    with map_exceptions(ChatError):
        return cli_chat(args)


def _add_chat(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with your model in the terminal, through the first route that answers",
        epilog=_EPILOG_CHAT,
        formatter_class=_FMT,
    )
    p.add_argument("--gateway", required=True, help="gateway base URL, e.g. https://host")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", help="your JWT for the gateway")
    tok.add_argument("--token-file", help="file holding your JWT")
    p.add_argument("--model", required=True, help="the model to ask, e.g. llama3.2")
    p.add_argument("--message", help="send this one message, print the answer and exit")
    p.add_argument(
        "--prefer-local", action="store_true", help="try the local Ollama before the gateway"
    )
    p.add_argument(
        "--ollama", default="http://127.0.0.1:11434", help="local Ollama base URL (%(default)s)"
    )
    p.add_argument(
        "--first-token-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds a route may take to start answering before the next (%(default)s)",
    )
    p.set_defaults(func=_chat)


_EPILOG_K8S = """\
examples:
  c2l k8s manifests > deploy/kubernetes.yaml      # the shipped file (defaults)
  c2l k8s manifests --namespace c2l --image registry.example.com/c2l-gateway:1.0 \\
    --proxy-image registry.example.com/c2l-proxy:1.0 | kubectl apply -f -
  c2l k8s manifests --session-pod alice          # the Pod and Secret of alice's session
"""


def _k8s_manifests(args: argparse.Namespace) -> int:
    from ._k8s import cli_manifests

    with map_exceptions(ValueError, exit_code=2):
        text = cli_manifests(
            namespace=args.namespace,
            image=args.image,
            proxy_image=args.proxy_image,
            replicas=args.replicas,
            session_user=args.session_pod,
        )
    sys.stdout.write(text)
    return 0


def _add_k8s(sub: _Subcommands) -> None:
    p = sub.add_parser(
        "k8s",
        help="the Kubernetes deployment (DESIGN.md section 6)",
        epilog=_EPILOG_K8S,
        formatter_class=_FMT,
    )
    ksub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    m = ksub.add_parser(
        "manifests",
        help="print the Kubernetes deployment as multi-document YAML",
        epilog=_EPILOG_K8S,
        formatter_class=_FMT,
    )
    m.add_argument("--namespace", help="namespace (default cloudtolocalllm)")
    m.add_argument("--image", help="the gateway's image (default localhost/c2l-gateway:latest)")
    m.add_argument("--proxy-image", help="the proxy's image (default C2L_PROXY_IMAGE or ours)")
    m.add_argument("--replicas", type=_positive_int, help="gateway replicas (default 3)")
    m.add_argument(
        "--session-pod",
        metavar="USER",
        help="print instead the Pod and Secret a session of USER would get",
    )
    m.set_defaults(func=_k8s_manifests)


# --------------------------------------------------------------------------- logging and main

#: Libraries that log every request they make at INFO (httpx: one line per Podman REST
#: call, four per session created): below WARNING they are heard only with ``-v``.
CHATTY_LIBRARIES = frozenset({"httpx", "httpcore"})


class _LibraryChatter(logging.Filter):
    """Drop the chatty libraries' records below WARNING; keep everything of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name.split(".", 1)[0] in CHATTY_LIBRARIES
        return record.levelno >= logging.WARNING or not library


def log_handler(*, verbose: bool, quiet_libraries: bool) -> logging.Handler:
    """The CLI's log handler on stderr (one line per record), filtered unless verbose.

    ``quiet_libraries`` holds even with ``-v`` where the libraries' lines would carry user
    data (the desktop agent's requests to the user's Ollama).
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if quiet_libraries or not verbose:
        handler.addFilter(_LibraryChatter())
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``c2l`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(args.verbose or os.environ.get("C2L_DEBUG"))
    # httpx logs every request URL at INFO: the query strings of the user's requests to
    # Ollama are user data, so the desktop agent's stay out of the log even with -v.
    handler = log_handler(verbose=verbose, quiet_libraries=args.command == "desktop")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CommandError as exc:
        print(f"c2l {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"c2l {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Not a failure we foresaw: still one line, and the details on request.
        if args.verbose:
            traceback.print_exc()
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            f"c2l {args.command}: unexpected error: {what} (run with -v for details, and"
            " please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
