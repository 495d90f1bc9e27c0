#!/usr/bin/env bash
# Slot claims per second: routing's claim script (services/routing/src/slots/lua/claim.lua)
# with realistic candidate sets, side by side with a trivial EVALSHA on the same Redis in the
# same run, so the figure is a ratio to the server's own ceiling on this machine right now.
#
# Data: SHOPS shops with CANDIDATES employees each (drawn from EMPLOYEES, so every employee
# chats for several shops), 10 % of employees away, every employee already holding 0-4 open
# conversations. Each request claims a new conversation of a random shop for a random
# customer (a quarter of them returning, so stickiness is exercised). The shop limit is high
# so the claims keep succeeding (a refused claim is cheaper: it writes nothing).
#
# Everything lives under a unique key prefix that is deleted at the end; the server is never
# flushed. Usage: deploy/bench-routing-slots.sh   (env: REDIS_HOST, REDIS_PORT, CLIENTS,
# REQUESTS, ROUNDS, SHOPS, EMPLOYEES, CANDIDATES)
set -euo pipefail

HOST=${REDIS_HOST:-127.0.0.1}
PORT=${REDIS_PORT:-6379}
CLIENTS=${CLIENTS:-50}
REQUESTS=${REQUESTS:-200000}
ROUNDS=${ROUNDS:-3}
SHOPS=${SHOPS:-1000}
EMPLOYEES=${EMPLOYEES:-3000}
CANDIDATES=${CANDIDATES:-10}
PENDING_TTL_MS=${PENDING_TTL_MS:-600000}

here=$(cd "$(dirname "$0")/.." && pwd)
lua="$here/services/routing/src/slots/lua"
cli() { redis-cli -h "$HOST" -p "$PORT" "$@"; }

command -v redis-benchmark >/dev/null || { echo "redis-benchmark is required" >&2; exit 1; }
cli ping >/dev/null || { echo "Redis at $HOST:$PORT is not answering" >&2; exit 1; }

base="bench-slots-$$-$RANDOM:"
P="${base}{slots}:"

cleanup() {
  cli --scan --pattern "${base}*" | xargs -r -n 1000 redis-cli -h "$HOST" -p "$PORT" unlink >/dev/null
}
trap cleanup EXIT

echo "# setting up $SHOPS shops x $CANDIDATES candidates from $EMPLOYEES employees under $base" >&2
# One script writes the data in the layout of services/routing/src/slots/lua/common.lua (the
# employee state is struct-packed: committed, pending, earliest expiry, idle, away, version).
# redis-benchmark's __rand_int__ expands to 12 digits: shop ids use that form.
cli EVAL "
  local P, shops, emps, cands = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  redis.call('SET', KEYS[1], '1')
  for s = 0, shops - 1 do
    local shop = P .. 'shop:' .. string.format('shop-%012d', s)
    redis.call('HSET', shop, 'slots', 1000000)
    for k = 0, cands - 1 do
      redis.call('SADD', shop .. ':cand', 'emp-' .. ((s * 7 + k * 131) % emps))
    end
  end
  for e = 0, emps - 1 do
    local n = e % 5
    for o = 1, n do redis.call('SADD', P .. 'emp:emp-' .. e .. ':open', 'pre-' .. e .. '-' .. o) end
    local away = 0
    if e % 10 == 0 then away = 1 end
    redis.call('HSET', P .. 'st', 'emp-' .. e, struct.pack('>iiddid', n, 0, 0, e - emps - 1, away, 0))
  end
  return 1" 1 "${P}epoch" "$P" "$SHOPS" "$EMPLOYEES" "$CANDIDATES" >/dev/null

claim_sha=$(cli SCRIPT LOAD "$(cat "$lua/common.lua"; echo; cat "$lua/claim.lua")")
trivial_sha=$(cli SCRIPT LOAD "return 1")

# A sanity claim: it must take a slot.
reply=$(cli EVALSHA "$claim_sha" 1 "${P}epoch" "$P" sanity-1 "shop-000000000001" cust-1 "$PENDING_TTL_MS" | head -1)
[[ "$reply" == "claimed" ]] || { echo "claim script answered '$reply', expected 'claimed'" >&2; exit 1; }

evalsha_stats() { # total EVALSHA calls and microseconds the server spent in them
  cli INFO commandstats | awk -F'[:=,]' '/^cmdstat_evalsha:/ { print $3, $5 }'
}

rps() { # prints requests per second, p50, p99 and server microseconds per call
  local before after
  before=$(evalsha_stats)
  redis-benchmark -h "$HOST" -p "$PORT" -c "$CLIENTS" -n "$REQUESTS" -r 1000 --csv "$@" \
    | awk -F'","' 'NR == 2 { gsub(/"/, "", $0); split($0, f, ","); printf "%s %s %s ", f[2], f[5], f[7] }'
  after=$(evalsha_stats)
  awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ");
    printf "%.1f\n", (y[2] - x[2]) / ((y[1] - x[1]) > 0 ? (y[1] - x[1]) : 1) }'
}

declare -a trivial claim
echo "round trivial_rps trivial_p50_ms trivial_p99_ms trivial_server_us claim_rps claim_p50_ms claim_p99_ms claim_server_us ratio"
for ((r = 1; r <= ROUNDS; r++)); do
  t=$(rps EVALSHA "$trivial_sha" 1 "${P}trivial")
  # Conversation ids: three random 12-digit groups, so repeats (cheap "existing" answers) are rare.
  c=$(rps EVALSHA "$claim_sha" 1 "${P}epoch" "$P" "c__rand_int____rand_int____rand_int__" \
        "shop-__rand_int__" "cust-__rand_int__" "$PENDING_TTL_MS")
  read -r trps tp50 tp99 tus <<<"$t"
  read -r crps cp50 cp99 cus <<<"$c"
  trivial+=("$trps"); claim+=("$crps")
  ratio=$(awk -v a="$crps" -v b="$trps" 'BEGIN { printf "%.2f", a / b }')
  echo "$r $trps $tp50 $tp99 $tus $crps $cp50 $cp99 $cus $ratio"
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
mt=$(median "${trivial[@]}")
mc=$(median "${claim[@]}")
claims=$(cli --scan --pattern "${P}conv:*" | wc -l)
echo
echo "median trivial EVALSHA: $mt/s; median claim: $mc/s; ratio $(awk -v a="$mc" -v b="$mt" 'BEGIN { printf "%.2f", a / b }') (target >= 0.50)"
echo "conversations claimed during the run: $claims (clients $CLIENTS, $REQUESTS requests per run, $ROUNDS rounds)"
