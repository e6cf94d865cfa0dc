"""Names the gateway, the orchestrator and the proxy must agree on (DESIGN.md section 2).

They live here, in the sans-IO protocol package, because the proxy's container image ships
``wire`` and ``proxy`` only: the proxy reads them without importing anything else.
"""

from __future__ import annotations

#: The port the proxy listens on inside its container (published on 127.0.0.1 by the pod).
PROXY_PORT = 8080
#: The header that carries the session's secret on every WebSocket upgrade to the proxy.
SECRET_HEADER = "x-c2l-proxy-secret"
#: The environment variable that hands the proxy its session secret at container creation.
SECRET_ENV = "C2L_PROXY_SECRET"
