"""Test doubles for the orchestrator (as :mod:`trio.testing` is for trio).

:class:`FakeRuntime` is an in-memory :class:`~orchestrator.ContainerRuntime` with fault
injection; :func:`open_fake_runtime` gives one whose in-process proxies live inside an
``async with`` block. :class:`FakeKubernetes` (:func:`open_fake_kubernetes`) is an
in-process fake of the Kubernetes API server for the Kubernetes runtime;
:func:`serve_fake_kubernetes_http` serves it over HTTP on 127.0.0.1 to other processes
(gateway replicas), which :func:`write_kubeconfig` points at it. Not part of the
production surface: nothing outside tests imports it.
"""

from __future__ import annotations

from ._fake import FakeNetwork as FakeNetwork
from ._fake import FakePod as FakePod
from ._fake import FakeRuntime as FakeRuntime
from ._fake import Fault as Fault
from ._fake import FaultAction as FaultAction
from ._fake import open_fake_runtime as open_fake_runtime
from ._fake_k8s import SCHEMA_VERSION as SCHEMA_VERSION
from ._fake_k8s import FakeKubernetes as FakeKubernetes
from ._fake_k8s import Hold as Hold
from ._fake_k8s import open_fake_kubernetes as open_fake_kubernetes
from ._fake_k8s import serve_fake_kubernetes_http as serve_fake_kubernetes_http
from ._fake_k8s import write_kubeconfig as write_kubeconfig
