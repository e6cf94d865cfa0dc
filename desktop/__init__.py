"""The desktop agent (``c2l desktop``) and the fake Ollama used to develop and test it."""

from ._fake_ollama import DEFAULT_MODELS as DEFAULT_MODELS
from ._fake_ollama import CancelledRequest as CancelledRequest
from ._fake_ollama import FakeModel as FakeModel
from ._fake_ollama import FakeOllama as FakeOllama
from ._fake_ollama import RecordedRequest as RecordedRequest
from ._fake_ollama import cli_fake_ollama as cli_fake_ollama
from ._fake_ollama import make_tokens as make_tokens
from ._fake_ollama import serve_fake_ollama as serve_fake_ollama
