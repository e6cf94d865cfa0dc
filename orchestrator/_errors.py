"""The orchestrator's own exceptions: runtime errors are translated into these at the boundary."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error the orchestrator raises on purpose."""


class RuntimeUnavailable(OrchestratorError):
    """The container runtime cannot be reached at all (socket missing, refused, hung)."""


class RuntimeObjectError(OrchestratorError, RuntimeError):
    """The runtime refused or failed an operation on one named object."""

    def __init__(self, message: str, *, kind: str = "", name: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.status = status


class ObjectNotFound(RuntimeObjectError):
    """The named object does not exist (removal treats this as success)."""


class SessionStartError(OrchestratorError):
    """A session could not be brought to "ready"; nothing of it is left behind."""


class ShuttingDown(OrchestratorError):
    """The orchestrator is shutting down: it starts no session and hands out none."""


class SessionGone(OrchestratorError):
    """The session is not running (still starting, or ending): nothing can be started in it."""


class TooManySessions(OrchestratorError):
    """The gateway is at ``max_sessions``; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GatewayRunning(OrchestratorError):
    """Another gateway holds the runtime's replica lock: this one must not start."""


class ObjectsLeft(RuntimeUnavailable):
    """A stopping gateway could not remove every object it owns (the runtime stopped
    answering or kept refusing); the message names what is left and how to remove it."""
