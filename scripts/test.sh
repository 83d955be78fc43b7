#!/usr/bin/env bash
# The whole test suite: start the servers it needs, lint and scan the AWS template, fuzz
# the HTTP API against its OpenAPI document (schemathesis, every check, bounded in time),
# then run every test in the workspace. Fails if any of them fails; the test runner's
# summary is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# The AWS template: cfn-lint, checkov and sam validate --lint, all clean (tools pinned,
# installed on first use).
infra=0
bash scripts/infra-check.sh || infra=$?
# One build for both: the fuzzed `karmic` and the tests share its artifacts (building the
# binary alone would unify features differently and compile the world a second time).
cargo build --workspace --all-targets
fuzz=0
KARMIC_BIN=target/debug/karmic bash scripts/schemathesis.sh || fuzz=$?
tests=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || tests=$?
else
  cargo test --workspace --no-fail-fast "$@" || tests=$?
fi
if [ "$infra" -ne 0 ]; then
  echo "the AWS template's checks failed (exit ${infra}); see [infra-check] above" >&2
fi
if [ "$fuzz" -ne 0 ]; then
  echo "schemathesis found failures (exit ${fuzz}); see above" >&2
fi
[ "$infra" -eq 0 ] && [ "$fuzz" -eq 0 ] && [ "$tests" -eq 0 ]
