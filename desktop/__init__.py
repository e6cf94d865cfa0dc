"""The desktop agent (``c2l desktop``).

The fake Ollama used to develop and test it is in :mod:`desktop.testing`.
"""

from c2lcore import Backoff as Backoff
from c2lcore import BackoffPolicy as BackoffPolicy

from ._agent import BRIDGE_PATH as BRIDGE_PATH
from ._agent import DEFAULT_OLLAMA_URL as DEFAULT_OLLAMA_URL
from ._agent import MAX_CHUNK_BYTES as MAX_CHUNK_BYTES
from ._agent import AgentConfig as AgentConfig
from ._agent import AgentConfigError as AgentConfigError
from ._agent import BodySplitter as BodySplitter
from ._agent import DesktopAgent as DesktopAgent
from ._agent import StaticToken as StaticToken
from ._agent import TokenError as TokenError
from ._agent import TokenFile as TokenFile
from ._agent import TokenSource as TokenSource
from ._agent import bridge_url as bridge_url
from ._agent import default_desktop_name as default_desktop_name
from ._agent import run_agent as run_agent
from ._agent import serve_agent as serve_agent
from ._direct import DEFAULT_DIRECT_PORT as DEFAULT_DIRECT_PORT
from ._direct import DirectAuth as DirectAuth
from ._direct import DirectEndpoint as DirectEndpoint
from ._direct import DirectEndpointError as DirectEndpointError
from ._direct import serve_direct as serve_direct
from ._ollama import BadPath as BadPath
from ._ollama import safe_path as safe_path
from ._tunnels import NGROK_AUTHTOKEN_ENV as NGROK_AUTHTOKEN_ENV
from ._tunnels import NGROK_SERVER_ADDR_ENV as NGROK_SERVER_ADDR_ENV
from ._tunnels import NgrokTunnel as NgrokTunnel
from ._tunnels import TunnelAuthError as TunnelAuthError
from ._tunnels import TunnelError as TunnelError
from ._tunnels import TunnelManager as TunnelManager
from ._tunnels import TunnelProvider as TunnelProvider
from ._tunnels import TunnelStatus as TunnelStatus
from ._tunnels import UrlTunnel as UrlTunnel
