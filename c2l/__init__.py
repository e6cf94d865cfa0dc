"""The ``c2l`` command line and the configuration shared by the components."""

from ._config import Config as Config
from ._config import ConfigError as ConfigError
from ._config import user_hash as user_hash
