#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ answer on localhost: starts them when installed but
# stopped, installs them from the OS packages when missing, then waits until each answers.
# Idempotent: when everything already runs it only checks. Used by `make run` and `make test`.
set -euo pipefail

PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
AMQP_PORT=${AMQP_PORT:-5672}
WAIT_SECONDS=${INFRA_WAIT_SECONDS:-90}

say() { printf '[infra] %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-; }

apt_install() {
  say "installing OS packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@"
}

wait_for() {
  local name=$1 check=$2 waited=0
  until eval "$check" >/dev/null 2>&1; do
    if [ "$waited" -ge "$WAIT_SECONDS" ]; then
      say "$name did not answer within ${WAIT_SECONDS}s"; return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  say "$name is up"
}

ensure_postgres() {
  if port_open "$PG_PORT"; then say "PostgreSQL already answers on $PG_PORT"; return; fi
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL "pg_isready -h 127.0.0.1 -p $PG_PORT"
  # Local development uses trust auth for the postgres user over TCP, like the CI machines.
  if ! psql -h 127.0.0.1 -U postgres -c 'select 1' >/dev/null 2>&1; then
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    say "enabling trust auth on 127.0.0.1 in $hba (local development only)"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_for "PostgreSQL (trust auth)" "psql -h 127.0.0.1 -U postgres -c 'select 1'"
  fi
}

ensure_redis() {
  if port_open "$REDIS_PORT"; then say "Redis already answers on $REDIS_PORT"; return; fi
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  say "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis "redis-cli -p $REDIS_PORT ping"
}

ensure_rabbitmq() {
  if port_open "$AMQP_PORT"; then say "RabbitMQ already answers on $AMQP_PORT"; return; fi
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  wait_for RabbitMQ "port_open $AMQP_PORT"
  # The port opens before the broker accepts logins; give it the moment it needs.
  wait_for "RabbitMQ (ready)" "as_root rabbitmqctl -q status"
}

ensure_postgres
ensure_redis
ensure_rabbitmq
