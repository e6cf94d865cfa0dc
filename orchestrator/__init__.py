"""The orchestrator: one rootless Podman network + pod + proxy container per user session.

Public surface: :func:`open_orchestrator` and :class:`Orchestrator`, the :class:`Session`
it hands out, the :class:`ContainerRuntime` interface with its Podman implementation
(:class:`PodmanRuntime`), and the exceptions it raises. The in-memory runtime for tests
(``FakeRuntime``) is in :mod:`orchestrator.testing`.
"""

from __future__ import annotations

from ._errors import GatewayRunning as GatewayRunning
from ._errors import ObjectNotFound as ObjectNotFound
from ._errors import ObjectsLeft as ObjectsLeft
from ._errors import OrchestratorError as OrchestratorError
from ._errors import RuntimeObjectError as RuntimeObjectError
from ._errors import RuntimeUnavailable as RuntimeUnavailable
from ._errors import SessionGone as SessionGone
from ._errors import SessionStartError as SessionStartError
from ._errors import ShuttingDown as ShuttingDown
from ._errors import TooManySessions as TooManySessions
from ._janitor import SweepProgress as SweepProgress
from ._k8s_sessions import KubernetesSessions as KubernetesSessions
from ._k8s_sessions import open_kubernetes_sessions as open_kubernetes_sessions
from ._kubernetes import KubernetesRuntime as KubernetesRuntime
from ._orchestrator import Orchestrator as Orchestrator
from ._orchestrator import Probe as Probe
from ._orchestrator import Usage as Usage
from ._orchestrator import open_orchestrator as open_orchestrator
from ._orchestrator import remove_labelled as remove_labelled
from ._podman import PodmanRuntime as PodmanRuntime
from ._podman_api import AsyncPodmanClient as AsyncPodmanClient
from ._podman_api import PodmanClient as PodmanClient
from ._replica import replica_lock_path as replica_lock_path
from ._runtime import LABEL_PROXY as LABEL_PROXY
from ._runtime import LABEL_REPLICA as LABEL_REPLICA
from ._runtime import LABEL_SESSION as LABEL_SESSION
from ._runtime import LABEL_USER as LABEL_USER
from ._runtime import PROXY_SELECTOR as PROXY_SELECTOR
from ._runtime import RUNTIME_RESERVE as RUNTIME_RESERVE
from ._runtime import ContainerRuntime as ContainerRuntime
from ._runtime import LabelledObjects as LabelledObjects
from ._runtime import PlacesProxies as PlacesProxies
from ._runtime import ProxySpec as ProxySpec
from ._runtime import container_name as container_name
from ._runtime import network_name as network_name
from ._runtime import object_labels as object_labels
from ._runtime import pod_name as pod_name
from ._session import Session as Session
from ._session import SessionState as SessionState
from ._shared import KubernetesState as KubernetesState
from ._shared import LocalState as LocalState
from ._shared import SharedState as SharedState
from ._sockets import ProxyTarget as ProxyTarget
from ._sockets import SessionDirs as SessionDirs
from ._sockets import fallback_sessions_dir as fallback_sessions_dir
from ._sockets import http_health_probe as http_health_probe
from ._sockets import open_proxy_stream as open_proxy_stream
from ._sockets import proxy_get as proxy_get
from ._sockets import sessions_dir_path as sessions_dir_path
