#!/usr/bin/env bash
# Make sure the servers the test suite talks to are up. Idempotent and quick when they are.
#   PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`)
#   Redis on 127.0.0.1:6379
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! pg_up; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
fi
pg_up || { log "PostgreSQL is not reachable on 127.0.0.1:5432"; exit 1; }
psql -h 127.0.0.1 -U postgres -d test -Atqc 'select 1' >/dev/null

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if command -v redis-server >/dev/null && ! redis_up; then
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
fi

# Drop databases left behind by test runs that were killed.
psql -h 127.0.0.1 -U postgres -d test -Atqc \
  "select datname from pg_database where datname like 'karmic_t_%'" |
  while read -r db; do
    [ -n "$db" ] && psql -h 127.0.0.1 -U postgres -d test -qc "drop database if exists \"$db\" with (force)" >/dev/null || true
  done
log "ready"
