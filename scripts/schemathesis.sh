#!/usr/bin/env bash
# Fuzz the HTTP API against its own OpenAPI document with schemathesis, every check on.
#
# Starts `karmic serve` (embedded SQLite, temporary data directory, free port, cheap
# password hashing, throttles off), registers a user that is bootstrapped as admin so
# every route is reachable, signs in, and runs schemathesis against the served
# /openapi.json with all checks and phases, bounded in time. Exits non-zero on any failure.
#
# Environment (all optional):
#   SCHEMATHESIS_MAX_TIME      time budget of the run in seconds (default 150)
#   SCHEMATHESIS_MAX_EXAMPLES  test cases per operation and phase (default 100)
#   SCHEMATHESIS_SEED          random seed (default fixed, so CI runs are repeatable;
#                              set `random` for a new one each run)
#   SCHEMATHESIS_WORKERS       concurrent workers (default 1: the server needs the other core, and
#                              hypothesis in several threads trips CPython 3.11.7's ast.parse
#                              ("AST constructor recursion depth mismatch"))
#   KARMIC_BIN                 a prebuilt karmic binary (default: cargo build, target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

ST_VERSION=4.32.5
PY=${PYTHON:-python3}
MAX_TIME=${SCHEMATHESIS_MAX_TIME:-150}
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-100}
SEED=${SCHEMATHESIS_SEED:-20261129}
WORKERS=${SCHEMATHESIS_WORKERS:-1}

log() { printf '[schemathesis] %s\n' "$*" >&2; }

# --- schemathesis, pinned; installed only when missing or another version ----------------
installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null || true)
if [ "$installed" != "$ST_VERSION" ]; then
  log "installing schemathesis ${ST_VERSION} (found: ${installed:-none})"
  pip_flags=(--quiet --disable-pip-version-check --root-user-action=ignore)
  # Debian's own python3 refuses pip installs (PEP 668) unless told; pyenv's does not.
  if [ -e "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
    pip_flags+=(--break-system-packages)
  fi
  "$PY" -m pip install "${pip_flags[@]}" "schemathesis==${ST_VERSION}"
fi

# --- the server -----------------------------------------------------------------------
if [ -z "${KARMIC_BIN:-}" ]; then
  cargo build --quiet --bin karmic
  KARMIC_BIN=target/debug/karmic
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/karmic-schemathesis.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
s3_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:${port}"
admin_email="fuzz-admin@example.com"
password="schemathesis-password-1"

env KARMIC_DATA_DIR="$work/data" \
  KARMIC_HTTP_ADDR="127.0.0.1:${port}" \
  KARMIC_S3_EMBEDDED_ADDR="127.0.0.1:${s3_port}" \
  KARMIC_LOG_FORMAT=json \
  KARMIC_ARGON2_MEMORY_KIB=1024 \
  KARMIC_ARGON2_ITERATIONS=1 \
  KARMIC_RATE_LIMIT_PER_SEC=0 \
  KARMIC_LOGIN_FAILURES_PER_ACCOUNT=0 \
  KARMIC_LOGIN_FAILURES_PER_CLIENT=0 \
  KARMIC_BOOTSTRAP_ADMIN_EMAIL="$admin_email" \
  RUST_LOG="${RUST_LOG:-warn}" \
  "$KARMIC_BIN" serve >"$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 300); do
  curl -fsS -o /dev/null "$base/health" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { log "karmic serve exited:"; cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS -o /dev/null "$base/health" || { log "karmic serve did not come up:"; cat "$work/server.log" >&2; exit 1; }

# --- accounts and a token --------------------------------------------------------------
register() {
  curl -fsS -o /dev/null -H 'Content-Type: application/json' \
    -d "{\"email\":\"$1\",\"password\":\"$2\",\"display_name\":\"$3\"}" "$base/auth/register"
}
# The admin whose token the run uses: every operation is reachable with it.
register "$admin_email" "$password" "Fuzz Admin"
# The account in the document's examples, so the example sign-in succeeds and its response
# is checked too.
register "ann@example.com" "correct horse battery staple" "Ann Lee"
token=$(curl -fsS -H 'Content-Type: application/json' \
  -d "{\"email\":\"${admin_email}\",\"password\":\"${password}\"}" \
  "$base/auth/login" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')

# --- the run --------------------------------------------------------------------------
seed_args=()
[ "$SEED" = random ] || seed_args=(--seed "$SEED")
cmd=("$PY" -m schemathesis.cli run "$base/openapi.json"
  --checks all
  --phases examples,coverage,fuzzing,stateful
  --max-examples "$MAX_EXAMPLES"
  --max-time "$MAX_TIME"
  --workers "$WORKERS"
  --request-timeout 20
  --baseline "$root/scripts/schemathesis-baseline.json"
  "${seed_args[@]}"
  --no-color
  --header "Authorization: Bearer ${token}")
log "running: ${cmd[*]/${token}/<token>}"
start=$(date +%s)
status=0
# Run from the scratch directory: schemathesis keeps a cache (.schemathesis/) in its working
# directory, and every run should start clean.
(cd "$work" && "${cmd[@]}") || status=$?
log "schemathesis finished in $(( $(date +%s) - start )) s with exit code ${status}"
if [ "$status" -ne 0 ] && [ -s "$work/server.log" ]; then
  log "server log (warnings and errors):"
  tail -n 50 "$work/server.log" >&2
fi
exit "$status"
