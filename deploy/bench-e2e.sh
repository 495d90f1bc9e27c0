#!/usr/bin/env bash
# End-to-end benchmark: config, routing, ingress and flow-callback (release builds) as separate
# processes against the local PostgreSQL, Redis and RabbitMQ, driven through the public doors by
# `mb-simulator bench` (signed webhooks, flow handovers; it reads routing's record for the
# latencies). Reports the peak resident memory of every service (the kernel's high-water mark).
#
# Settings: BENCH_RATE (1000 webhooks/s offered in the latency phase), BENCH_SECONDS (10 per
# phase), BENCH_CONCURRENCY (128 in flight in the throughput phase), BENCH_SHOPS (20),
# BENCH_AGENTS (50, each in every shop), ROUTING_SHARDS (cores), BENCH_SKIP_BUILD, CARGO_TARGET_DIR.
# Prints a table; record it in deploy/BENCHMARKS.md ("End to end").
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${BENCH_RATE:-1000}
SECONDS_PER_PHASE=${BENCH_SECONDS:-10}
CONCURRENCY=${BENCH_CONCURRENCY:-128}
SHOPS=${BENCH_SHOPS:-20}
AGENTS=${BENCH_AGENTS:-50}
# One shard per core by default (see deploy/bench-routing.sh).
export ROUTING_SHARDS=${ROUTING_SHARDS:-$(nproc)}
# routing needs one PostgreSQL connection per shard plus 8 (it refuses to start with fewer).
if [[ -z "${DATABASE_MAX_CONNECTIONS:-}" && $((ROUTING_SHARDS + 8)) -gt 16 ]]; then
  export DATABASE_MAX_CONNECTIONS=$((ROUTING_SHARDS + 8))
fi
DB_NAME="shopctrl_bench_$$"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB_NAME?sslmode=disable"
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/}
export AMQP_PREFIX="bench-e2e-$$."
export REDIS_KEY_PREFIX="bench-e2e-$$:" SLOTS_KEY_PREFIX="bench-e2e-$$:"
export LOG_FORMAT=json RUST_LOG=warn ALLOW_HTTP_WEBHOOK_URLS=true SSRF_ALLOW_CIDRS=127.0.0.0/8
export AUTH_TOKENS="shopctrl=bench-shopctrl-token-$$,ingress=bench-ingress-token-$$,routing=bench-routing-token-$$,flow-callback=bench-flowcb-token-$$"
CONFIG_PORT=50161 ROUTING_PORT=50162 HTTP_PORT=18090 API_PORT=19211 FLOW_PORT=19212
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql -h 127.0.0.1 -U postgres -qc "drop database if exists \"$DB_NAME\" with (force)" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "bench-e2e-$$:*" 2>/dev/null | xargs -r -n 500 redis-cli del >/dev/null 2>&1 || true
  # The exchanges (and the shard queues) under the run's prefix, through AMQP.
  if [[ -x "${BIN:-}/ingress-bench" ]]; then
    timeout 60 "$BIN/ingress-bench" teardown --amqp-url "$AMQP_URL" --prefix "$AMQP_PREFIX" \
      --shards "$ROUTING_SHARDS" >/dev/null 2>&1 || true
  fi
  if command -v rabbitmqctl >/dev/null; then
    for q in $(timeout 60 rabbitmqctl list_queues -q name 2>/dev/null | grep "^bench-e2e-$$\." || true); do
      timeout 30 rabbitmqctl delete_queue "$q" >/dev/null 2>&1 || true
    done
  fi
  if [[ -n "${BENCH_KEEP_LOGS:-}" ]]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# BENCH_KEEP_LOGS=1 keeps the services' logs (printed at the end).


if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
  echo "building release binaries..."
  cargo build --release --locked --workspace --bins
fi
BIN=${CARGO_TARGET_DIR:-target}/${BENCH_PROFILE:-release}

psql -h 127.0.0.1 -U postgres -qc "create database \"$DB_NAME\""
"$BIN/config" migrate >"$WORK/config.log" 2>&1
"$BIN/routing" migrate >"$WORK/routing.log" 2>&1

start() { # name ops-port command...
  local name=$1 ops=$2; shift 2
  OPS_LISTEN_ADDR=127.0.0.1:$ops "$@" >>"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  echo "$name $!" >>"$WORK/pids"
}
wait_ready() { # name ops-port
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$2/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$1 did not become ready:"; tail -20 "$WORK/$1.log"; exit 1
}

start config 19121 env GRPC_LISTEN_ADDR=127.0.0.1:$CONFIG_PORT "$BIN/config" serve
wait_ready config 19121
start routing 19122 env GRPC_LISTEN_ADDR=127.0.0.1:$ROUTING_PORT \
  CONFIG_GRPC_URL=http://127.0.0.1:$CONFIG_PORT CONFIG_SERVICE_TOKEN=bench-routing-token-$$ "$BIN/routing" serve
start ingress 19123 env HTTP_LISTEN_ADDR=127.0.0.1:$HTTP_PORT PUBLIC_BASE_URL=http://127.0.0.1:$HTTP_PORT \
  CONFIG_GRPC_URL=http://127.0.0.1:$CONFIG_PORT CONFIG_SERVICE_TOKEN=bench-ingress-token-$$ "$BIN/ingress" serve
start flow-callback 19124 env CONFIG_GRPC_URL=http://127.0.0.1:$CONFIG_PORT \
  CONFIG_SERVICE_TOKEN=bench-flowcb-token-$$ MESSAGEBIRD_API_BASE_URL=http://127.0.0.1:$API_PORT \
  "$BIN/flow-callback" serve
for s in routing:19122 ingress:19123 flow-callback:19124; do wait_ready "${s%%:*}" "${s##*:}"; done

echo "running the client: $SHOPS shops x $AGENTS agents, ${RATE}/s for ${SECONDS_PER_PHASE}s, then $CONCURRENCY in flight for ${SECONDS_PER_PHASE}s, then handovers..."
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
"$BIN/mb-simulator" bench --config-grpc http://127.0.0.1:$CONFIG_PORT \
  --ingress http://127.0.0.1:$HTTP_PORT --token "bench-shopctrl-token-$$" \
  --database-url "$DATABASE_URL" --flow-listen 127.0.0.1:$FLOW_PORT \
  --shops "$SHOPS" --agents "$AGENTS" --rate "$RATE" --seconds "$SECONDS_PER_PHASE" \
  --routing-metrics http://127.0.0.1:19122/metrics \
  --concurrency "$CONCURRENCY" >"$WORK/report.json"
# Peak resident memory of each service since it started, as the kernel tracks it (VmHWM): no
# sampling process competing for the two cores while the client runs.
while read -r name pid; do
  echo "$name $(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)"
done <"$WORK/pids" >"$WORK/rss"

j() { python3 -c "import json,sys; d=json.load(open('$WORK/report.json')); v=d$1; print(('%.1f' % v) if isinstance(v, float) else v)"; }
echo
echo "## End-to-end benchmark $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -r)), load avg before: $LOAD_BEFORE"
echo "workload: $SHOPS shops, $AGENTS agents each working for every shop, 1 in 5 webhooks starts a WhatsApp conversation, ROUTING_SHARDS=$ROUTING_SHARDS"
printf '| measure | value |\n|---|---|\n'
printf '| cold start: each shop'"'"'s first conversation, webhook → assignment recorded, p50 / max (ms) | %s / %s (%s of %s assigned) |\n' \
  "$(j "['cold_start']['webhook_to_assignment_ms']['p50']")" "$(j "['cold_start']['webhook_to_assignment_ms']['max']")" \
  "$(j "['cold_start']['assigned']")" "$(j "['cold_start']['conversations']")"
printf '| latency phase: offered | %s/s for %ss, %s sent, %s refused |\n' "$RATE" "$SECONDS_PER_PHASE" "$(j "['latency_phase']['sent']")" "$(j "['latency_phase']['refused']")"
printf '| webhook → assignment recorded, p50 / p99 / max (ms) | %s / **%s** / %s (%s of %s conversations assigned) |\n' \
  "$(j "['latency_phase']['webhook_to_assignment_ms']['p50']")" "$(j "['latency_phase']['webhook_to_assignment_ms']['p99']")" \
  "$(j "['latency_phase']['webhook_to_assignment_ms']['max']")" "$(j "['latency_phase']['assigned']")" "$(j "['latency_phase']['conversations_started']")"
printf '| of which: webhook → ingress answered 200, p50 / p99 (ms) | %s / %s |\n' \
  "$(j "['latency_phase']['webhook_answered_ms']['p50']")" "$(j "['latency_phase']['webhook_answered_ms']['p99']")"
printf '| of which: ingress received → routing committed, every event, p50 / p99 at most (ms, histogram bucket) | %s / %s |\n' \
  "$(j "['latency_phase']['received_to_committed_ms_at_most']['p50']")" "$(j "['latency_phase']['received_to_committed_ms_at_most']['p99']")"
printf '| throughput phase: accepted / recorded | %s / %s (%s in flight, sending %ss) |\n' \
  "$(j "['throughput_phase']['accepted']")" "$(j "['throughput_phase']['recorded']")" "$CONCURRENCY" "$(j "['throughput_phase']['sending_seconds']")"
printf '| **signed webhooks/s end to end** (first send → last recorded) | **%s** |\n' "$(j "['throughput_phase']['end_to_end_per_s']")"
printf '| handover → flow event delivered, p50 / p99 (ms) | %s / **%s** (%s of %s matched) |\n' \
  "$(j "['handover_phase']['handover_to_flow_event_ms']['p50']")" "$(j "['handover_phase']['handover_to_flow_event_ms']['p99']")" \
  "$(j "['handover_phase']['flow_events_matched']")" "$(j "['handover_phase']['handovers']")"
while read -r name kb; do
  printf '| peak RSS %s | %s MiB |\n' "$name" "$(awk -v k="$kb" 'BEGIN { printf "%.1f", k / 1024 }')"
done < <(sort "$WORK/rss")
