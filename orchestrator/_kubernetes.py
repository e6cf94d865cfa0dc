"""The Kubernetes runtime: one Pod (and its Secret) per session, state from one pod watch.

Client: lightkube's :class:`~lightkube.AsyncClient`. It is async on httpx2 (httpx's
successor), whose connection pool (httpcore2) picks its trio backend through sniffio, so
every call is a cancellable trio checkpoint. Two parts of lightkube call asyncio directly
and are not used: its watch retry sleep (``asyncio.sleep`` in ``GenericAsyncClient.watch``,
reached only with an ``on_error`` handler that retries: the watch here raises on any error
and :meth:`KubernetesRuntime.watch_pods` retries itself with :class:`c2lcore.Backoff` and
``trio.sleep``) and exec-plugin credentials (``asyncio.create_subprocess_exec``): a
kubeconfig whose user needs an exec plugin is refused (:meth:`KubernetesRuntime.from_env`);
the service account's token file or a static token is used instead.

Cancellation follows the Podman runtime's rules (DESIGN.md section 6): the creation of a
session (Secret, Pod, the Secret's owner) runs shielded and bounded, and whatever it made
is removed again, shielded and bounded, when it fails or when the caller was cancelled
meanwhile; deletion is shielded and bounded, with a short grace period, and confirmed by
the watch (the DELETED event), waiting for which is bounded and cancellable.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from decimal import Decimal
from typing import Any, Final, Literal, TypeVar, cast

import attrs
import httpx2
import msgspec
import trio
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.client import LabelSelector
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod, Secret
from lightkube.types import PatchType

import wire
from c2lcore import Backoff, BackoffPolicy

from ._errors import ObjectNotFound, RuntimeObjectError, RuntimeUnavailable
from ._k8s_objects import SECRET_KEY, secret_name, session_pod, session_secret
from ._runtime import LABEL_REPLICA, LABEL_SESSION, LABEL_USER, PROXY_SELECTOR, pod_name

logger = logging.getLogger("c2l.orchestrator")

R = TypeVar("R", Pod, Secret)

#: The default namespace of a deployment (DESIGN.md section 6).
DEFAULT_NAMESPACE: Final = "cloudtolocalllm"

PodEventKind = Literal["ready", "unready", "died", "deleting", "gone"]


@attrs.frozen
class PodState:
    """What the watch knows of one proxy pod."""

    name: str
    user_hash: str
    session_id: str
    replica: str
    uid: str
    phase: str = "Pending"
    #: The pod's Ready condition (its readiness probe on ``/health`` passes).
    ready: bool = False
    ip: str | None = None
    #: ``metadata.deletionTimestamp`` is set: the pod is being deleted.
    deleting: bool = False
    #: The proxy container ended: its exit code and reason (``OOMKilled``, ``Error``...).
    exit_code: int | None = None
    reason: str | None = None

    @property
    def dead(self) -> bool:
        """The proxy no longer runs (with ``restartPolicy: Never`` it never will again)."""
        return self.exit_code is not None or self.phase in ("Succeeded", "Failed")


@attrs.frozen
class PodEvent:
    """A change of a proxy pod that the watch reports: ``ready``, ``unready``, ``died``
    (container terminated, OOMKilled), ``deleting`` (deletionTimestamp set), ``gone``."""

    kind: PodEventKind
    state: PodState


@attrs.frozen
class SessionPod:
    """A session's pod as :meth:`KubernetesRuntime.create_session` made or adopted it."""

    name: str
    user_hash: str
    session_id: str
    uid: str
    #: The session secret, from the session's Secret (another replica's when adopted).
    secret: str = attrs.field(repr=False)
    #: True when the pod was already there (409): another replica's, or an earlier one.
    adopted: bool = False


@attrs.frozen
class K8sObjects:
    """Names of the pods and secrets carrying a label."""

    pods: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pods or self.secrets)


def pod_state(obj: dict[str, Any]) -> PodState | None:
    """A proxy pod (as a JSON object) as a :class:`PodState`; None without a user label."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    user_hash = labels.get(LABEL_USER)
    if not user_hash:
        return None
    status = obj.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    exit_code: int | None = None
    reason: str | None = None
    for cs in status.get("containerStatuses") or ():
        terminated = (cs.get("state") or {}).get("terminated")
        if cs.get("name") == "proxy" and terminated:
            exit_code = int(terminated.get("exitCode", -1))
            reason = terminated.get("reason")
    return PodState(
        name=str(meta.get("name", "")),
        user_hash=str(user_hash),
        session_id=str(labels.get(LABEL_SESSION, "")),
        replica=str(labels.get(LABEL_REPLICA, "")),
        uid=str(meta.get("uid", "")),
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        ip=status.get("podIP") or None,
        deleting=bool(meta.get("deletionTimestamp")),
        exit_code=exit_code,
        reason=reason,
    )


def _transitions(old: PodState | None, new: PodState) -> Iterator[PodEventKind]:
    if new.deleting and not (old is not None and old.deleting):
        yield "deleting"
    if new.dead and not (old is not None and old.dead):
        yield "died"
    if new.ready and not (old is not None and old.ready):
        yield "ready"
    if old is not None and old.ready and not new.ready and not new.dead:
        yield "unready"


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@attrs.define(eq=False)
class KubernetesRuntime:
    """Sessions as Pods in ``namespace`` through a lightkube :class:`AsyncClient`.

    Build it with :meth:`from_env` (in-cluster service account or ``KUBECONFIG``) or
    :meth:`with_transport` (an httpx2 transport, e.g. the fake API server's). ``replica``
    labels what this gateway makes and is what :meth:`sweep` removes; ``owner`` (see
    :meth:`resolve_owner`) is the ownerReference that every session Pod gets, the
    replica's own Pod, so that Kubernetes garbage-collects the sessions of a replica that
    dies. Every method is a cancellable trio checkpoint; failures are raised as
    :class:`RuntimeUnavailable` or :class:`RuntimeObjectError`.
    """

    client: AsyncClient
    namespace: str = DEFAULT_NAMESPACE
    replica: str = ""
    owner: dict[str, str] | None = None
    #: Bound on one creation or one deletion (the API calls, not the pod's start).
    call_timeout: float = 30.0
    #: ``gracePeriodSeconds`` of a session's deletion (the proxy handles SIGTERM at once).
    delete_grace: int = 1
    #: Bound on waiting for the watch to confirm a deletion.
    confirm_timeout: float = 10.0
    backoff_policy: BackoffPolicy = attrs.Factory(lambda: BackoffPolicy(base=0.5, cap=10.0))
    server: str = "kubernetes"
    _pods: dict[str, PodState] = attrs.Factory(dict)
    _changed: trio.Event = attrs.Factory(trio.Event)
    _gone: dict[str, int] = attrs.Factory(dict)
    _relists: int = 0
    _watching: bool = False

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_env(cls, *, namespace: str = DEFAULT_NAMESPACE, **kw: Any) -> KubernetesRuntime:
        """In-cluster service-account credentials, else ``KUBECONFIG`` (or ~/.kube/config).

        Only credentials that need no subprocess: a token (file) or client certificates.
        lightkube runs exec plugins through asyncio, which does not run under trio.
        """
        try:
            config = KubeConfig.from_env().get()
        except (ConfigError, KeyError, OSError) as exc:
            raise RuntimeUnavailable(
                f"no Kubernetes credentials: not in a cluster (no service account) and no"
                f" usable KUBECONFIG ({exc})"
            ) from None
        if config is None:
            raise RuntimeUnavailable("KUBECONFIG names no current context")
        if config.user is not None and config.user.exec is not None:
            raise RuntimeUnavailable(
                f"KUBECONFIG user of context {config.context_name!r} authenticates with an"
                " exec plugin, which the gateway cannot run (lightkube runs it on asyncio):"
                " give it a token (a service account's) instead"
            )
        return cls.from_config(config, namespace=namespace, **kw)

    @classmethod
    def from_config(
        cls,
        config: SingleConfig | KubeConfig,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        transport: httpx2.AsyncBaseTransport | None = None,
        **kw: Any,
    ) -> KubernetesRuntime:
        """A runtime on ``config`` (and ``transport``, if given)."""
        try:
            client = AsyncClient(
                config=config,
                namespace=namespace,
                transport=transport,
                trust_env=False,
                timeout=httpx2.Timeout(10.0),
            )
        except (ConfigError, OSError) as exc:
            raise RuntimeUnavailable(f"Kubernetes configuration unusable: {exc}") from None
        return cls(client, namespace=namespace, server=client.config.cluster.server, **kw)

    @classmethod
    def with_transport(
        cls,
        transport: httpx2.AsyncBaseTransport,
        *,
        namespace: str = "default",
        server: str = "http://kubernetes.fake",
        **kw: Any,
    ) -> KubernetesRuntime:
        """A runtime whose every request goes to ``transport`` (tests: the fake API)."""
        from lightkube.config.models import Cluster, User

        config = KubeConfig.from_one(
            cluster=Cluster(server=server), user=User(token="test"), namespace=namespace
        )
        return cls.from_config(config, namespace=namespace, transport=transport, **kw)

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()

    async def __aenter__(self) -> KubernetesRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the boundary ----------------------------------------------------------------

    @contextlib.contextmanager
    def _translating(self, what: str, kind: str = "", name: str = "") -> Iterator[None]:
        try:
            yield
        except ApiError as exc:
            code = int(exc.status.code or 0)
            error = ObjectNotFound if code == 404 else RuntimeObjectError
            raise error(
                f"the Kubernetes API would not {what}: {exc.status.message} (HTTP {code})",
                kind=kind,
                name=name,
                status=code,
            ) from None
        except httpx2.HTTPStatusError as exc:
            code = exc.response.status_code
            raise RuntimeObjectError(
                f"the Kubernetes API would not {what} (HTTP {code})",
                kind=kind,
                name=name,
                status=code,
            ) from None
        except httpx2.TimeoutException:
            raise RuntimeUnavailable(
                f"the Kubernetes API at {self.server} did not answer ({what})"
            ) from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # An answer lightkube's models cannot read: fail this call (the watch restarts),
            # not the gateway.
            raise RuntimeObjectError(
                f"the Kubernetes API's answer to {what} is unreadable: {exc}",
                kind=kind,
                name=name,
            ) from None
        except (httpx2.HTTPError, OSError) as exc:
            raise RuntimeUnavailable(
                f"the Kubernetes API at {self.server} is not reachable ({what}): {exc}"
            ) from None

    async def _list(self, res: type[Pod] | type[Secret], selector: str) -> tuple[list[Any], str]:
        what = f"list {res.__name__.lower()}s labelled {selector}"
        items = self.client.list(res, namespace=self.namespace, labels=_labels(selector))
        gen = cast(AsyncGenerator[Any, None], items.__aiter__())
        try:
            with self._translating(what):
                objs = [obj.to_dict() async for obj in gen]
        finally:
            with trio.CancelScope(shield=True):
                await gen.aclose()
        return objs, items.resourceVersion

    async def _delete(self, res: type[Pod] | type[Secret], name: str, grace: int | None) -> bool:
        kind = res.__name__.lower()
        try:
            with self._translating(f"delete {kind} {name}", kind, name):
                await self.client.delete(res, name, namespace=self.namespace, grace_period=grace)
        except ObjectNotFound:
            return False
        return True

    # -- sessions --------------------------------------------------------------------

    async def resolve_owner(self) -> dict[str, str] | None:
        """Make the replica's own Pod (named ``replica``, from the downward API) the owner
        of every session Pod made from now on; return the ownerReference."""
        if not self.replica:
            return None
        with self._translating(f"read the replica's pod {self.replica}", "pod", self.replica):
            pod = await self.client.get(Pod, self.replica, namespace=self.namespace)
        meta = pod.to_dict()["metadata"]
        self.owner = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
        return self.owner

    async def create_session(
        self,
        *,
        user_hash: str,
        session_id: str,
        secret: str,
        image: str,
        memory: int = 512 * 1024**2,
        cpus: float = 0.5,
        **pod_options: Any,
    ) -> SessionPod:
        """Create the session's Secret and Pod, or adopt the live Pod of that name.

        The Secret first (the Pod reads the session secret from it), then the Pod, then
        the Secret's ownerReference to the Pod, so that deleting the Pod garbage-collects
        it. A 409 on the Pod means another replica (or an earlier session) has it: it is
        adopted as it is, never deleted, and its secret read from its Secret; one being
        deleted or dead is refused (:class:`RuntimeObjectError`, status 409: retry once
        the watch reports it gone). The steps run shielded and bounded by
        ``call_timeout``; when one fails, or when the caller was cancelled meanwhile,
        what this call made is deleted again (shielded, bounded) and nothing is left.
        """
        made: list[tuple[type[Pod] | type[Secret], str]] = []
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.call_timeout):
                    result = await self._create(
                        made, user_hash, session_id, secret, image, memory, cpus, pod_options
                    )
            except trio.TooSlowError:
                await self._undo(made)
                raise RuntimeObjectError(
                    f"creating the pod of user {user_hash} got no answer within"
                    f" {self.call_timeout:g} s",
                    kind="pod",
                    name=pod_name(user_hash),
                ) from None
            except Exception:
                await self._undo(made)
                raise
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            # The caller will never hear of the session: it must not outlive the call.
            with trio.CancelScope(shield=True):
                await self._undo(made)
            raise
        return result

    async def _create(
        self,
        made: list[tuple[type[Pod] | type[Secret], str]],
        user_hash: str,
        session_id: str,
        secret: str,
        image: str,
        memory: int,
        cpus: float,
        pod_options: dict[str, Any],
    ) -> SessionPod:
        pod, sname = pod_name(user_hash), secret_name(user_hash)
        secret_obj = session_secret(
            user_hash=user_hash,
            session_id=session_id,
            replica=self.replica,
            namespace=self.namespace,
            secret=secret,
        )
        own_secret = True
        try:
            with self._translating(f"create secret {sname}", "secret", sname):
                await self.client.create(_model(Secret, secret_obj))
            made.append((Secret, sname))
        except RuntimeObjectError as exc:
            if exc.status != 409:
                raise
            own_secret = False  # a live session's (adopted below), or one being made
        pod_obj = session_pod(
            user_hash=user_hash,
            session_id=session_id,
            replica=self.replica,
            image=image,
            namespace=self.namespace,
            secret_name=sname,
            memory=memory,
            cpus=cpus,
            owner=self.owner,
            **pod_options,
        )
        try:
            with self._translating(f"create pod {pod}", "pod", pod):
                created = await self.client.create(_model(Pod, pod_obj))
        except RuntimeObjectError as exc:
            if exc.status != 409:
                raise
            return await self._adopt(user_hash, own_secret)
        made.append((Pod, pod))
        uid = created.to_dict()["metadata"]["uid"]
        await self._own_secret(sname, pod, uid)
        value = secret if own_secret else await self._read_secret(sname)
        return SessionPod(pod, user_hash, session_id, uid, value, adopted=False)

    async def _adopt(self, user_hash: str, own_secret: bool) -> SessionPod:
        pod, sname = pod_name(user_hash), secret_name(user_hash)
        with self._translating(f"read pod {pod}", "pod", pod):
            existing = (await self.client.get(Pod, pod, namespace=self.namespace)).to_dict()
        state = pod_state(existing)
        if state is None or state.deleting or state.dead:
            why = "being deleted" if state is not None and state.deleting else "not running"
            raise RuntimeObjectError(
                f"pod {pod} of an earlier session is {why}: try again once it is gone",
                kind="pod",
                name=pod,
                status=409,
            )
        if own_secret:  # it was waiting for its Secret: ours is the one it will read
            await self._own_secret(sname, pod, state.uid)
        value = await self._read_secret(sname)
        logger.info("adopted pod %s (session %s, replica %r)", pod, state.session_id, state.replica)
        return SessionPod(pod, user_hash, state.session_id, state.uid, value, adopted=True)

    async def _own_secret(self, sname: str, pod: str, uid: str) -> None:
        owner = {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}
        with self._translating(f"make pod {pod} own secret {sname}", "secret", sname):
            await self.client.patch(
                Secret,
                sname,
                {"metadata": {"ownerReferences": [owner]}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )

    async def _read_secret(self, sname: str) -> str:
        with self._translating(f"read secret {sname}", "secret", sname):
            obj = (await self.client.get(Secret, sname, namespace=self.namespace)).to_dict()
        try:
            return base64.b64decode(obj["data"][SECRET_KEY]).decode()
        except (KeyError, TypeError, ValueError):
            raise RuntimeObjectError(
                f"secret {sname} holds no {SECRET_KEY!r}", kind="secret", name=sname
            ) from None

    async def _undo(self, made: list[tuple[type[Pod] | type[Secret], str]]) -> None:
        # Shielded by the callers; bounded here. The Pod first: its Secret goes with it.
        with trio.move_on_after(self.call_timeout) as bound:
            for res, name in reversed(made):
                try:
                    await self._delete(res, name, self.delete_grace if res is Pod else None)
                except (RuntimeObjectError, RuntimeUnavailable) as exc:
                    logger.warning("could not remove %s %s again: %s", res.__name__, name, exc)
        if bound.cancelled_caught:
            logger.warning("removing %s again timed out", [name for _, name in made])

    async def remove_session(self, user_hash: str, *, confirm: bool = True) -> bool:
        """Delete the session's Pod (grace ``delete_grace``) and Secret; missing is fine.

        The deletion calls are shielded and bounded (``call_timeout``). With ``confirm``
        and a running :meth:`watch_pods`, wait (cancellable, bounded by
        ``confirm_timeout``) until the watch sees the pod gone. Return True when it is
        known to be gone (confirmed, or it did not exist), False otherwise.
        """
        pod, sname = pod_name(user_hash), secret_name(user_hash)
        gone_before, relists_before = self._gone.get(pod, 0), self._relists
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.call_timeout):
                    existed = await self._delete(Pod, pod, self.delete_grace)
                    await self._delete(Secret, sname, None)
            except trio.TooSlowError:
                raise RuntimeObjectError(
                    f"deleting pod {pod} got no answer within {self.call_timeout:g} s",
                    kind="pod",
                    name=pod,
                ) from None
        if not existed:
            return True
        if not (confirm and self._watching):
            return False

        def gone() -> bool:
            if self._gone.get(pod, 0) > gone_before:
                return True
            return self._relists > relists_before and user_hash not in self._pods

        with trio.move_on_after(self.confirm_timeout):
            await self._wait_for(gone)
            return True
        logger.warning("pod %s: no DELETED within %g s", pod, self.confirm_timeout)
        return False

    async def sweep(self, replica: str | None = None) -> list[str]:
        """Delete the pods (and secrets) labelled with ``replica`` (this one's by default),
        and nothing else; return the pods' names."""
        replica = self.replica if replica is None else replica
        if not replica:
            raise ValueError("sweep needs a replica id: it never removes unlabelled objects")
        selector = f"{PROXY_SELECTOR},{LABEL_REPLICA}={replica}"
        objects = await self.list_labelled(selector)
        with trio.CancelScope(shield=True), trio.move_on_after(self.call_timeout):
            for name in objects.pods:
                await self._delete(Pod, name, self.delete_grace)
            for name in objects.secrets:
                await self._delete(Secret, name, None)
        return list(objects.pods)

    async def list_labelled(self, selector: str) -> K8sObjects:
        """The pods and secrets matching ``selector`` (``k=v,...``)."""
        pods, _ = await self._list(Pod, selector)
        secrets, _ = await self._list(Secret, selector)
        wanted = _labels(selector)
        return K8sObjects(
            tuple(o["metadata"]["name"] for o in pods if _matches(o, wanted)),
            tuple(o["metadata"]["name"] for o in secrets if _matches(o, wanted)),
        )

    async def ping(self) -> None:
        """Raise :class:`RuntimeUnavailable` unless the API answers (a get of a pod name
        that no session has: 404 is an answer; no list left half-read)."""
        try:
            with self._translating("read pods"):
                await self.client.get(Pod, "c2l-ping", namespace=self.namespace)
        except ObjectNotFound:
            pass

    async def pod_usage(self) -> dict[str, tuple[int | None, float | None]]:
        """Memory (working set, bytes) and CPU (cores) of every proxy pod, by user hash,
        from the metrics API (metrics-server); empty where the cluster has none."""
        items = self.client.list(
            _POD_METRICS, namespace=self.namespace, labels=_labels(PROXY_SELECTOR)
        )
        gen = cast(AsyncGenerator[Any, None], items.__aiter__())
        try:
            with self._translating("read the pods' metrics"):
                objs = [obj.to_dict() async for obj in gen]
        except ObjectNotFound:
            return {}  # no metrics API here
        finally:
            with trio.CancelScope(shield=True):
                await gen.aclose()
        out: dict[str, tuple[int | None, float | None]] = {}
        for obj in objs:
            uh = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_USER)
            if not uh:
                continue
            memory: int | None = None
            cpu: float | None = None
            for container in obj.get("containers") or []:
                usage = container.get("usage") or {}
                try:
                    memory = (memory or 0) + int(quantity(str(usage["memory"])))
                    cpu = (cpu or 0.0) + float(quantity(str(usage["cpu"])))
                except (KeyError, ValueError, ArithmeticError):
                    continue
            out[uh] = (memory, cpu)
        return out

    # -- the watch -------------------------------------------------------------------

    def state(self, user_hash: str) -> PodState | None:
        """The watch's view of the user's pod."""
        return self._pods.get(user_hash)

    def address(self, user_hash: str) -> tuple[str, int] | None:
        """Where the user's proxy listens (pod IP, :data:`wire.PROXY_PORT`), from the
        watch; None when it has no IP, is being deleted or has died."""
        state = self._pods.get(user_hash)
        if state is None or not state.ip or state.deleting or state.dead:
            return None
        return state.ip, wire.PROXY_PORT

    async def wait_ready(self, user_hash: str, uid: str | None = None) -> tuple[str, int]:
        """Wait (cancellable; bound it) until the watch sees the user's pod (the one with
        ``uid``, if given) ready; return its address. Raise :class:`RuntimeObjectError`
        if it dies or is deleted first."""
        result: list[tuple[str, int]] = []
        seen = False

        def settled() -> bool:
            nonlocal seen
            state = self._pods.get(user_hash)
            if state is None or (uid is not None and state.uid != uid):
                if seen:
                    raise RuntimeObjectError(
                        f"pod {pod_name(user_hash)} is gone before it was ready",
                        kind="pod",
                        name=pod_name(user_hash),
                    )
                return False
            seen = True
            if state.dead or state.deleting:
                what = f"died ({state.reason}, exit {state.exit_code})" if state.dead else ""
                raise RuntimeObjectError(
                    f"pod {state.name} {what or 'is being deleted'} before it was ready",
                    kind="pod",
                    name=state.name,
                )
            address = self.address(user_hash)
            if state.ready and address is not None:
                result.append(address)
                return True
            return False

        await self._wait_for(settled)
        return result[0]

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def watch_pods(
        self,
        selector: str,
        report: Callable[[PodEvent], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """List and watch the pods matching ``selector`` (:data:`PROXY_SELECTOR`); keep
        :meth:`state` and :meth:`address` current and ``report`` every change (ready,
        unready, died, deleting, gone). Runs until cancelled.

        Calls ``task_status.started()`` after the first successful list. Every failure
        (the API unreachable, an error answer, the stream broken) restarts list + watch
        after a backoff delay (:class:`c2lcore.Backoff`, ``trio.sleep``); 410 Gone (the
        version is too old) lists again at once. Pods that vanished meanwhile are reported
        ``gone`` by the new list.
        """
        backoff = Backoff(self.backoff_policy)
        started = False
        expired_in_a_row = 0
        while True:
            t0 = trio.current_time()

            def listed() -> None:
                nonlocal started
                if not started:
                    started = True
                    task_status.started()

            try:
                await self._list_and_watch(report, selector, listed)
            except _Expired:
                expired_in_a_row += 1
                logger.info("pod watch: resourceVersion expired (410), listing again")
                if expired_in_a_row == 1:
                    continue
            except (RuntimeUnavailable, RuntimeObjectError) as exc:
                expired_in_a_row = 0
                logger.warning("pod watch failed, restarting: %s", exc)
            finally:
                self._watching = False
            backoff.connection_lasted(trio.current_time() - t0)
            await trio.sleep(backoff.next_delay())

    async def _list_and_watch(
        self, report: Callable[[PodEvent], None], selector: str, listed: Callable[[], None]
    ) -> None:
        objs, version = await self._list(Pod, selector)
        self._relist(objs, report)
        self._watching = True
        listed()
        stream = self.client.watch(
            Pod, namespace=self.namespace, labels=_labels(selector), resource_version=version
        )
        gen = cast(AsyncGenerator[tuple[str, Any], None], stream)
        try:
            with self._translating("watch pods"):
                try:
                    async for event, obj in gen:
                        self._apply(event, obj.to_dict(), report)
                except ApiError as exc:
                    if exc.status.code == 410:
                        raise _Expired from None
                    raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await gen.aclose()
        raise RuntimeUnavailable("the pod watch ended")

    def _relist(self, objs: list[dict[str, Any]], report: Callable[[PodEvent], None]) -> None:
        seen: dict[str, PodState] = {}
        for obj in objs:
            state = pod_state(obj)
            if state is not None:
                seen[state.user_hash] = state
        for user_hash, old in list(self._pods.items()):
            new = seen.get(user_hash)
            if new is None or new.uid != old.uid:
                del self._pods[user_hash]
                self._gone[old.name] = self._gone.get(old.name, 0) + 1
                report(PodEvent("gone", old))
        for user_hash, now in seen.items():
            before = self._pods.get(user_hash)
            self._pods[user_hash] = now
            for kind in _transitions(before, now):
                report(PodEvent(kind, now))
        self._relists += 1
        self._notify()

    def _apply(self, event: str, obj: dict[str, Any], report: Callable[[PodEvent], None]) -> None:
        state = pod_state(obj)
        if state is None:
            return
        old = self._pods.get(state.user_hash)
        if event == "DELETED":
            if old is not None and old.uid == state.uid:
                del self._pods[state.user_hash]
            self._gone[state.name] = self._gone.get(state.name, 0) + 1
            report(PodEvent("gone", state))
        else:
            self._pods[state.user_hash] = state
            for kind in _transitions(old if old is None or old.uid == state.uid else None, state):
                report(PodEvent(kind, state))
        self._notify()


#: The metrics API's per-pod figures (metrics.k8s.io, served by metrics-server).
_POD_METRICS = create_namespaced_resource("metrics.k8s.io", "v1beta1", "PodMetrics", "pods")

_SUFFIXES: Final = {
    "Ki": Decimal(1024),
    "Mi": Decimal(1024**2),
    "Gi": Decimal(1024**3),
    "Ti": Decimal(1024**4),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "m": Decimal("0.001"),
    "u": Decimal("0.000001"),
    "n": Decimal("0.000000001"),
}


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity (``"20Mi"``, ``"3m"``, ``"123456n"``, ``"1.5"``) as a number."""
    text = text.strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return Decimal(text)


def _model(res: type[R], obj: dict[str, Any]) -> R:
    """``obj`` as lightkube's model, refused if that loses anything.

    lightkube's models drop the fields they do not know, silently: a misspelt hardening
    field (``readOnlyRootFileSystem``) would vanish before it reached the API server, and
    no schema check there could notice. So the model must give back exactly ``obj``.
    """
    what = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
    try:
        model = cast(R, res.from_dict(obj))
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise RuntimeObjectError(f"{what} is malformed: {exc}", kind=res.__name__.lower()) from None
    lost = _lost(obj, model.to_dict())
    if lost:
        raise RuntimeObjectError(
            f"{what}: lightkube's {res.__name__} model has no field {lost} (misspelt?)",
            kind=res.__name__.lower(),
        )
    return model


def _lost(sent: Any, kept: Any, path: str = "") -> str | None:
    """The first path of ``sent`` that ``kept`` lacks or changed, else None."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        for key, value in sent.items():
            if key not in kept:
                return f"{path}.{key}"
            found = _lost(value, kept[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        for i, (a, b) in enumerate(zip(sent, kept, strict=True)):
            found = _lost(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if sent == kept else path or "."


def _labels(selector: str) -> LabelSelector:
    """``k=v,k2`` as lightkube's label dict (equality and existence only)."""
    labels: LabelSelector = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            raise ValueError(f"label selector {selector!r}: only k=v and k are supported")
        key, sep, value = term.replace("==", "=").partition("=")
        labels[key] = value if sep else None
    return labels


def _matches(obj: dict[str, Any], wanted: LabelSelector) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(k in labels if v is None else labels.get(k) == v for k, v in wanted.items())


__all__ = [
    "DEFAULT_NAMESPACE",
    "K8sObjects",
    "KubernetesRuntime",
    "PodEvent",
    "PodState",
    "SessionPod",
    "pod_state",
]
