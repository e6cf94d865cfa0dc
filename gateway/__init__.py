"""The gateway: authentication, session API, WebSocket relays, Ollama-compatible API."""

from ._app import create_app as create_app
from ._auth import Authenticator as Authenticator
from ._auth import AuthError as AuthError
from ._auth import DevIssuer as DevIssuer
from ._auth import JwksAuthenticator as JwksAuthenticator
from ._auth import Principal as Principal
from ._serve import RunningGateway as RunningGateway
from ._serve import ServeError as ServeError
from ._serve import run_gateway as run_gateway
from ._serve import serve_gateway as serve_gateway
from ._state import Gateway as Gateway
