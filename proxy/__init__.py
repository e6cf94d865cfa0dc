"""The per-user streaming proxy that runs inside each user's container (memory only).

``python3 -m proxy`` (the container) runs the lean, trio-free server of ``_server``.
:func:`serve_proxy`, the trio-friendly way to run the same server in-process (tests, the
fake runtime), lives in ``_trio_adapter`` and is imported only when first used, so that
importing this package never imports trio: the container's image does not even ship it.
"""

from typing import TYPE_CHECKING, Any

from ._hub import Hub as Hub
from ._hub import Link as Link
from ._server import SECRET_HEADER as SECRET_HEADER
from ._server import ProxyServer as ProxyServer
from ._server import main as main

if TYPE_CHECKING:
    from ._trio_adapter import run_proxy_server as run_proxy_server
    from ._trio_adapter import serve_proxy as serve_proxy
    from ._trio_adapter import serve_proxy_unix as serve_proxy_unix
else:

    def __getattr__(name: str) -> Any:
        """Import the trio adapter on first use of its names (PEP 562)."""
        if name in ("serve_proxy", "serve_proxy_unix", "run_proxy_server"):
            from . import _trio_adapter

            return getattr(_trio_adapter, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
