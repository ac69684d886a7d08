#!/usr/bin/env bash
# Redis and Postgres for tests and the demo. When REDIS_URL / DATABASE_URL are set, those servers are used
# as they are; otherwise servers from Debian's packages are started on free loopback ports under the run
# directory (installed with apt-get first when missing and running as root).
#
#   hack/stores.sh up      start what is needed (or reuse), print the export lines
#   hack/stores.sh down    stop exactly the servers `up` started (by pid file)
#   hack/stores.sh env     print the export lines for running servers
#
# Postgres gets one database per service (order, inventory, payment, notification); DATABASE_URL names the
# `kubesaga` database, and tests create throwaway databases of their own through it.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

dir="$KUBESAGA_RUN_DIR/stores"
services=(order inventory payment notification)

redis_bin() { command -v redis-server || true; }

pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/postgres" ] && echo "$d"
}

# Postgres refuses to run as root; as root, its commands run as the `postgres` system user.
pg_owner=()
[ "$(id -u)" -eq 0 ] && pg_owner=(runuser -u postgres --)

# pg_home: where the cluster's data lives. As root, the postgres user must be able to reach it; when the run
# directory sits below a folder it cannot enter (a home directory), the data goes to a private folder in /tmp.
pg_home() {
  local home="$dir/postgres"
  mkdir -p "$home"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$home"
    chmod 700 "$home"
    if ! runuser -u postgres -- test -w "$home"; then
      home="/tmp/kubesaga-postgres-$(echo "$dir" | md5sum | cut -c1-12)"
      mkdir -p "$home"
      chown postgres: "$home"
      chmod 700 "$home"
    fi
  fi
  echo "$home"
}

redis_up() {
  if [ -n "${REDIS_URL:-}" ]; then
    echo "export REDIS_URL=$REDIS_URL"
    return 0
  fi
  local bin port
  [ -n "$(redis_bin)" ] || apt_install redis-server redis-tools
  bin=$(redis_bin)
  [ -n "$bin" ] || die "redis-server not found after install"
  if pid_alive "$dir/redis.pid" "$bin" && redis_port_ok; then
    log "reusing Redis on port $(cat "$dir/redis.port")"
  else
    mkdir -p "$dir/redis"
    port=$(free_port)
    # No persistence: this server holds test data only.
    start_daemon redis "$dir/redis.pid" "$dir/redis.log" "$bin" --bind 127.0.0.1 --port "$port" \
      --dir "$dir/redis" --save "" --appendonly no --protected-mode yes
    echo "$port" >"$dir/redis.port"
    wait_until 20 "redis ping" redis_port_ok || die "Redis did not answer within 20s; see $dir/redis.log"
  fi
  echo "export REDIS_URL=redis://127.0.0.1:$(cat "$dir/redis.port")"
}

redis_port_ok() {
  [ -f "$dir/redis.port" ] && (exec 3<>"/dev/tcp/127.0.0.1/$(cat "$dir/redis.port")" && printf 'PING\r\n' >&3 &&
    head -c 5 <&3 | grep -q PONG)
}

postgres_up() {
  if [ -n "${DATABASE_URL:-}" ]; then
    echo "export DATABASE_URL=$DATABASE_URL"
    return 0
  fi
  local bindir port
  bindir=$(pg_bindir) || true
  [ -n "$bindir" ] || apt_install postgresql
  bindir=$(pg_bindir) || die "no Postgres server binaries under /usr/lib/postgresql after install"
  if pid_alive "$dir/postgres.pid" "$bindir/postgres" && pg_ready "$bindir"; then
    log "reusing Postgres on port $(cat "$dir/postgres.port")"
  else
    local home
    home=$(pg_home)
    if [ ! -f "$home/data/PG_VERSION" ]; then
      "${pg_owner[@]}" "$bindir/initdb" -D "$home/data" -U kubesaga --auth=trust -E UTF8 >/dev/null ||
        die "initdb failed for $home/data"
    fi
    port=$(free_port)
    echo "$port" >"$dir/postgres.port"
    # fsync off and a short checkpoint interval: a throwaway test server, not a durable one.
    start_daemon postgres "$dir/postgres.pid" "$dir/postgres.log" "${pg_owner[@]}" "$bindir/postgres" \
      -D "$home/data" -h 127.0.0.1 -p "$port" -k "$home" \
      -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300
    wait_until 30 "postgres ready" pg_ready "$bindir" || die "Postgres did not start within 30s; see $dir/postgres.log"
    # runuser forks: record the server's own pid, so pid checks and `down` see the postmaster.
    head -n 1 "$home/data/postmaster.pid" >"$dir/postgres.pid"
  fi
  port=$(cat "$dir/postgres.port")
  local db
  for db in kubesaga "${services[@]}"; do
    if ! "$bindir/psql" -h 127.0.0.1 -p "$port" -U kubesaga -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      "$bindir/createdb" -h 127.0.0.1 -p "$port" -U kubesaga "$db"
    fi
  done
  echo "export DATABASE_URL=postgres://kubesaga@127.0.0.1:$port/kubesaga"
  for db in "${services[@]}"; do
    echo "export $(echo "$db" | tr '[:lower:]' '[:upper:]')_DATABASE_URL=postgres://kubesaga@127.0.0.1:$port/$db"
  done
}

pg_ready() {
  [ -f "$dir/postgres.port" ] && "$1/pg_isready" -q -h 127.0.0.1 -p "$(cat "$dir/postgres.port")"
}

down() {
  local bin bindir
  bin=$(redis_bin)
  [ -n "$bin" ] && stop_daemon redis "$dir/redis.pid" "$bin"
  bindir=$(pg_bindir) || true
  [ -n "$bindir" ] && stop_daemon postgres "$dir/postgres.pid" "$bindir/postgres" INT # fast shutdown: ends open sessions
  rm -f "$dir/redis.port" "$dir/postgres.port"
}

case "${1:-}" in
up)
  redis_up
  postgres_up
  ;;
down) down ;;
env)
  { [ -n "${REDIS_URL:-}" ] || redis_port_ok; } || die "Redis is not running: start it with 'hack/stores.sh up'"
  redis_up
  postgres_up
  ;;
*)
  echo "usage: $0 up|down|env" >&2
  exit 2
  ;;
esac
