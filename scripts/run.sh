#!/usr/bin/env bash
# Run CloudToLocalLLM on this machine, end to end:
#   gateway (`c2l serve`) + a desktop agent for the demo user + an Ollama to talk to
#   (the real one at 127.0.0.1:11434 if it answers, a fake one otherwise).
# Sets the host up first (idempotent, see scripts/_setup.sh). Ctrl-C stops everything.
#
#   bash scripts/run.sh
#   C2L_PORT=9000 bash scripts/run.sh
#
# The gateway runs the development issuer, which serves loopback only: with a C2L_HOST
# that is not loopback, `c2l serve` refuses to start and says why. C2L_INSECURE_DEV_AUTH=1
# allows it on purpose (anyone who can reach it can then sign in as any user).
set -euo pipefail
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
c2l_setup

HOST="${C2L_HOST:-127.0.0.1}"
PORT="${C2L_PORT:-8080}"
# The gateway as seen from this machine (a 0.0.0.0 listener answers on loopback too).
LOCAL="http://127.0.0.1:$PORT"
[[ $HOST == 127.* || $HOST == 0.0.0.0 || $HOST == "::" ]] || LOCAL="http://$HOST:$PORT"
FAKE_OLLAMA_PORT=11435

STATE="$C2L_ROOT/.cache/run"
install -d -m 0700 "$STATE"
TOKEN_FILE="$STATE/demo.token"

declare -a PIDS=() NAMES=()

stop_all() {
    trap - EXIT INT TERM
    local i pid deadline
    # Reverse start order: the desktop agent and the fake Ollama first, the gateway last
    # (on SIGTERM it tears every session's pod, container and network down).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        c2l_log "stopping ${NAMES[i]} (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            c2l_log "${NAMES[i]} did not stop within 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG COMMAND...: run in the background (LOG holds this run only), remember the PID.
start() {
    local name=$1 log=$2
    shift 2
    "$@" </dev/null >"$log" 2>&1 &
    PIDS+=($!)
    NAMES+=("$name")
}

# wait_http NAME URL PID: until URL answers 2xx (60 s), or the process dies.
wait_http() {
    local name=$1 url=$2 pid=$3 log=$4 i
    for ((i = 1; i <= 120; i++)); do
        curl -sf -m 2 -o /dev/null "$url" && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log" >&2
            c2l_die "$name exited before answering $url (log: $log)"
        fi
        ((i % 10 == 0)) && c2l_log "waiting for $name at $url ($((i / 2)) s) ..."
        sleep 0.5
    done
    c2l_die "$name did not answer $url within 60 s (log: $log)"
}

c2l_log "starting the gateway on $HOST:$PORT (log: $STATE/serve.log)"
start "gateway" "$STATE/serve.log" "$C2L" serve --host "$HOST" --port "$PORT"
wait_http "the gateway" "$LOCAL/health" "${PIDS[-1]}" "$STATE/serve.log"

OLLAMA=http://127.0.0.1:11434
if curl -sf -m 2 -o /dev/null "$OLLAMA/api/tags"; then
    c2l_log "using the Ollama at $OLLAMA"
else
    OLLAMA="http://127.0.0.1:$FAKE_OLLAMA_PORT"
    c2l_log "no Ollama at 127.0.0.1:11434: starting a fake one at $OLLAMA"
    start "fake Ollama" "$STATE/fake-ollama.log" "$C2L" fake-ollama --port "$FAKE_OLLAMA_PORT"
    wait_http "the fake Ollama" "$OLLAMA/api/tags" "${PIDS[-1]}" "$STATE/fake-ollama.log"
fi
MODEL=$(curl -sf -m 5 "$OLLAMA/api/tags" | python3 -c '
import json, sys
try:
    models = json.load(sys.stdin).get("models") or []
except ValueError:
    models = []
print(models[0].get("name", "llama3.2") if models else "llama3.2")
')

(umask 077 && "$C2L" token --sub demo --ttl 86400 >"$TOKEN_FILE.new" && mv "$TOKEN_FILE.new" "$TOKEN_FILE")
TOKEN=$(<"$TOKEN_FILE")

c2l_log "starting the desktop agent for user demo (log: $STATE/desktop.log)"
start "desktop agent" "$STATE/desktop.log" \
    "$C2L" desktop --gateway "$LOCAL" --token-file "$TOKEN_FILE" --ollama "$OLLAMA"

cat <<EOF

CloudToLocalLLM is running.

  Web chat      $LOCAL/
                (paste the demo token when the page asks for one)
  Demo token    user "demo", valid 24 h, also in $TOKEN_FILE:
$TOKEN

  Try it        TOKEN=\$(cat $TOKEN_FILE)
                curl -N -H "Authorization: Bearer \$TOKEN" $LOCAL/api/ollama/api/chat \\
                  -d '{"model":"$MODEL","messages":[{"role":"user","content":"Why is the sky blue?"}]}'

  Ollama        $OLLAMA
  Podman        $C2L_PODMAN_URL
  Logs          $STATE/{serve,desktop,fake-ollama}.log
  Stop          Ctrl-C here (or: kill $$)

EOF

# Until Ctrl-C / SIGTERM (the traps stop the children), or until a child dies.
while true; do
    set +e
    wait -n "${PIDS[@]}"
    set -e
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
            c2l_log "${NAMES[i]} exited; see its log in $STATE; stopping"
            exit 1
        fi
    done
done
