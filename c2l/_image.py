"""``c2l image build``: the proxy image, built offline (DESIGN.md section 3).

No container registry is reachable on the project's hosts, so the image is assembled
from parts that are: Debian packages (``apt-get download`` + ``dpkg-deb -x``, no root
needed) make a minimal root filesystem with the distribution's Python 3.11, the repo's
``proxy/`` and ``wire/`` packages plus their pure-Python dependencies (copied from the
distributions installed next to this package) go under ``/app``, everything is
byte-compiled, and the tar is imported through the Podman REST API, so the image lands
in the storage of the Podman that the gateway talks to (the service user's, when the
gateway runs as root).

The same ``/app`` tree is the build context of ``containerfiles/Containerfile``, the
production recipe for hosts that can pull a public Python base image
(``python -m c2l._image context DIR`` writes it).

The image is labelled with a hash of everything that goes into it
(``io.c2l.source-hash``); a build whose hash matches the existing image is a no-op.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import importlib.metadata
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
from packaging.requirements import Requirement

import wire
from orchestrator import ObjectNotFound, PodmanClient, RuntimeObjectError, RuntimeUnavailable


class ImageBuildError(Exception):
    """The image could not be built: the message names the step and the fix."""


HASH_LABEL = "io.c2l.source-hash"
PROXY_UID = 1001

#: The repo's packages that run inside the container.
SOURCE_PACKAGES = ("proxy", "wire")

#: Pure-Python runtime dependencies of proxy/ and wire/ (wsproto -> h11; attrs has none).
#: No trio: the container's proxy is a selectors loop, because ``import trio`` alone would
#: cost more private memory than the whole per-session budget leaves the proxy
#: (DESIGN.md section 4); only the in-process adapter, never shipped, uses trio.
PROXY_DEPS = (
    "wsproto",
    "h11",
    "attrs",
)

#: Source files of SOURCE_PACKAGES that are for the host only and stay out of the image.
HOST_ONLY_FILES = frozenset({"proxy/_trio_adapter.py"})

#: Debian 12 packages of the root filesystem: the interpreter and the shared libraries
#: that its standard library's extension modules link against (the ones the proxy can
#: need; modules whose libraries are left out are removed, see _PRUNE).
DEB_PACKAGES = (
    "libc6",
    "libgcc-s1",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libssl3",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
    "media-types",
)

_PY = "usr/lib/python3.11"
_DYN = f"{_PY}/lib-dynload"

#: Paths (relative to the root filesystem) removed after unpacking: documentation,
#: iconv modules Python never uses, stdlib parts a server has no use for, test modules,
#: and extension modules whose libraries (ncurses, readline, sqlite, db, tirpc) are not
#: in the image, so an import fails cleanly instead of with a loader error.
_PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/binfmts",
    "usr/lib/binfmt.d",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/aarch64-linux-gnu/gconv",
    "etc/ld.so.conf.d",
    f"{_PY}/pydoc_data",
    f"{_PY}/test",
    f"{_PY}/lib2to3",
    f"{_PY}/idlelib",
    f"{_PY}/tkinter",
    f"{_PY}/turtledemo",
    f"{_PY}/ensurepip",
    f"{_PY}/config-3.11-x86_64-linux-gnu",
)
_PRUNE_DYNLOAD_PREFIXES = (
    "_test",
    "_ctypes_test",
    "_xxtestfuzz",
    "xxlimited",
    "_xxsubinterpreters",
    "_curses",
    "_dbm",
    "_sqlite3",
    "nis.",
    "readline.",
    "ossaudiodev.",
)

_USRMERGE_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

_PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    f"c2l:x:{PROXY_UID}:{PROXY_UID}:c2l proxy:/app:/usr/sbin/nologin\n"
)
_GROUP = f"root:x:0:\nnogroup:x:65534:\nc2l:x:{PROXY_UID}:\n"

#: Image configuration, identical in the offline image and in containerfiles/Containerfile.
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "PYTHONPATH": "/app",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
_CMD = ["python3", "-m", "proxy"]


@attrs.frozen
class Recipe:
    """What goes into one image: the repo's packages, their installed dependencies, the
    command. The proxy's is minimal (no trio); the gateway's (Kubernetes, DESIGN.md
    section 6) carries the whole project and everything it requires."""

    title: str
    packages: tuple[str, ...]
    deps: tuple[str, ...]
    cmd: tuple[str, ...]
    host_only: frozenset[str] = frozenset()


PROXY = Recipe("c2l-proxy", SOURCE_PACKAGES, PROXY_DEPS, tuple(_CMD), HOST_ONLY_FILES)

#: The project's own distribution, whose requirements make the gateway image's deps.
_PROJECT = "cloudtolocalllm"
#: The gateway's packages: every one of the project's (the desktop agent is imported by
#: the gateway's direct route for its body splitter).
GATEWAY_PACKAGES = ("c2l", "c2lcore", "wire", "gateway", "orchestrator", "proxy", "desktop")


def _requirements(name: str) -> list[str]:
    """The distributions ``name`` requires, with the extras it asks of them (``pyjwt[crypto]``
    brings cryptography), recursively, sorted; not its own extras' or other platforms'."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset())]
    while todo:
        current, extras = todo.pop()
        for text in importlib.metadata.distribution(current).requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in ("", *extras)
            ):
                continue  # an extra nobody asked for, or another platform's
            key = req.name.lower().replace("_", "-")
            wanted = frozenset(req.extras)
            if key not in seen or wanted:
                seen.add(key)
                todo.append((req.name, wanted))
    return sorted(seen)


def gateway_recipe() -> Recipe:
    """The gateway image: the project and what it requires, ``c2l serve`` on 0.0.0.0."""
    return Recipe(
        "c2l-gateway",
        GATEWAY_PACKAGES,
        tuple(_requirements(_PROJECT)),
        ("python3", "-m", "c2l", "serve", "--host", "0.0.0.0"),
    )


def _say(message: str) -> None:
    print(f"c2l image build: {message}", flush=True)


def repo_root() -> Path:
    """The checkout holding ``proxy/`` and ``wire/`` (the parent of this package)."""
    return Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where downloaded Debian packages are kept between builds (XDG cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "c2l"


# --------------------------------------------------------------------------- podman REST


def _unreachable(podman_url: str) -> ImageBuildError:
    return ImageBuildError(
        f"Podman REST service {podman_url} does not answer: "
        "start it with `bash scripts/run.sh` (or `podman system service`), then `c2l doctor`"
    )


def image_labels(podman: PodmanClient, tag: str) -> dict[str, str] | None:
    """The labels of image ``tag``, or None when there is no such image."""
    try:
        info = podman.request("GET", f"/images/{quote(tag, safe='')}/json", what=f"inspect {tag}")
    except ObjectNotFound:
        return None
    config: dict[str, Any] = info.get("Config") or {}
    labels: dict[str, str] = config.get("Labels") or {}
    return labels


# --------------------------------------------------------------------------- content hash


def _source_files(root: Path, recipe: Recipe = PROXY) -> Iterator[Path]:
    for package in recipe.packages:
        base = root / package
        if not (base / "__init__.py").is_file():
            raise ImageBuildError(f"{base}/__init__.py not found: run from a complete checkout")
        for path in sorted(base.rglob("*")):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and path.suffix != ".pyc"
                and path.relative_to(root).as_posix() not in recipe.host_only
            ):
                yield path


def dep_versions(recipe: Recipe = PROXY) -> dict[str, str]:
    """Installed versions of the recipe's dependencies (the ones that will be vendored)."""
    versions = {}
    for name in recipe.deps:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ImageBuildError(
                f"Python package {name!r} is not installed next to c2l: "
                "run `pip install -e .` in the project's virtualenv"
            ) from None
    return versions


def source_hash(root: Path | None = None, recipe: Recipe = PROXY) -> str:
    """Hash of everything that goes into the image: sources, dependency versions, recipe."""
    root = root or repo_root()
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())  # the recipe itself
    h.update(json.dumps([DEB_PACKAGES, dep_versions(recipe)], sort_keys=True).encode())
    if recipe != PROXY:  # (the proxy's hash stays what it was)
        h.update(json.dumps([recipe.title, recipe.cmd]).encode())
    for path in _source_files(root, recipe):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- /app content


#: Directories of installed distributions that the container never needs (trio ships its
#: test suite, a third of its size).
_SKIP_DIRS = frozenset({"__pycache__", "_tests", "tests"})


def _copy_distribution(name: str, dest: Path) -> None:
    dist = importlib.metadata.distribution(name)
    files = dist.files
    if not files:
        raise ImageBuildError(f"cannot list the files of installed package {name!r}: reinstall it")
    for f in files:
        parts = Path(str(f)).parts
        if not parts or parts[0] == ".." or str(f).endswith(".pyc"):
            continue  # scripts in bin/, bytecode of the host interpreter
        if not _SKIP_DIRS.isdisjoint(parts):
            continue
        src = Path(str(dist.locate_file(f)))
        if not src.is_file():
            continue
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def prepare_app(dest: Path, root: Path | None = None, recipe: Recipe = PROXY) -> None:
    """Write the ``/app`` tree into ``dest``: the recipe's packages (proxy/ and wire/ for
    the proxy) and the vendored dependencies.

    Shared by the offline build and the Containerfile's build context.
    """
    root = root or repo_root()
    dest.mkdir(parents=True, exist_ok=True)
    for name in recipe.deps:
        _copy_distribution(name, dest)
    for path in _source_files(root, recipe):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def prepare_context(dest: Path, root: Path | None = None) -> Path:
    """Write the build context of containerfiles/Containerfile (``app/`` + the file)."""
    root = root or repo_root()
    if (dest / "app").exists():
        shutil.rmtree(dest / "app")
    prepare_app(dest / "app", root)
    containerfile = root / "containerfiles" / "Containerfile"
    if containerfile.is_file():
        shutil.copy2(containerfile, dest / "Containerfile")
    (dest / "source-hash").write_text(source_hash(root) + "\n")
    return dest


# --------------------------------------------------------------------------- root filesystem


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=600, check=False
        )
    except FileNotFoundError:
        raise ImageBuildError(
            f"{cmd[0]} not found: {what} needs a Debian host (apt, dpkg); elsewhere build "
            "containerfiles/Containerfile with a public Python base image"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit code {proc.returncode}"
        raise ImageBuildError(f"{what} failed: {last}")


def fetch_debs(cache: Path) -> list[Path]:
    """The .deb files of :data:`DEB_PACKAGES`, downloaded once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEB_PACKAGES if not list(cache.glob(f"{p}_*.deb"))]
    if missing:
        _say(f"downloading {len(missing)} Debian packages into {cache} ...")
        try:
            _run(["apt-get", "download", *missing], "apt-get download", cwd=cache)
        except ImageBuildError as exc:
            raise ImageBuildError(
                f"{exc}; run `apt-get update` as root (the package lists are needed once)"
            ) from None
    debs = []
    for package in DEB_PACKAGES:
        found = sorted(cache.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ImageBuildError(f"Debian package {package} was not downloaded into {cache}")
        debs.append(found[-1])
    return debs


def _merge_into(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``, merging directories (usrmerge)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in list(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir():
            _merge_into(entry, target)
        else:
            if target.is_symlink() or target.exists():
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            entry.rename(target)
    src.rmdir()


def build_rootfs(stage: Path, debs: Sequence[Path]) -> None:
    """Unpack ``debs`` into ``stage`` and make it a minimal usrmerged Debian root."""
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(stage)], f"unpacking {deb.name}")
    # Debian 12 layout: /bin, /lib, ... are symlinks into /usr.
    for name in _USRMERGE_DIRS:
        top = stage / name
        if top.is_dir() and not top.is_symlink():
            _merge_into(top, stage / "usr" / name)
        if (stage / "usr" / name).is_dir() and not top.is_symlink():
            top.symlink_to(f"usr/{name}")
    for rel in _PRUNE:
        path = stage / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    dynload = stage / _DYN
    for so in list(dynload.iterdir()):
        if so.name.startswith(_PRUNE_DYNLOAD_PREFIXES):
            so.unlink()
    (stage / "usr/bin/python3").symlink_to("python3.11")
    etc = stage / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(_PASSWD)
    (etc / "group").write_text(_GROUP)
    for name in ("hosts", "hostname", "resolv.conf"):  # podman bind-mounts over these
        (etc / name).write_text("")
    for name in ("proc", "sys", "dev", "run", "tmp", "root"):
        (stage / name).mkdir(exist_ok=True)
    # The mount point of the session's directory (the proxy's socket): made here, or the
    # runtime makes it in the container's own layer at every start (`podman diff` shows it).
    (stage / wire.SOCKET_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)


def compile_tree(stage: Path, dirs: Sequence[str]) -> None:
    """Byte-compile ``dirs`` (absolute in the image) so that imports never write.

    The pycs are hash-based and unchecked: the image is immutable, so skipping the
    source stat on every import is safe. Compiled with this interpreter when it is a
    3.11 (same bytecode), otherwise with the staged one.
    """
    if sys.version_info[:2] == (3, 11):
        for d in dirs:
            ok = compileall.compile_dir(
                str(stage / d.lstrip("/")),
                quiet=2,
                stripdir=str(stage),
                prependdir="/",
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                workers=0,
            )
            if not ok:
                raise ImageBuildError(
                    f"byte-compiling {d} failed: a source file has a syntax error"
                )
        return
    python = stage / "usr/bin/python3.11"
    env = {"PYTHONHOME": str(stage / "usr"), "PATH": os.environ.get("PATH", "")}
    for d in dirs:
        cmd = [
            str(python),
            "-I",
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(stage),
            "-p",
            "/",
            str(stage / d.lstrip("/")),
        ]
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            raise ImageBuildError(f"byte-compiling {d} failed: {proc.stderr.strip()[-200:]}")


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.name == "tmp":
        info.mode = 0o1777
    elif info.isdir():
        info.mode = 0o755
    elif info.isfile():
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    return info


def write_tar(stage: Path, out: Path) -> None:
    """The root filesystem as a tar owned by root (files are readable, not writable, by 1001)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(stage.iterdir()):
            tar.add(entry, arcname=entry.name, recursive=True, filter=_tar_filter)


def _changes(digest: str, recipe: Recipe = PROXY) -> list[str]:
    env = [f"ENV {key}={value}" for key, value in _ENV.items()]
    if recipe != PROXY:
        env.append("ENV HOME=/tmp")  # the gateway's config directory, on its writable /tmp
    return [
        *env,
        "WORKDIR /app",
        f"USER {PROXY_UID}:{PROXY_UID}",
        "STOPSIGNAL SIGTERM",
        f"LABEL {HASH_LABEL}={digest}",
        f"LABEL org.opencontainers.image.title={recipe.title}",
        f"CMD {json.dumps(list(recipe.cmd))}",
    ]


def import_image(
    podman: PodmanClient, tarball: Path, tag: str, digest: str, recipe: Recipe = PROXY
) -> str:
    """``podman import`` ``tarball`` as ``tag`` through the REST API; the new image id."""
    params = [("reference", tag), ("message", "c2l image build")]
    params += [("changes", change) for change in _changes(digest, recipe)]
    with tarball.open("rb") as body:
        answer = podman.request(
            "POST",
            "/images/import",
            what=f"import {tag}",
            params=params,
            content=body,
            headers={"Content-Type": "application/x-tar"},
            timeout=600.0,
        )
    image_id: str = answer.get("Id", "")
    return image_id


def _image_id(podman: PodmanClient, tag: str) -> str | None:
    try:
        info = podman.request("GET", f"/images/{quote(tag, safe='')}/json", what=f"inspect {tag}")
    except ObjectNotFound:
        return None
    image_id: str = info.get("Id", "")
    return image_id


def build(tag: str, podman_url: str, force: bool = False, recipe: Recipe = PROXY) -> str:
    """Build image ``tag`` into the Podman at ``podman_url`` unless it is current.

    Returns ``"current"`` or ``"built"``. Raises :class:`ImageBuildError`, or the Podman
    client's errors (``orchestrator.OrchestratorError``) when Podman refuses a step.
    """
    t0 = time.monotonic()
    root = repo_root()
    digest = source_hash(root, recipe)
    with PodmanClient(podman_url) as podman:
        try:
            labels = image_labels(podman, tag)
        except RuntimeUnavailable:
            raise _unreachable(podman_url) from None
        if labels is not None and labels.get(HASH_LABEL) == digest and not force:
            _say(f"image {tag} is current ({HASH_LABEL}={digest[:12]})")
            return "current"
        old_id = _image_id(podman, tag)
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
            stage = Path(tmp) / "rootfs"
            stage.mkdir()
            debs = fetch_debs(cache / "debs")
            _say(f"unpacking {len(debs)} Debian packages (Python 3.11 root filesystem) ...")
            build_rootfs(stage, debs)
            _say(f"vendoring {', '.join(recipe.deps)} and {', '.join(recipe.packages)} ...")
            prepare_app(stage / "app", root, recipe)
            _say("byte-compiling the standard library and /app ...")
            compile_tree(stage, ["/usr/lib/python3.11", "/app"])
            tarball = Path(tmp) / "rootfs.tar"
            write_tar(stage, tarball)
            size_mb = tarball.stat().st_size / 1e6
            _say(f"importing {size_mb:.1f} MB root filesystem as {tag} ...")
            new_id = import_image(podman, tarball, tag, digest, recipe)
        if old_id and new_id and not new_id.startswith(old_id) and not old_id.startswith(new_id):
            # The previous build is now untagged; drop it unless a container still uses it.
            with contextlib.suppress(RuntimeObjectError):
                podman.request("DELETE", f"/images/{old_id}", what=f"remove image {old_id}")
        info = podman.request("GET", f"/images/{quote(tag, safe='')}/json", what=f"inspect {tag}")
        size = int(info.get("Size", 0))
    _say(
        f"built {tag} ({size / 1e6:.1f} MB, {HASH_LABEL}={digest[:12]}) "
        f"in {time.monotonic() - t0:.1f} s"
    )
    return "built"


def _main(argv: Sequence[str]) -> int:
    """``python -m c2l._image context DIR``: write the Containerfile's build context."""
    if len(argv) != 2 or argv[0] != "context":
        print("usage: python -m c2l._image context DIR", file=sys.stderr)
        return 2
    try:
        dest = prepare_context(Path(argv[1]))
    except ImageBuildError as exc:
        print(f"c2l._image: {exc}", file=sys.stderr)
        return 1
    print(f"build context written to {dest}: podman build -f {dest}/Containerfile {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

__all__ = [
    "ImageBuildError",
    "build",
    "image_labels",
    "prepare_app",
    "prepare_context",
    "source_hash",
]
