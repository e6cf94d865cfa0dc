"""The shared core below every component: the configuration, the one backoff, JWT checks.

Nothing here imports a component (gateway, orchestrator, proxy, desktop), the wire protocol
or the CLI; they all may import it. The contract's constants that the proxy needs inside
its container (port, secret header and variable) are in :mod:`wire`, which the proxy image
ships. The layers are declared with import-linter in pyproject.toml.
"""

from ._backoff import Backoff as Backoff
from ._backoff import BackoffPolicy as BackoffPolicy
from ._config import DEFAULT_IMAGE as DEFAULT_IMAGE
from ._config import INSECURE_DEV_AUTH_WARNING as INSECURE_DEV_AUTH_WARNING
from ._config import SERVICE_SOCKET as SERVICE_SOCKET
from ._config import Config as Config
from ._config import ConfigError as ConfigError
from ._config import config_dir as config_dir
from ._config import default_podman_url as default_podman_url
from ._config import insecure_dev_auth_from_env as insecure_dev_auth_from_env
from ._config import is_loopback as is_loopback
from ._config import parse_memory as parse_memory
from ._config import user_hash as user_hash
from ._jwt import DIRECT_AUDIENCE as DIRECT_AUDIENCE
from ._jwt import DIRECT_ISSUER as DIRECT_ISSUER
from ._jwt import DIRECT_TOKEN_TTL_S as DIRECT_TOKEN_TTL_S
from ._jwt import AuthCode as AuthCode
from ._jwt import AuthError as AuthError
from ._jwt import JwksAuthenticator as JwksAuthenticator
from ._jwt import Principal as Principal
from ._jwt import bearer_token as bearer_token
from ._jwt import decode_token as decode_token
