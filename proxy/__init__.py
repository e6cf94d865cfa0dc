"""The per-user streaming proxy that runs inside each user's container (memory only)."""

from ._hub import Hub as Hub
from ._hub import Link as Link
from ._server import SECRET_HEADER as SECRET_HEADER
from ._server import ProxyServer as ProxyServer
from ._server import main as main
from ._server import serve_proxy as serve_proxy
