#!/usr/bin/env bash
# `make bench`: every benchmark of the project, each measuring its raw ceiling in the same run
# and printing ratios; each records its figures in deploy/BENCHMARKS.md.
# BENCH_ONLY=ingress|routing|slots|e2e runs one of them.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
  local name=$1 script=$2
  if [ -n "${BENCH_ONLY:-}" ] && [ "$BENCH_ONLY" != "$name" ]; then return; fi
  echo "=== bench: $name ($script)"
  bash "$script"
}

run slots deploy/bench-routing-slots.sh
run routing deploy/bench-routing.sh
run ingress deploy/bench-ingress.sh
run e2e deploy/bench-e2e.sh
echo "=== results recorded in deploy/BENCHMARKS.md"
