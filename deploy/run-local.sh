#!/usr/bin/env bash
# `make run`: starts config, routing, ingress, flow-callback and the MessageBird simulator as
# separate processes against the local PostgreSQL, Redis and RabbitMQ, then plays the demo.
# Logs go to .run/logs/<service>.log; Ctrl-C stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
RUN_DIR=.run
LOGS=$RUN_DIR/logs
mkdir -p "$LOGS"

DB_NAME=${DB_NAME:-shopctrl_messaging}
export DATABASE_URL=${DATABASE_URL:-"postgres://postgres@127.0.0.1:5432/$DB_NAME?sslmode=disable"}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/}
# A prefix of its own so the demo never mixes with other users of the same broker and Redis.
export AMQP_PREFIX=${AMQP_PREFIX:-demo.}
export REDIS_KEY_PREFIX=${REDIS_KEY_PREFIX:-demo:}
export SLOTS_KEY_PREFIX=${SLOTS_KEY_PREFIX:-demo:}
export ROUTING_SHARDS=${ROUTING_SHARDS:-4}
# routing needs one PostgreSQL connection per shard plus 8 (it refuses to start with fewer).
if [[ -z "${DATABASE_MAX_CONNECTIONS:-}" && $((ROUTING_SHARDS + 8)) -gt 16 ]]; then
  export DATABASE_MAX_CONNECTIONS=$((ROUTING_SHARDS + 8))
fi
export LOG_FORMAT=json RUST_LOG=${RUST_LOG:-info}
export ALLOW_HTTP_WEBHOOK_URLS=true
export SSRF_ALLOW_CIDRS=${SSRF_ALLOW_CIDRS:-127.0.0.0/8}
export AUTH_TOKENS="shopctrl=dev-shopctrl-token,ingress=dev-ingress-token,routing=dev-routing-token,flow-callback=dev-flow-callback-token"

SIM_API_PORT=${SIM_API_PORT:-9201}
SIM_FLOW_PORT=${SIM_FLOW_PORT:-9202}

pids=()
stop_all() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo
    echo "stopping: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "stopped. Logs stay in $LOGS/"
}
trap stop_all INT TERM EXIT

if ! psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname = '$DB_NAME'" | grep -q 1; then
  echo "creating database $DB_NAME"
  psql -h 127.0.0.1 -U postgres -qc "create database \"$DB_NAME\""
fi

echo "migrating"
"$BIN/config" migrate >>"$LOGS/config.log" 2>&1
"$BIN/routing" migrate >>"$LOGS/routing.log" 2>&1

start() {
  local name=$1 ops=$2; shift 2
  OPS_LISTEN_ADDR=127.0.0.1:$ops "$@" >>"$LOGS/$name.log" 2>&1 &
  pids+=($!)
  printf '  %-14s pid %-7s log %s\n' "$name" "$!" "$LOGS/$name.log"
}

wait_ready() {
  local name=$1 ops=$2 waited=0
  until curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1; do
    sleep 0.2; waited=$((waited + 1))
    if [ "$waited" -ge 300 ]; then echo "$name did not become ready; see $LOGS/$name.log"; exit 1; fi
  done
}

echo "starting services"
start config 9101 env GRPC_LISTEN_ADDR=127.0.0.1:50051 "$BIN/config" serve
wait_ready config 9101
start routing 9102 env GRPC_LISTEN_ADDR=127.0.0.1:50052 CONFIG_GRPC_URL=http://127.0.0.1:50051 \
  CONFIG_SERVICE_TOKEN=dev-routing-token "$BIN/routing" serve
start ingress 9103 env HTTP_LISTEN_ADDR=127.0.0.1:8080 PUBLIC_BASE_URL=http://127.0.0.1:8080 \
  CONFIG_GRPC_URL=http://127.0.0.1:50051 CONFIG_SERVICE_TOKEN=dev-ingress-token "$BIN/ingress" serve
start flow-callback 9104 env CONFIG_GRPC_URL=http://127.0.0.1:50051 CONFIG_SERVICE_TOKEN=dev-flow-callback-token \
  MESSAGEBIRD_API_BASE_URL=http://127.0.0.1:$SIM_API_PORT "$BIN/flow-callback" serve
for s in routing:9102 ingress:9103 flow-callback:9104; do wait_ready "${s%%:*}" "${s##*:}"; done
echo "all services ready"

"$BIN/mb-simulator" demo \
  --config-grpc http://127.0.0.1:50051 --routing-grpc http://127.0.0.1:50052 \
  --ingress http://127.0.0.1:8080 --token dev-shopctrl-token \
  --api-listen 127.0.0.1:$SIM_API_PORT --flow-listen 127.0.0.1:$SIM_FLOW_PORT \
  "$@"
