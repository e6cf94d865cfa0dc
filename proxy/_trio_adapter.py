"""Run the lean proxy server in-process under trio (tests and the fake runtime only).

The container runs :mod:`proxy._server` directly and never imports this module (its
image has no trio). Here the blocking server loop runs in one worker thread, and a
cancellation of the calling trio task wakes the loop through its self-pipe, so the thread
ends promptly and is always joined: no thread outlives the task.
"""

from __future__ import annotations

from typing import Any, NoReturn

import trio

from ._server import ProxyServer


async def run_proxy_server(
    server: ProxyServer, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Serve ``server`` in a worker thread until cancelled; reports its address when ready
    (:attr:`ProxyServer.address`: the TCP port, or the UNIX socket's path).

    The server is closed on the way out, whether it was cancelled or failed.
    """
    try:
        async with trio.open_nursery() as nursery:

            async def stop_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    server.stop()  # wakes the loop's selector: the thread returns promptly

            nursery.start_soon(stop_when_cancelled)
            # The listener is bound and listening already: connections made from now on
            # wait in its backlog until the thread accepts them.
            task_status.started(server.address)
            # Not abandoned on cancel: trio waits for the thread, which stop() ends at
            # its next wake-up; the loop's own waits are all bounded or woken.
            await trio.to_thread.run_sync(server.serve_forever)
            # run_sync does not raise Cancelled itself: a checkpoint delivers it, if any.
            await trio.lowlevel.checkpoint()
            raise RuntimeError("the proxy server stopped although nobody stopped it")
    finally:
        server.close()


async def serve_proxy(
    host: str,
    port: int,
    *,
    secret: str,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    **limits: Any,
) -> NoReturn:
    """Serve one user's proxy on ``host:port`` until cancelled; reports the bound port.

    ``limits`` are :class:`ProxyServer` settings (``high_water``, ``slow_consumer_s``...).
    """
    if not secret:
        raise ValueError("the proxy needs a session secret (C2L_PROXY_SECRET)")
    # getaddrinfo and bind can block (a host name): not on the trio thread.
    server = await trio.to_thread.run_sync(
        lambda: ProxyServer.bind(host, port, secret=secret, **limits)
    )
    await run_proxy_server(server, task_status=task_status)


async def serve_proxy_unix(
    path: str,
    *,
    secret: str,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    **limits: Any,
) -> NoReturn:
    """Serve one user's proxy on the UNIX socket ``path`` until cancelled, as the
    container does (``C2L_PROXY_SOCKET``); reports ``path`` once listening.

    The socket's file is removed when the server closes. ``limits`` as for
    :func:`serve_proxy`.
    """
    if not secret:
        raise ValueError("the proxy needs a session secret (C2L_PROXY_SECRET)")
    server = await trio.to_thread.run_sync(
        lambda: ProxyServer.bind_unix(path, secret=secret, **limits)
    )
    await run_proxy_server(server, task_status=task_status)
