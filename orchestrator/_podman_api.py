"""The one client of Podman's REST API (libpod): where it is, its prefix, what its errors mean.

Every caller talks to Podman through this module: the runtime (:class:`AsyncPodmanClient`,
cancellable under trio) and the command line's start-up wait, ``c2l doctor`` and
``c2l image build`` (:class:`PodmanClient`, blocking). Both build their httpx client from
the same URL forms and translate failures the same way, into the orchestrator's
exceptions: :class:`RuntimeUnavailable` when the service cannot be reached at all,
:class:`ObjectNotFound` or :class:`RuntimeObjectError` when it answers with an error.
Written against Podman 4.3.1 (``/v4.0.0/libpod`` paths).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from ._errors import ObjectNotFound, RuntimeObjectError, RuntimeUnavailable

#: The libpod API prefix of every path (Podman 4.x answers it).
API = "/v4.0.0/libpod"

#: Podman 4.3 answers 500 "no such pod"/"no pod with ID ... found" when an object vanished
#: between a listing and a call (e.g. a pod removed with its network).
_NOT_FOUND = re.compile(r"no such (pod|container|network)|no (pod|container|network) with", re.I)

Params = Mapping[str, str] | Sequence[tuple[str, str]]


def _query(params: Params | None) -> tuple[tuple[str, str], ...] | None:
    """Query parameters as httpx takes them (a repeated key, like ``changes``, stays)."""
    if params is None:
        return None
    return tuple(params.items()) if isinstance(params, Mapping) else tuple(params)


def _endpoint(url: str) -> tuple[str | None, str]:
    """``unix:///path`` or ``http://host:port`` (``tcp://`` too) -> (socket path, base URL)."""
    if url.startswith("unix://"):
        return url.removeprefix("unix://"), "http://podman" + API
    if url.startswith(("http://", "https://", "tcp://")):
        scheme = "https" if url.startswith("https://") else "http"
        return None, f"{scheme}://" + url.split("://", 1)[1].rstrip("/") + API
    raise RuntimeUnavailable(f"podman URL {url!r}: use unix:///path/podman.sock")


@contextlib.contextmanager
def _reaching(url: str, what: str) -> Iterator[None]:
    """Translate transport failures (no socket, refused, hung) into RuntimeUnavailable."""
    try:
        yield
    except httpx.TimeoutException:
        raise RuntimeUnavailable(
            f"podman socket {url} did not answer ({what}): run `c2l doctor`"
        ) from None
    except (httpx.TransportError, OSError) as exc:
        raise RuntimeUnavailable(
            f"podman socket {url} not reachable: run `c2l doctor` ({exc})"
        ) from None


def _answer(response: httpx.Response, *, what: str, kind: str, name: str) -> Any:
    """The decoded body of a 2xx answer (JSON, else text, None when empty); raise otherwise."""
    if response.status_code >= 400:
        try:
            message = response.json().get("message") or response.text
        except (ValueError, AttributeError):
            message = response.text
        gone = response.status_code == 404 or _NOT_FOUND.search(str(message)) is not None
        error = ObjectNotFound if gone else RuntimeObjectError
        raise error(
            f"podman could not {what}: {str(message).strip()} (HTTP {response.status_code})",
            kind=kind,
            name=name,
            status=response.status_code,
        )
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


class PodmanClient:
    """Blocking calls to the Podman REST service at ``url`` (for the command line).

    ``request`` returns the decoded answer and raises the orchestrator's exceptions;
    :meth:`close` (or ``with``) releases the connection.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        uds, base = _endpoint(url)
        transport = httpx.HTTPTransport(uds=uds) if uds else httpx.HTTPTransport()
        self.http = httpx.Client(
            transport=transport,
            base_url=base,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            trust_env=False,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        kind: str = "",
        name: str = "",
        params: Params | None = None,
        body: Any = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``method path`` (below the API prefix); ``what`` completes "podman could not ..."."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        with _reaching(self.url, what):
            response = self.http.request(
                method,
                path,
                params=_query(params),
                json=body,
                content=content,
                headers=headers,
                **extra,
            )
        return _answer(response, what=what, kind=kind, name=name)

    def close(self) -> None:
        """Release the connection."""
        self.http.close()

    def __enter__(self) -> PodmanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPodmanClient:
    """The same calls, cancellable under trio (httpx through anyio): the runtime's client.

    One connection pool is shared by all calls; :meth:`aclose` releases it. :attr:`http`
    is there for the one streaming call (the event stream), which translates its own
    failures.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        uds, base = _endpoint(url)
        transport = httpx.AsyncHTTPTransport(uds=uds) if uds else httpx.AsyncHTTPTransport()
        self.http = httpx.AsyncClient(
            transport=transport,
            base_url=base,
            timeout=httpx.Timeout(timeout, connect=5.0),
            trust_env=False,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        kind: str = "",
        name: str = "",
        params: Params | None = None,
        body: Any = None,
    ) -> Any:
        """``method path`` (below the API prefix); ``what`` completes "podman could not ..."."""
        with _reaching(self.url, what):
            response = await self.http.request(method, path, params=_query(params), json=body)
        return _answer(response, what=what, kind=kind, name=name)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()
