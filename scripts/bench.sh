#!/usr/bin/env bash
# Run the benchmarks (release build) and print a Markdown table; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo run --release -p tests --bin bench
