#!/usr/bin/env bash
# Slot claims per second: routing's claim function (services/routing/src/slots/lua/claim.lua,
# loaded with the other slot scripts as a Redis function library, as routing does) with
# realistic candidate sets, side by side with a trivial EVALSHA and a trivial FCALL on the same
# Redis in the same run, so the figure is a ratio to the server's own ceiling on this machine
# right now.
#
# Data: SHOPS shops with CANDIDATES employees each (drawn from EMPLOYEES, so every employee
# chats for several shops), 10 % of employees away, every employee already holding 0-4 open
# conversations. Each request claims a new conversation of a random shop for a random
# customer (drawn from 1000, so some come back and stickiness is exercised). The shop limit is
# high so the claims keep succeeding (a refused claim is cheaper: it writes nothing).
#
# Everything lives under a unique key prefix that is deleted at the end, and the library is
# loaded under a name of its own that is deleted at the end too; the server is never flushed.
# Usage: deploy/bench-routing-slots.sh   (env: REDIS_HOST, REDIS_PORT, CLIENTS,
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
lib="bench_slots_$$_$RANDOM"
libfile=$(mktemp)

cleanup() {
  cli --scan --pattern "${base}*" | xargs -r -n 1000 redis-cli -h "$HOST" -p "$PORT" unlink >/dev/null
  cli FUNCTION DELETE "$lib" >/dev/null 2>&1 || true
  rm -f "$libfile"
}
trap cleanup EXIT

echo "# setting up $SHOPS shops x $CANDIDATES candidates from $EMPLOYEES employees under $base" >&2
# One script writes the data in the layout of services/routing/src/slots/lua/common.lua: one
# state hash (epoch, shops with their packed candidate lists, struct-packed employee states:
# committed, pending, earliest expiry, idle, away, version) plus each employee's open set.
# redis-benchmark's __rand_int__ expands to 12 digits: shop ids use that form.
cli EVAL "
  local P, shops, emps, cands = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], '#epoch', '1')
  for s = 0, shops - 1 do
    local names = {}
    for k = 0, cands - 1 do
      local e = 'e:emp-' .. ((s * 7 + k * 131) % emps)
      local dup = false
      for _, x in ipairs(names) do if x == e then dup = true end end
      if not dup then table.insert(names, e) end
    end
    redis.call('HSET', KEYS[1], 's:' .. string.format('shop-%012d', s),
      struct.pack('>dI', 1000000, #names) .. table.concat(names, '\\0') .. '\\0')
  end
  for e = 0, emps - 1 do
    local n = e % 5
    for o = 1, n do redis.call('SADD', P .. 'emp:emp-' .. e .. ':open', 'pre-' .. e .. '-' .. o) end
    local away = 0
    if e % 10 == 0 then away = 1 end
    redis.call('HSET', KEYS[1], 'e:emp-' .. e, struct.pack('>iiddid', n, 0, 0, e - emps - 1, away, 0))
  end
  return 1" 1 "${P}st" "$P" "$SHOPS" "$EMPLOYEES" "$CANDIDATES" >/dev/null

# The library exactly as routing builds it (engine.rs, library_source), under the bench's own
# name, plus a trivial function for reference.
{
  printf '#!lua name=%s\n' "$lib"
  cat "$lua/common.lua"
  echo
  for op in claim assign confirm release config inspect repair rebuild; do
    printf "redis.register_function('%s_%s', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n" "$lib" "$op"
    cat "$lua/$op.lua"
    printf '\nend)\n'
  done
  printf "redis.register_function('%s_trivial', function() return 1 end)\n" "$lib"
} >"$libfile"
cli -x FUNCTION LOAD <"$libfile" >/dev/null
trivial_sha=$(cli SCRIPT LOAD "return 1")

# A sanity claim: it must take a slot.
reply=$(cli FCALL "${lib}_claim" 1 "${P}st" "$P" sanity-1 "shop-000000000001" cust-1 "$PENDING_TTL_MS" | head -1)
[[ "$reply" == "claimed" ]] || { echo "claim function answered '$reply', expected 'claimed'" >&2; exit 1; }

stats() { # total calls of command $1 and microseconds the server spent in them
  cli INFO commandstats | awk -F'[:=,]' -v c="cmdstat_$1" '$1 == c { print $3, $5 }'
}

rps() { # rps <command>...: requests per second, p50, p99 and server microseconds per call
  local before after cmd
  cmd=$(tr '[:upper:]' '[:lower:]' <<<"$1")
  before=$(stats "$cmd")
  redis-benchmark -h "$HOST" -p "$PORT" -c "$CLIENTS" -n "$REQUESTS" -r 1000 --csv "$@" \
    | awk -F'","' 'NR == 2 { gsub(/"/, "", $0); split($0, f, ","); printf "%s %s %s ", f[2], f[5], f[7] }'
  after=$(stats "$cmd")
  awk -v b="${before:-0 0}" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ");
    printf "%.1f\n", (y[2] - x[2]) / ((y[1] - x[1]) > 0 ? (y[1] - x[1]) : 1) }'
}

declare -a trivial claim
echo "round trivial_rps trivial_p50_ms trivial_p99_ms trivial_server_us fcall_trivial_rps fcall_trivial_server_us claim_rps claim_p50_ms claim_p99_ms claim_server_us ratio"
for ((r = 1; r <= ROUNDS; r++)); do
  t=$(rps EVALSHA "$trivial_sha" 1 "${P}trivial")
  f=$(rps FCALL "${lib}_trivial" 1 "${P}trivial")
  # Conversation ids: three random 12-digit groups, so repeats (cheap "existing" answers) are rare.
  c=$(rps FCALL "${lib}_claim" 1 "${P}st" "$P" "c__rand_int____rand_int____rand_int__" \
        "shop-__rand_int__" "cust-__rand_int__" "$PENDING_TTL_MS")
  read -r trps tp50 tp99 tus <<<"$t"
  read -r frps _ _ fus <<<"$f"
  read -r crps cp50 cp99 cus <<<"$c"
  trivial+=("$trps"); claim+=("$crps")
  ratio=$(awk -v a="$crps" -v b="$trps" 'BEGIN { printf "%.2f", a / b }')
  echo "$r $trps $tp50 $tp99 $tus $frps $fus $crps $cp50 $cp99 $cus $ratio"
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
mt=$(median "${trivial[@]}")
mc=$(median "${claim[@]}")
# Claims are `c:` fields of the state hash: count them with HSCAN (never blocks the server;
# --no-raw quotes the binary values, so every field is one line).
claims=0
cursor=0
while :; do
  page=$(cli --no-raw HSCAN "${P}st" "$cursor" MATCH 'c:*' COUNT 10000)
  cursor=$(head -1 <<<"$page" | sed -E 's/^1\) "([0-9]+)"$/\1/')
  claims=$((claims + $(grep -c ') "c:' <<<"$page" || true)))
  [[ "$cursor" == 0 ]] && break
done
echo
echo "median trivial EVALSHA: $mt/s; median claim: $mc/s; ratio $(awk -v a="$mc" -v b="$mt" 'BEGIN { printf "%.2f", a / b }') (target >= 0.50)"
echo "conversations claimed during the run: $claims (clients $CLIENTS, $REQUESTS requests per run, $ROUNDS rounds)"
