#!/usr/bin/env bash
# Ingress benchmark: the real ingress (release build) on loopback against the local RabbitMQ and
# Redis, loaded by wrk with genuine signed webhooks (one pre-signed JWT with a unique jti per
# request), next to three reference points measured in the same run:
#   plain   - a minimal HTTP server that reads the body and answers 200 (no verification, no publish)
#   bare    - a bare confirmed publisher (the shared Publisher) with the same number in flight,
#             publishing the same protobuf events straight to RabbitMQ
#   ceiling - the broker alone in the reference setup (1 KiB messages, one quorum queue, 256
#             unconfirmed, no HTTP), with its CPU time per message
# and an open-loop run at a fixed rate (`mb-simulator rate`: each request starts on its
# schedule, latency counted from that schedule) for the latency target at 5,000 webhooks/s.
# The config service is replaced by `ingress-bench fake-config` (ingress reaches it through its
# real gRPC client); signing keys are cached after the first request anyway.
#
# Settings: BENCH_DURATION (10 s), BENCH_CONNECTIONS (64), BENCH_THREADS (2), BENCH_RATE (5000),
# AMQP_URL, REDIS_URL, CARGO_TARGET_DIR, BENCH_SKIP_BUILD (use the binaries already built). Prints a table with ratios; record it in
# deploy/BENCHMARKS.md ("Ingress").
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
RATE=${BENCH_RATE:-5000}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/}
PREFIX="bench-ingress-$$."
HTTP_PORT=${BENCH_HTTP_PORT:-18080}
OPS_PORT=${BENCH_OPS_PORT:-19103}
PLAIN_PORT=${BENCH_PLAIN_PORT:-18081}
CONFIG_PORT=${BENCH_CONFIG_PORT:-50151}
SHOP=bench-shop
KEY="bench-signing-key-$RANDOM$RANDOM"
TOKEN=bench-ingress-token
PATH_=/webhooks/messagebird/$SHOP
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -x "${BIN:-}/ingress-bench" ]]; then
    "$BIN/ingress-bench" teardown --amqp-url "$AMQP_URL" --prefix "$PREFIX" >/dev/null 2>&1 || true
  fi
  # The replay memory's keys (one per signed request, kept for the token's lifetime).
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" 2>/dev/null \
    | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v wrk >/dev/null; then
  echo "installing wrk (apt)..."
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y wrk >/dev/null
fi

if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
  echo "building release binaries..."
  cargo build --release --locked -p shopctrl-ingress -p shopctrl-e2e --bins
fi
BIN=${CARGO_TARGET_DIR:-target}/${BENCH_PROFILE:-release}

wait_http() { # url
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2; return 1
}

"$BIN/ingress-bench" setup --amqp-url "$AMQP_URL" --prefix "$PREFIX"
"$BIN/ingress-bench" fake-config --listen "127.0.0.1:$CONFIG_PORT" --token "$TOKEN" \
  --shop "$SHOP" --signing-key "$KEY" >"$WORK/config.log" 2>&1 &
PIDS+=($!)
"$BIN/ingress-bench" plain-http --listen "127.0.0.1:$PLAIN_PORT" >"$WORK/plain.log" 2>&1 &
PIDS+=($!)
# Freed connection memory stays with the process, so the open-loop run (up to 1,000 connections
# when ingress falls behind) would set the full-load run's resident size: each run that reports
# memory gets a fresh ingress.
start_ingress() {
  HTTP_LISTEN_ADDR=127.0.0.1:$HTTP_PORT OPS_LISTEN_ADDR=127.0.0.1:$OPS_PORT \
    PUBLIC_BASE_URL=http://127.0.0.1:$HTTP_PORT AMQP_URL=$AMQP_URL AMQP_PREFIX=$PREFIX \
    REDIS_URL=$REDIS_URL REDIS_KEY_PREFIX="$PREFIX" ROUTING_SHARDS=4 \
    CONFIG_GRPC_URL=http://127.0.0.1:$CONFIG_PORT CONFIG_SERVICE_TOKEN=$TOKEN RUST_LOG=warn \
    "$BIN/ingress" >>"$WORK/ingress.log" 2>&1 &
  INGRESS_PID=$!
  PIDS+=($INGRESS_PID)
  wait_http "http://127.0.0.1:$OPS_PORT/readyz"
}
stop_ingress() {
  kill "$INGRESS_PID" 2>/dev/null || true
  wait "$INGRESS_PID" 2>/dev/null || true
  local kept=() pid
  for pid in "${PIDS[@]}"; do [[ "$pid" != "$INGRESS_PID" ]] && kept+=("$pid"); done
  PIDS=("${kept[@]}")
}
warm_up() { # dir: a short wrk run with requests of their own (reused tokens would be replays)
  BENCH_DIR=$1 BENCH_PATH=$PATH_ BENCH_THREADS=$THREADS \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s deploy/bench/ingress-wrk.lua "http://127.0.0.1:$HTTP_PORT" >/dev/null
}
watch_rss() { # file: peak resident KiB of the current ingress, until it exits or is killed
  ( peak=0; while kill -0 "$INGRESS_PID" 2>/dev/null; do
      rss=$(ps -o rss= -p "$INGRESS_PID" | tr -d ' '); [[ -n "$rss" && "$rss" -gt "$peak" ]] && peak=$rss
      echo "$peak" >"$1"; sleep 0.5; done ) &
  RSS_PID=$!
}
start_ingress

echo "signing requests..."
FULL_COUNT=$(( DURATION * 45000 ))
RATE_COUNT=$(( DURATION * RATE * 3 / 2 ))
"$BIN/mb-simulator" load-files --public-base "http://127.0.0.1:$HTTP_PORT" --shop "$SHOP" \
  --signing-key "$KEY" --count "$FULL_COUNT" --out-dir "$WORK/full"
"$BIN/mb-simulator" load-files --public-base "http://127.0.0.1:$HTTP_PORT" --shop "$SHOP" \
  --signing-key "$KEY" --count "$RATE_COUNT" --out-dir "$WORK/rate"
for warm in warm warm2; do
  "$BIN/mb-simulator" load-files --public-base "http://127.0.0.1:$HTTP_PORT" --shop "$SHOP" \
    --signing-key "$KEY" --count 20000 --out-dir "$WORK/$warm"
done

metric() { # name pattern -> value (0 when absent)
  curl -s "http://127.0.0.1:$OPS_PORT/metrics" | awk -v p="$1" 'index($0, p) == 1 { v = $2 } END { print (v == "" ? 0 : v) }'
}
to_ms() { # wrk latency like 320.00us / 4.30ms / 1.02s
  awk -v x="$1" 'BEGIN { n = x + 0; if (x ~ /us$/) n /= 1000; else if (x ~ /ms$/) n = n; else if (x ~ /s$/) n *= 1000; printf "%.2f", n }'
}
run_wrk() { # label dir url connections
  local label=$1 dir=$2 url=$3 conns=$4
  BENCH_DIR=$dir BENCH_PATH=$PATH_ BENCH_THREADS=$THREADS \
    wrk -t"$THREADS" -c"$conns" -d"${DURATION}s" --latency -s deploy/bench/ingress-wrk.lua "$url" >"$WORK/$label.wrk"
  local rps p50 p99 non2xx
  rps=$(awk '/^Requests\/sec:/ { printf "%d", $2 }' "$WORK/$label.wrk")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$WORK/$label.wrk")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$WORK/$label.wrk")")
  non2xx=$(awk '/Non-2xx/ { print $NF }' "$WORK/$label.wrk"); non2xx=${non2xx:-0}
  echo "$rps $p50 $p99 $non2xx"
}

echo "warm-up..."
warm_up "$WORK/warm"

echo "plain HTTP server ($CONNECTIONS connections, ${DURATION}s)..."
read -r PLAIN_RPS PLAIN_P50 PLAIN_P99 _ < <(run_wrk plain "$WORK/full" "http://127.0.0.1:$PLAIN_PORT" "$CONNECTIONS")

# Before the full-load run: the shard queues (nobody consumes them here) then hold only the
# warm-up, as they would with routing draining them, instead of their bounded maximum.
echo "ingress at $RATE/s offered, open loop (${DURATION}s)..."
watch_rss "$WORK/rate-rss"
RATE_JSON=$("$BIN/mb-simulator" rate --url "http://127.0.0.1:$HTTP_PORT$PATH_" --dir "$WORK/rate" \
  --rate "$RATE" --seconds "$DURATION")
rj() { echo "$RATE_JSON" | python3 -c "import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(('%.2f' % v) if isinstance(v, float) else v)" "$1"; }
RATE_RPS=$(awk -v ok="$(rj ok)" -v s="$DURATION" 'BEGIN { printf "%d", ok / s }')
RATE_P50=$(rj p50_ms); RATE_P99=$(rj p99_ms)
RATE_NON2XX=$(( $(rj non_2xx) + $(rj errors) )); RATE_LATE=$(rj late_starts)
kill "$RSS_PID" 2>/dev/null || true; wait "$RSS_PID" 2>/dev/null || true
RATE_RSS_MIB=$(awk '{ printf "%.1f", $1 / 1024 }' "$WORK/rate-rss")
RATE_REFUSED=$(metric 'ingress_refusals_total{reason="overloaded"}')
stop_ingress
start_ingress
warm_up "$WORK/warm2"

echo "ingress at full load ($CONNECTIONS connections, ${DURATION}s)..."
PUB0=$(metric 'ingress_published_total{kind="webhook"}'); REP0=$(metric 'ingress_replays_total')
watch_rss "$WORK/rss"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$INGRESS_PID/stat"; }
CPU0=$(cpu_ticks)
read -r ING_RPS ING_P50 ING_P99 ING_NON2XX < <(run_wrk ingress "$WORK/full" "http://127.0.0.1:$HTTP_PORT" "$CONNECTIONS")
CPU1=$(cpu_ticks)
kill "$RSS_PID" 2>/dev/null || true; wait "$RSS_PID" 2>/dev/null || true
RSS_MIB=$(awk '{ printf "%.1f", $1 / 1024 }' "$WORK/rss")
PUB1=$(metric 'ingress_published_total{kind="webhook"}'); REP1=$(metric 'ingress_replays_total')
PUBLISHED=$(awk -v a="$PUB0" -v b="$PUB1" 'BEGIN { printf "%d", b - a }')
REPLAYS=$(awk -v a="$REP0" -v b="$REP1" 'BEGIN { printf "%d", b - a }')
# CPU time the ingress process spent per published webhook: steadier than req/s on a shared,
# noisy machine, and what the throughput ceiling comes down to when every core is busy.
CPU_US=$(awk -v a="$CPU0" -v b="$CPU1" -v n="$PUBLISHED" -v hz="$(getconf CLK_TCK)" \
  'BEGIN { if (n > 0) printf "%.0f", (b - a) / hz * 1e6 / n; else print "n/a" }')


echo "bare confirmed publisher ($CONNECTIONS in flight, ${DURATION}s)..."
BARE_JSON=$("$BIN/ingress-bench" bare-publish --amqp-url "$AMQP_URL" --prefix "$PREFIX" \
  --concurrency "$CONNECTIONS" --seconds "$DURATION" --bodies "$WORK/full/bodies.txt")
BARE_RPS=$(echo "$BARE_JSON" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["rate"]))')
BARE_P50=$(echo "$BARE_JSON" | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["p50_ms"])')
BARE_P99=$(echo "$BARE_JSON" | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["p99_ms"])')

echo "broker ceiling in the reference setup (1 KiB, one quorum queue, 256 unconfirmed)..."
BROKER_PID=$(pgrep -o -f 'beam.smp.*rabbit boot' || true)
CEIL_JSON=$("$BIN/ingress-bench" broker-ceiling --amqp-url "$AMQP_URL" --prefix "$PREFIX" \
  --count 50000 ${BROKER_PID:+--broker-pid "$BROKER_PID"})
CEIL_RPS=$(echo "$CEIL_JSON" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["rate"]))')
CEIL_US=$(echo "$CEIL_JSON" | python3 -c 'import json,sys; v=json.load(sys.stdin)["broker_cpu_us_per_message"]; print("n/a" if v is None else "%.0f" % v)')

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo
echo "## Ingress benchmark $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -r)), load avg before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| run | req/s | p50 ms | p99 ms | notes |\n|---|---|---|---|---|\n'
printf '| plain HTTP server (no verify, no publish), %s conns | %s | %s | %s | ceiling of HTTP + wrk on this box |\n' "$CONNECTIONS" "$PLAIN_RPS" "$PLAIN_P50" "$PLAIN_P99"
printf '| bare confirmed publisher, %s in flight | %s | %s | %s | ceiling of RabbitMQ confirms (quorum, 4 shard queues) |\n' "$CONNECTIONS" "$BARE_RPS" "$BARE_P50" "$BARE_P99"
printf '| broker ceiling, reference setup (1 KiB, no properties, 1 quorum queue, 256 unconfirmed) | %s | | | broker CPU %s us per confirmed message |\n' "$CEIL_RPS" "$CEIL_US"
printf '| **ingress**, verified webhooks, %s conns | **%s** | %s | %s | non-2xx %s; published %s; replays %s; peak RSS %s MiB; ingress CPU %s us per published webhook |\n' "$CONNECTIONS" "$ING_RPS" "$ING_P50" "$ING_P99" "$ING_NON2XX" "$PUBLISHED" "$REPLAYS" "$RSS_MIB" "$CPU_US"
printf '| ingress at %s/s offered, open loop (latency from each request'"'"'s scheduled start) | %s | %s | **%s** | non-2xx or failed %s (refused as overloaded %s); late starts %s; peak RSS %s MiB (own ingress process) |\n' "$RATE" "$RATE_RPS" "$RATE_P50" "$RATE_P99" "$RATE_NON2XX" "$RATE_REFUSED" "$RATE_LATE" "$RATE_RSS_MIB"
echo
echo "ratios: ingress/plain = $(ratio "$ING_RPS" "$PLAIN_RPS"), ingress/bare publisher = $(ratio "$ING_RPS" "$BARE_RPS"), ingress/broker ceiling = $(ratio "$ING_RPS" "$CEIL_RPS")"
REFUSED=$( (curl -s "http://127.0.0.1:$OPS_PORT/metrics" || true) | awk '/^ingress_refusals_total\{/ { printf "%s%s", sep, $0; sep = "; " }')
echo "refusals in the full-load run: ${REFUSED:-none}"
echo "targets: >= 20000 verified/s: $ING_RPS; p99 < 15 ms at ~$RATE/s: $RATE_P99 ms (at $RATE_RPS/s); RSS < 64 MiB at full load: $RSS_MIB MiB ($RATE_RSS_MIB MiB in the open-loop run)"
