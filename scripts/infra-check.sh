#!/usr/bin/env bash
# Lint and security-scan the AWS template (infra/template.yaml, or the file given as $1),
# failing on any finding:
#   1. cfn-lint infra/template.yaml                       (errors, warnings and infos all fail)
#   2. checkov --framework cloudformation                  (skips only inline, with reasons)
#   3. sam validate --lint                                 (SAM transform + cfn-lint)
# Installs the tools (pinned, from PyPI) into two virtualenvs under /var/tmp on first use;
# later runs only check the installed versions. checkov and aws-sam-cli cannot share one
# environment: each pins a different exact boto3.
# Works offline: nothing here talks to AWS (no credentials needed); checkov runs with
# --skip-download so that it does not try to fetch its guideline links.
set -euo pipefail

cd "$(dirname "$0")/.."

CFN_LINT_VERSION=1.58.0
SAM_CLI_VERSION=1.170.0
CHECKOV_VERSION=3.3.30
SAM_VENV=${KARMIC_INFRA_VENV:-/var/tmp/karmic-infra-venv}
CHECKOV_VENV=${KARMIC_INFRA_CHECKOV_VENV:-/var/tmp/karmic-infra-checkov-venv}
TEMPLATE=${1:-infra/template.yaml}

log() { printf '[infra-check] %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

# installed VENV DIST... -> the installed versions, space-separated ("" if the venv is missing or broken)
installed() {
  local venv=$1
  shift
  [ -x "$venv/bin/python" ] || return 0
  "$venv/bin/python" - "$@" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import version
print(" ".join(version(d) for d in sys.argv[1:]))
PY
}

# ensure VENV "WANTED" REQUIREMENT... : (re)creates the venv unless it already has exactly these versions
ensure() {
  local venv=$1 wanted=$2
  shift 2
  local dists=()
  for req in "$@"; do dists+=("${req%%==*}"); done
  if [ "$(installed "$venv" "${dists[@]}")" = "$wanted" ]; then
    return 0
  fi
  local start
  start=$(now)
  log "installing $* into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  log "installed in $(since "$start")"
}

start=$(now)
ensure "$SAM_VENV" "$CFN_LINT_VERSION $SAM_CLI_VERSION" \
  "cfn-lint==$CFN_LINT_VERSION" "aws-sam-cli==$SAM_CLI_VERSION"
ensure "$CHECKOV_VENV" "$CHECKOV_VERSION" "checkov==$CHECKOV_VERSION"
log "tools ready ($(since "$start"))"

failed=0
step() {
  local name=$1
  shift
  local start rc=0
  start=$(now)
  log "== $name"
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    log "$name: clean ($(since "$start"))"
  else
    log "$name: FAILED, exit $rc ($(since "$start"))"
    failed=1
  fi
}

# cfn-lint exits non-zero on any error, warning or informational finding.
log "$("$SAM_VENV/bin/cfn-lint" --version)"
step cfn-lint "$SAM_VENV/bin/cfn-lint" "$TEMPLATE"

log "checkov $("$CHECKOV_VENV/bin/checkov" --version)"
step checkov "$CHECKOV_VENV/bin/checkov" -f "$TEMPLATE" --framework cloudformation \
  --quiet --compact --skip-download

# sam validate --lint needs a region for the SAM transform, and no credentials.
log "$(SAM_CLI_TELEMETRY=0 "$SAM_VENV/bin/sam" --version)"
step "sam validate --lint" env SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 \
  "$SAM_VENV/bin/sam" validate --lint -t "$TEMPLATE"

if [ "$failed" -ne 0 ]; then
  log "FAILED"
  exit 1
fi
log "all clean"
