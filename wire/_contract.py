"""Names the gateway, the orchestrator and the proxy must agree on (DESIGN.md section 2).

They live here, in the sans-IO protocol package, because the proxy's container image ships
``wire`` and ``proxy`` only: the proxy reads them without importing anything else.
"""

from __future__ import annotations

#: The TCP port the proxy listens on when it is given no socket (``python3 -m proxy`` run
#: by hand, tests). A session's proxy publishes no port: see :data:`SOCKET_ENV`.
PROXY_PORT = 8080
#: The directory, inside the container, where the orchestrator bind-mounts the session's
#: own host directory; the proxy's UNIX socket is :data:`SOCKET_NAME` in it.
SOCKET_DIR = "/run/c2l"
#: The proxy's listening socket's file name, in :data:`SOCKET_DIR` (and on the host, in
#: the session's directory).
SOCKET_NAME = "proxy.sock"
#: The environment variable that tells the proxy the path of the UNIX socket to listen on
#: (``SOCKET_DIR/SOCKET_NAME``); without it the proxy listens on TCP.
SOCKET_ENV = "C2L_PROXY_SOCKET"
#: The header that carries the session's secret on every WebSocket upgrade to the proxy.
SECRET_HEADER = "x-c2l-proxy-secret"
#: The environment variable that hands the proxy its session secret at container creation.
SECRET_ENV = "C2L_PROXY_SECRET"
#: The header that names a desktop agent on its ``/ws/bridge`` upgrade (``c2l desktop
#: --name``); the gateway passes it on to the proxy on the bridge's link upgrade. One user
#: may connect several desktops at once, each under its own name.
DESKTOP_NAME_HEADER = "x-c2l-desktop-name"
#: The name of a desktop whose agent gave none (an agent older than the header).
DEFAULT_DESKTOP_NAME = "default"
#: The longest desktop name.
MAX_DESKTOP_NAME = 64
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def valid_desktop_name(name: object) -> bool:
    """Whether ``name`` is a usable desktop name: 1-64 characters of ``[A-Za-z0-9._-]``.

    Names travel in headers, logs, query strings and state keys, so the alphabet is one
    that needs no escaping in any of them.
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_DESKTOP_NAME
        and all(c in _NAME_CHARS for c in name)
    )
