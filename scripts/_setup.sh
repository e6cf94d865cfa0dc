# shellcheck shell=bash
# Sourced by scripts/run.sh and scripts/test.sh: make this host ready, idempotently.
#
#   source scripts/_setup.sh && c2l_setup
#
# As root (CI, a server): installs the Debian packages, creates the unprivileged service
# user c2lsvc with its rootless Podman configuration (DESIGN.md section 3), and runs its
# Podman REST service at /run/c2l/podman.sock. As an ordinary user with rootless Podman:
# uses (and if needed starts) that user's own service. Either way: a virtualenv .venv with
# the project, and the proxy image. Exports C2L_PODMAN_URL and C2L (the c2l command).
# Every step checks first and does nothing when its result is already there.

C2L_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
C2L_SVC_USER="${C2L_SVC_USER:-c2lsvc}"
C2L_RUN_DIR="${C2L_RUN_DIR:-/run/c2l}"
C2L_VENV="$C2L_ROOT/.venv"
C2L="$C2L_VENV/bin/c2l"
_C2L_SBIN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Debian packages: rootless Podman (with its recommended helpers: aardvark-dns, catatonit),
# the runtime that works on hybrid cgroups, and the browser for the end-to-end tests.
_C2L_PODMAN_PKGS=(podman runc slirp4netns uidmap iptables fuse-overlayfs aardvark-dns curl ca-certificates)
_C2L_BROWSER_PKGS=(chromium chromium-driver fonts-liberation)

c2l_log() { printf '==> %s\n' "$*" >&2; }
c2l_die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

_c2l_missing_pkgs() {
    local p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $status == ii* ]] || printf '%s\n' "$p"
    done
}

_c2l_python_ok() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

_c2l_packages() {
    command -v dpkg-query >/dev/null 2>&1 || {
        c2l_log "not a Debian host: install podman, runc, slirp4netns, uidmap, iptables, fuse-overlayfs, curl, chromium yourself"
        return 0
    }
    local -a podman_missing browser_missing
    mapfile -t podman_missing < <(_c2l_missing_pkgs "${_C2L_PODMAN_PKGS[@]}")
    mapfile -t browser_missing < <(_c2l_missing_pkgs "${_C2L_BROWSER_PKGS[@]}")
    _c2l_python_ok || podman_missing+=(python3 python3-venv)
    if ((${#podman_missing[@]} + ${#browser_missing[@]} == 0)); then
        return 0 # everything present: no apt at all
    fi
    if ((EUID != 0)); then
        if ((${#podman_missing[@]})); then
            c2l_die "missing Debian packages; as root run: apt-get install -y ${podman_missing[*]} ${browser_missing[*]}"
        fi
        c2l_log "browser tests need: apt-get install -y ${browser_missing[*]} (as root); continuing"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    c2l_log "apt-get update"
    apt-get update -qq
    if ((${#podman_missing[@]})); then
        c2l_log "installing ${podman_missing[*]}"
        apt-get install -y -qq "${podman_missing[@]}" >/dev/null
    fi
    if ((${#browser_missing[@]})); then
        c2l_log "installing ${browser_missing[*]}"
        apt-get install -y -qq --no-install-recommends "${browser_missing[@]}" >/dev/null
    fi
    _c2l_python_ok || c2l_die "python3 >= 3.11 with venv is needed (python3 on PATH: $(command -v python3 || echo none))"
}

_c2l_apt_lists() {
    # `c2l image build` runs `apt-get download`, which needs the package lists once.
    if ((EUID == 0)) && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        c2l_log "apt-get update (package lists for the image build)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
    fi
}

_c2l_subids() {
    # Debian's useradd gives a range; add one after the highest existing range if not.
    local user=$1 file opt start
    for file in /etc/subuid /etc/subgid; do
        [[ -f $file ]] || touch "$file"
        if ! grep -qE "^(${user}|$(id -u "$user")):[0-9]+:[0-9]+$" "$file"; then
            start=$(awk -F: 'BEGIN { m = 100000 } NF == 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$file")
            opt=--add-subuids
            [[ $file == /etc/subgid ]] && opt=--add-subgids
            c2l_log "giving $user ids $start-$((start + 65535)) in $file"
            usermod "$opt" "$start-$((start + 65535))" "$user"
        fi
    done
}

# Does containers.conf / storage.conf already say what DESIGN.md section 3 needs?
_c2l_conf_ok() {
    python3 - "$1" "$2" <<'EOF'
import sys, tomllib
kind, path = sys.argv[1], sys.argv[2]
try:
    with open(path, "rb") as f:
        c = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError):
    sys.exit(1)
if kind == "containers":
    e, k = c.get("engine", {}), c.get("containers", {})
    ok = k.get("keyring") is False and e.get("runtime") == "runc" and e.get("num_locks", 0) >= 4096
else:
    ok = c.get("storage", {}).get("driver") == "overlay"
sys.exit(0 if ok else 1)
EOF
}

_c2l_svc_config() {
    local user=$1 home dir changed=1
    home=$(getent passwd "$user" | cut -d: -f6)
    dir="$home/.config/containers"
    install -d -o "$user" -g "$user" -m 0755 "$home/.config" "$dir"
    if ! _c2l_conf_ok containers "$dir/containers.conf"; then
        c2l_log "writing $dir/containers.conf (runc, keyring = false, num_locks = 8192)"
        cat >"$dir/containers.conf" <<'EOF'
# Written by scripts/_setup.sh; see DESIGN.md section 3.
[containers]
# A session keyring per container exhausts the kernel's 200 keys per user at ~98 pods.
keyring = false

[engine]
# crun fails on hybrid cgroups ("cgroups in hybrid mode not supported"); runc works.
runtime = "runc"
# Locks are shared by pods and containers: 2048 (the default) is about 680 users.
num_locks = 8192
EOF
        chown "$user:" "$dir/containers.conf"
        changed=0
    fi
    if ! _c2l_conf_ok storage "$dir/storage.conf"; then
        c2l_log "writing $dir/storage.conf (driver = overlay)"
        printf '# Written by scripts/_setup.sh; see DESIGN.md section 3.\n[storage]\ndriver = "overlay"\n' \
            >"$dir/storage.conf"
        chown "$user:" "$dir/storage.conf"
        changed=0
    fi
    return $changed # 0 when something was rewritten
}

# The command prefix that runs a program as the service user, with a clean environment:
# root's XDG_* must not leak in, or its Podman would look for its runtime directory in
# root's. setpriv execs (no intermediate process), so a PID we record is Podman's own.
_c2l_svc_prefix() {
    local home
    home=$(getent passwd "$C2L_SVC_USER" | cut -d: -f6)
    _C2L_SVC=(setpriv --reuid="$C2L_SVC_USER" --regid="$C2L_SVC_USER" --init-groups
        env -i HOME="$home" USER="$C2L_SVC_USER" LOGNAME="$C2L_SVC_USER"
        PATH="$_C2L_SBIN_PATH" LANG=C.UTF-8)
}

# Run "$@" as the service user (root only), e.g. `c2l_as_svc podman ps`.
c2l_as_svc() {
    _c2l_svc_prefix
    (cd / && "${_C2L_SVC[@]}" "$@")
}

_c2l_ping() {
    curl -sf -m 3 --unix-socket "$1" http://podman/v4.0.0/libpod/_ping 2>/dev/null | grep -qx OK
}

# Start `podman system service` on socket $1 in the background unless it answers, in its
# own session (setsid) so that a Ctrl-C in the terminal does not reach it; "$4..." is the
# command prefix that runs podman (the service user's, for root).
_c2l_service() {
    local sock=$1 log=$2 pidfile=$3
    shift 3
    if _c2l_ping "$sock"; then
        return 0
    fi
    rm -f "$sock"
    c2l_log "starting the Podman REST service on $sock (log: $log)"
    (cd / && exec setsid "$@" podman system service --time=0 "unix://$sock" </dev/null >>"$log" 2>&1) &
    echo $! >"$pidfile"
    local i
    for ((i = 1; i <= 120; i++)); do
        _c2l_ping "$sock" && {
            c2l_log "Podman REST service answers on $sock"
            return 0
        }
        kill -0 "$(cat "$pidfile")" 2>/dev/null || {
            tail -n 20 "$log" >&2
            c2l_die "the Podman service exited; see $log and run: $C2L doctor"
        }
        ((i % 10 == 0)) && c2l_log "waiting for the Podman REST service ($((i / 2)) s) ..."
        sleep 0.5
    done
    c2l_die "the Podman REST service did not answer on $sock within 60 s; see $log"
}

_c2l_root_podman() {
    local user=$C2L_SVC_USER sock="$C2L_RUN_DIR/podman.sock"
    if ! id -u "$user" >/dev/null 2>&1; then
        c2l_log "creating the service user $user"
        useradd -m -s /bin/bash -c "CloudToLocalLLM rootless Podman" "$user"
    fi
    _c2l_subids "$user"
    # slirp4netns opens /dev/net/tun as the service user.
    if [[ ! -c /dev/net/tun ]]; then
        modprobe tun 2>/dev/null || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
    fi
    chmod 666 /dev/net/tun
    if [[ -f /proc/sys/kernel/unprivileged_userns_clone ]] &&
        [[ $(cat /proc/sys/kernel/unprivileged_userns_clone) != 1 ]]; then
        sysctl -qw kernel.unprivileged_userns_clone=1
    fi
    install -d -o "$user" -g "$user" -m 0755 "$C2L_RUN_DIR"
    if _c2l_svc_config "$user"; then
        # New num_locks need `podman system renumber`, with the service stopped; a
        # service we started is restarted, one started by hand is left alone.
        if [[ -f $C2L_RUN_DIR/podman.pid ]] && kill -0 "$(cat "$C2L_RUN_DIR/podman.pid")" 2>/dev/null; then
            c2l_log "restarting the Podman service to apply the new configuration"
            local pid i
            pid=$(cat "$C2L_RUN_DIR/podman.pid")
            kill "$pid"
            for ((i = 0; i < 100; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
        if ! _c2l_ping "$sock"; then
            c2l_as_svc podman system renumber >/dev/null 2>&1 || true
        else
            c2l_log "WARNING: restart the Podman service on $sock to apply the new configuration"
        fi
    fi
    _c2l_svc_prefix
    _c2l_service "$sock" "$C2L_RUN_DIR/podman.log" "$C2L_RUN_DIR/podman.pid" "${_C2L_SVC[@]}"
    export C2L_PODMAN_URL="unix://$sock"
}

_c2l_user_podman() {
    local runtime="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}" sock state
    if [[ ! -d $runtime || ! -w $runtime ]]; then
        runtime="${TMPDIR:-/tmp}/podman-run-$(id -u)"
        install -d -m 0700 "$runtime"
    fi
    export XDG_RUNTIME_DIR="$runtime"
    sock="$runtime/podman/podman.sock"
    mkdir -p "$runtime/podman"
    state="${XDG_CACHE_HOME:-$HOME/.cache}/c2l"
    mkdir -p "$state"
    grep -qE "^($(id -un)|$(id -u)):" /etc/subuid 2>/dev/null ||
        c2l_log "WARNING: $(id -un) has no /etc/subuid range; as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $(id -un)"
    _c2l_service "$sock" "$state/podman.log" "$state/podman.pid"
    export C2L_PODMAN_URL="unix://$sock"
}

_c2l_venv() {
    local stamp="$C2L_VENV/.c2l-installed" want
    if [[ ! -x $C2L_VENV/bin/python ]]; then
        c2l_log "creating the virtualenv $C2L_VENV"
        python3 -m venv "$C2L_VENV"
    fi
    want=$(cat "$C2L_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" || ! -x $C2L ]]; then
        c2l_log "installing the project into $C2L_VENV (pip install -e '.[test]')"
        "$C2L_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$C2L_ROOT[test]"
        echo "$want" >"$stamp"
    fi
}

# The whole set-up; safe to run again and again.
c2l_setup() {
    _c2l_packages
    _c2l_apt_lists
    if ((EUID == 0)); then
        _c2l_root_podman
    else
        _c2l_user_podman
    fi
    _c2l_venv
    "$C2L" image build
}
