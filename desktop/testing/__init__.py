"""Test doubles for the desktop agent (as :mod:`trio.testing` is for trio).

:class:`FakeOllama` speaks Ollama's real HTTP protocol (NDJSON and the OpenAI-compatible
SSE) on trio; ``c2l fake-ollama`` runs it as a program (:func:`run_fake_ollama`).
"""

from __future__ import annotations

from ._fake_ollama import DEFAULT_MODELS as DEFAULT_MODELS
from ._fake_ollama import RUNNER_ERROR as RUNNER_ERROR
from ._fake_ollama import BlobRecord as BlobRecord
from ._fake_ollama import CancelledRequest as CancelledRequest
from ._fake_ollama import FakeModel as FakeModel
from ._fake_ollama import FakeOllama as FakeOllama
from ._fake_ollama import RecordedRequest as RecordedRequest
from ._fake_ollama import fake_models as fake_models
from ._fake_ollama import make_tokens as make_tokens
from ._fake_ollama import run_fake_ollama as run_fake_ollama
from ._fake_ollama import serve_fake_ollama as serve_fake_ollama
