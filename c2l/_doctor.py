"""``c2l doctor``: is this host ready to run rootless Podman sessions? (DESIGN.md section 3)

One aligned line per check, ``OK``, ``WARN`` or ``FAIL``, with a fix hint on anything that
is not OK. The exit code is non-zero only when a check FAILs, that is when the host
cannot run sessions; WARN means sessions run but something (capacity, resource limits)
is not as it should be.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs

from c2lcore import (
    DEFAULT_IMAGE,
    INSECURE_DEV_AUTH_WARNING,
    PRIVATE_TUNNELS_WARNING,
    SERVICE_SOCKET,
    ConfigError,
    allow_private_tunnels_from_env,
    insecure_dev_auth_from_env,
)
from orchestrator import RUNTIME_RESERVE, ObjectNotFound, OrchestratorError, PodmanClient

#: The unprivileged user whose rootless Podman serves a gateway that runs as root.
SERVICE_USER = os.environ.get("C2L_SVC_USER") or "c2lsvc"
_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@attrs.frozen
class Check:
    """The outcome of one check: a status, what was found, and how to fix it."""

    name: str
    status: str
    detail: str
    hint: str = ""


@attrs.define
class _Host:
    """What the checks share: the Podman user, the socket, and what the service said."""

    podman_url: str
    user: str
    home: Path
    uid: int
    client: PodmanClient | None = None
    info: dict[str, Any] | None = None


def _service_user() -> tuple[str, Path, int]:
    """The user whose rootless Podman the gateway uses: c2lsvc for root, else ourselves."""
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return SERVICE_USER, Path(f"/home/{SERVICE_USER}"), -1
    else:
        pw = pwd.getpwuid(os.geteuid())
    return pw.pw_name, Path(pw.pw_dir), pw.pw_uid


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN)


def _check_binaries(host: _Host) -> Iterator[Check]:
    podman = _which("podman")
    if podman is None:
        yield Check("podman", FAIL, "not installed", "apt-get install podman")
    else:
        try:
            out = subprocess.run(
                [podman, "--version"], capture_output=True, text=True, timeout=20, check=False
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            out = f"unusable ({exc})"
        yield Check("podman", OK, out or podman)
    for binary, package, why in (
        ("runc", "runc", "OCI runtime that works on hybrid cgroups"),
        ("slirp4netns", "slirp4netns", "rootless networking"),
        ("newuidmap", "uidmap", "rootless user namespaces"),
        ("iptables", "iptables", "netavark needs it for networks"),
    ):
        path = _which(binary)
        if path:
            yield Check(binary, OK, path)
        else:
            yield Check(binary, FAIL, f"not installed ({why})", f"apt-get install {package}")


def _subid_ranges(path: Path, user: str, uid: int) -> int:
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[2].isdigit():
            total += int(parts[2])
    return total


def _check_subids(host: _Host) -> Iterator[Check]:
    if host.uid < 0:
        yield Check(
            "service user",
            FAIL,
            f"user {host.user} does not exist",
            f"useradd -m {host.user} (or run `bash scripts/run.sh` as root)",
        )
        return
    for kind in ("subuid", "subgid"):
        count = _subid_ranges(Path(f"/etc/{kind}"), host.user, host.uid)
        if count >= 65536:
            yield Check(kind, OK, f"{host.user} has {count} ids")
        else:
            yield Check(
                kind,
                FAIL,
                f"{host.user} has {count} ids in /etc/{kind} (65536 needed)",
                f"usermod --add-sub{kind[3:]}s 100000-165535 {host.user}",
            )


def _check_tun(host: _Host) -> Iterator[Check]:
    tun = Path("/dev/net/tun")
    try:
        mode = tun.stat().st_mode
    except OSError:
        yield Check("/dev/net/tun", FAIL, "missing", "modprobe tun (slirp4netns needs it)")
        return
    if os.geteuid() == 0:
        usable = bool(mode & stat.S_IROTH and mode & stat.S_IWOTH)  # the service user is "other"
    else:
        usable = os.access(tun, os.R_OK | os.W_OK)
    if usable:
        yield Check("/dev/net/tun", OK, f"read/write for {host.user} ({stat.filemode(mode)})")
    else:
        yield Check(
            "/dev/net/tun",
            FAIL,
            f"not read/writable by {host.user} ({stat.filemode(mode)})",
            "chmod 666 /dev/net/tun (slirp4netns opens it as the service user)",
        )


def _containers_conf(host: _Host) -> dict[str, Any]:
    """containers.conf as Podman merges it: system files, then the user's."""
    merged: dict[str, Any] = {}
    xdg = host.home / ".config"
    if os.geteuid() == host.uid and os.environ.get("XDG_CONFIG_HOME"):
        xdg = Path(os.environ["XDG_CONFIG_HOME"])
    paths = [
        Path("/usr/share/containers/containers.conf"),
        Path("/etc/containers/containers.conf"),
        *sorted(Path("/etc/containers/containers.conf.d").glob("*.conf")),
        xdg / "containers/containers.conf",
        *sorted((xdg / "containers/containers.conf.d").glob("*.conf")),
    ]
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        for table, values in data.items():
            if isinstance(values, dict):
                merged.setdefault(table, {}).update(values)
    return merged


def _check_conf(host: _Host) -> Iterator[Check]:
    conf = _containers_conf(host)
    where = f"~{host.user}/.config/containers/containers.conf"
    keyring = conf.get("containers", {}).get("keyring", True)
    if keyring is False:
        yield Check("keyring", OK, "keyring = false")
    else:
        yield Check(
            "keyring",
            WARN,
            "every container makes a session keyring: about 98 pods, then 'disk quota exceeded'",
            f"set [containers] keyring = false in {where}",
        )
    locks = conf.get("engine", {}).get("num_locks", 2048)
    if isinstance(locks, int) and locks >= 4096:
        yield Check("num_locks", OK, f"num_locks = {locks}")
    else:
        yield Check(
            "num_locks",
            WARN,
            f"num_locks = {locks}: pods + containers share them (about {int(locks) // 3} users)",
            f"set [engine] num_locks = 8192 in {where}, then `podman system renumber`",
        )


def _connect(host: _Host) -> Iterator[Check]:
    url = host.podman_url
    if url.startswith("unix://"):
        path = url[len("unix://") :]
        if not Path(path).exists():
            yield Check(
                "REST socket",
                FAIL,
                f"{url} does not exist",
                "start it: `bash scripts/run.sh` (root) or "
                "`podman system service --time=0 unix://$XDG_RUNTIME_DIR/podman/podman.sock &`",
            )
            return
    client: PodmanClient | None = None
    try:
        client = PodmanClient(url, timeout=10.0)
        ping = client.request("GET", "/_ping", what="answer a ping")
        version = client.request("GET", "/version", what="report its version")
        info = client.request("GET", "/info", what="report its host information")
    except OrchestratorError as exc:
        if client is not None:
            client.close()
        yield Check(
            "REST socket",
            FAIL,
            f"{url} does not answer ({exc})",
            "restart the service: `bash scripts/run.sh`, or check its log /run/c2l/podman.log",
        )
        return
    if str(ping).strip() != "OK" or not isinstance(version, dict) or not isinstance(info, dict):
        client.close()
        yield Check("REST socket", FAIL, f"{url} _ping answered {str(ping)[:80]!r}", "")
        return
    host.client, host.info = client, info
    yield Check("REST socket", OK, f"{url} (Podman {version.get('Version', '?')}, API ok)")


def _check_service(host: _Host) -> Iterator[Check]:
    if host.info is None:
        for name in ("OCI runtime", "rootless", "storage", "resource limits", "proxy image"):
            yield Check(name, SKIP, "REST socket unreachable")
        return
    h = host.info.get("host", {})
    runtime = (h.get("ociRuntime") or {}).get("name", "?")
    cgroup = str(h.get("cgroupVersion", "?"))
    hybrid = cgroup == "v1" and Path("/sys/fs/cgroup/unified").is_dir()
    layout = f"cgroup {cgroup}{' (hybrid)' if hybrid else ''}"
    if runtime == "crun" and cgroup == "v1":
        yield Check(
            "OCI runtime",
            FAIL,
            f"crun on {layout}: 'cgroups in hybrid mode not supported'",
            'apt-get install runc; set [engine] runtime = "runc" in containers.conf, restart',
        )
    else:
        yield Check("OCI runtime", OK, f"{runtime} on {layout}")
    rootless = (h.get("security") or {}).get("rootless")
    if rootless:
        yield Check("rootless", OK, "the service runs rootless")
    else:
        yield Check(
            "rootless",
            WARN,
            "the Podman service runs as root",
            f"run it as an unprivileged user ({SERVICE_USER}): `bash scripts/run.sh`",
        )
    driver = (host.info.get("store") or {}).get("graphDriverName", "?")
    if driver == "overlay":
        yield Check("storage", OK, "overlay")
    else:
        yield Check(
            "storage",
            WARN,
            f"driver {driver}: every container copies the whole image",
            'set [storage] driver = "overlay" in ~/.config/containers/storage.conf',
        )
    yield limits_check(cgroup, bool(rootless), h.get("cgroupControllers") or (), host.user)
    yield from _check_image(host)


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def limits_check(cgroup: str, rootless: bool, controllers: Iterable[str], user: str) -> Check:
    """Which proxy limit is enforced by which mechanism on this host.

    Podman enforces the memory, cpu and pids limits through cgroups: always as root, and
    rootless only on cgroup v2 for the controllers delegated to ``user`` (the service
    reports them); rootless on cgroup v1 it drops them all. The address-space limit
    (RLIMIT_AS, from C2L_PROXY_MEMORY) needs no cgroups and holds everywhere.
    """
    kinds = ("memory", "cpu", "pids")
    if not rootless:
        enforced = list(kinds)
    elif cgroup == "v2":
        enforced = [k for k in kinds if k in set(controllers)]
    else:
        enforced = []
    missing = [k for k in kinds if k not in enforced]
    where = f"cgroup {cgroup}{' rootless' if rootless else ''}"
    parts = []
    if enforced:
        parts.append(f"{_and(enforced)} by cgroups")
    if "memory" in enforced:
        parts.append("memory also as RLIMIT_AS per process")
    else:
        gib = RUNTIME_RESERVE / 1024**3
        parts.append(f"memory as RLIMIT_AS only (C2L_PROXY_MEMORY + {gib:g} GiB per process)")
    unbounded = [k for k in missing if k != "memory"]
    if unbounded:
        parts.append(f"{_and(unbounded)} not enforced")
    detail = f"{where}: {'; '.join(parts)}"
    if not missing:
        return Check("resource limits", OK, detail)
    if cgroup == "v2":
        hint = f"delegate the {_and(missing)} controller(s) to {user} (systemd Delegate=)"
    else:
        hint = "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2) to enforce them all"
    return Check("resource limits", WARN, detail, hint)


def _check_image(host: _Host) -> Iterator[Check]:
    from ._image import HASH_LABEL

    assert host.client is not None
    tag = os.environ.get("C2L_PROXY_IMAGE") or DEFAULT_IMAGE
    try:
        data = host.client.request(
            "GET", f"/images/{quote(tag, safe='')}/json", what=f"inspect image {tag}"
        )
    except ObjectNotFound:
        yield Check("proxy image", FAIL, f"{tag} not found", "c2l image build")
        return
    except OrchestratorError as exc:
        yield Check("proxy image", FAIL, f"{tag}: {exc}", "c2l image build")
        return
    labels = (data.get("Config") or {}).get("Labels") or {}
    size = int(data.get("Size", 0)) / 1e6
    try:
        from ._image import source_hash

        current = labels.get(HASH_LABEL) == source_hash()
    except Exception:  # no checkout next to c2l: cannot tell, the image is what it is
        current = True
    if current:
        yield Check("proxy image", OK, f"{tag} ({size:.1f} MB)")
    else:
        yield Check(
            "proxy image",
            WARN,
            f"{tag} ({size:.1f} MB) was built from other sources",
            "c2l image build",
        )


def _check_auth(host: _Host) -> Iterator[Check]:
    """Development auth allowed off loopback (the environment form of the override)."""
    mode = os.environ.get("C2L_AUTH_MODE") or "dev"
    if mode != "dev":
        yield Check("dev auth", OK, f"not used (C2L_AUTH_MODE={mode})")
        return
    try:
        insecure = insecure_dev_auth_from_env()
    except ConfigError as exc:
        yield Check("dev auth", FAIL, str(exc), "c2l serve refuses it: fix or unset the variable")
        return
    if insecure:
        yield Check(
            "dev auth",
            WARN,
            INSECURE_DEV_AUTH_WARNING.removeprefix("insecure: "),
            "set C2L_AUTH_MODE=jwks (with C2L_JWKS_URL, C2L_JWT_ISSUER, C2L_JWT_AUDIENCE)"
            " and unset C2L_INSECURE_DEV_AUTH",
        )
    else:
        yield Check("dev auth", OK, "development issuer, loopback only (c2l serve refuses others)")


def _check_tunnels(host: _Host) -> Iterator[Check]:
    """Private tunnel registrations allowed (development and tests only)."""
    try:
        allowed = allow_private_tunnels_from_env()
    except ConfigError as exc:
        yield Check("tunnels", FAIL, str(exc), "c2l serve refuses it: fix or unset the variable")
        return
    if allowed:
        yield Check(
            "tunnels",
            WARN,
            PRIVATE_TUNNELS_WARNING.removeprefix("insecure: "),
            "unset C2L_ALLOW_PRIVATE_TUNNELS outside development and tests",
        )
    else:
        yield Check("tunnels", OK, "tunnel URLs must be https on public addresses")


def run_checks(podman_url: str) -> list[Check]:
    """Every check, in display order."""
    user, home, uid = _service_user()
    host = _Host(podman_url=podman_url, user=user, home=home, uid=uid)
    steps: list[Callable[[_Host], Iterator[Check]]] = [
        _check_binaries,
        _check_subids,
        _check_tun,
        _check_conf,
        _connect,
        _check_service,
        _check_auth,
        _check_tunnels,
    ]
    checks: list[Check] = []
    try:
        for step in steps:
            checks.extend(step(host))
    finally:
        if host.client is not None:
            host.client.close()
    return checks


def format_checks(checks: list[Check]) -> str:
    """Aligned lines: ``status  name  detail  (fix: hint)``."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"{c.status:<4}  {c.name:<{width}}  {c.detail}"
        if c.hint and c.status in (WARN, FAIL):
            line += f"\n      {'':<{width}}  fix: {c.hint}"
        lines.append(line)
    return "\n".join(lines)


def run_doctor(podman_url: str) -> int:
    """``c2l doctor``: print the checks; 1 if the host cannot run sessions, else 0."""
    checks = run_checks(podman_url)
    print(format_checks(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        print(f"\n{len(failed)} check(s) failed: this host cannot run sessions yet.")
        return 1
    warned = sum(c.status == WARN for c in checks)
    print(f"\nready{f' ({warned} warning(s))' if warned else ''}: sessions can run on this host.")
    return 0


__all__ = ["SERVICE_SOCKET", "Check", "format_checks", "run_checks", "run_doctor"]
