#!/usr/bin/env bash
# Run the benchmarks (release build) and print a Markdown table; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo build --release -p tests -p worker --bins
cargo run --release -p tests --bin bench
# The command path at C=1 and C=16, fresh histories and one aggregate per client.
cargo run --release -p tests --bin command_path
# A burst of 1,000 sign-ins against a real `karmic serve` (load shedding, memory).
cargo run --release -p tests --bin login_burst
# The event history: export and verify on a million events against COPY (issue 10).
cargo run --release -p tests --bin audit_bench
# The document pipeline: worker throughput on 210 mixed files, upload-to-result latency,
# memory (issue 9).
cargo run --release -p tests --bin doc_bench
