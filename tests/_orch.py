"""Helpers for the orchestrator's unit tests on the in-memory runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from c2lcore import Config
from orchestrator import Orchestrator, open_orchestrator
from orchestrator.testing import FakeRuntime


def make_config(**kw: Any) -> Config:
    """A configuration whose Podman socket does not exist (the fake runtime is used)."""
    return Config(podman_url="unix:///nonexistent/podman.sock", **kw)


async def ready_probe(socket_path: str) -> bool:
    """A health probe that says every proxy is ready at once."""
    await trio.lowlevel.checkpoint()
    return True


@asynccontextmanager
async def running(
    fake: FakeRuntime, config: Config | None = None, **kw: Any
) -> AsyncIterator[Orchestrator]:
    """An orchestrator on ``fake`` with the ready probe unless another is given."""
    kw.setdefault("probe", ready_probe)
    async with open_orchestrator(config or make_config(), fake, **kw) as orch:
        yield orch


async def until(predicate: Callable[[], bool], step: float = 0.01) -> None:
    """Wait (bounded by the caller's timeout) until ``predicate()`` holds."""
    while not predicate():
        await trio.sleep(step)
