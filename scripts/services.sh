#!/usr/bin/env bash
# Make sure the servers the test suite talks to are up. Idempotent and quick when they are.
#   PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`)
#   Redis on 127.0.0.1:6379
#   SecantusDB (DocumentDB stand-in) on 127.0.0.1:27017
#   moto (S3 and SQS) on 127.0.0.1:5000
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

redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
if command -v redis-server >/dev/null && ! redis_up; then
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
fi

# SecantusDB: a MongoDB-wire-compatible server standing in for DocumentDB.
SECANTUS_VERSION=0.7.0b3
MONGO_PORT=${KARMIC_TEST_MONGODB_PORT:-27017}
mongo_up() { python3 - "$MONGO_PORT" <<'PY' 2>/dev/null
import socket, struct, sys
# OP_MSG {ping: 1, $db: "admin"}: a real round trip, not just an open port.
doc = b"\x10ping\x00\x01\x00\x00\x00\x02$db\x00\x06\x00\x00\x00admin\x00\x00"
doc = struct.pack("<i", len(doc) + 4) + doc
body = struct.pack("<I", 0) + b"\x00" + doc
msg = struct.pack("<iiii", 16 + len(body), 1, 0, 2013) + body
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.sendall(msg)
sys.exit(0 if len(s.recv(16)) == 16 else 1)
PY
}
if ! mongo_up; then
  installed=$(pip show SecantusDB 2>/dev/null | sed -n 's/^Version: //p' || true)
  if ! command -v secantusd-py >/dev/null || [ "$installed" != "$SECANTUS_VERSION" ]; then
    log "installing SecantusDB ${SECANTUS_VERSION}"
    pip install --quiet --disable-pip-version-check "SecantusDB==${SECANTUS_VERSION}"
  fi
  log "starting SecantusDB on 127.0.0.1:${MONGO_PORT}"
  mkdir -p "${KARMIC_SECANTUS_DIR:-/var/tmp/karmic-secantus}"
  nohup secantusd-py --host 127.0.0.1 --port "$MONGO_PORT" \
    --storage-path "${KARMIC_SECANTUS_DIR:-/var/tmp/karmic-secantus}" \
    > /var/tmp/karmic-secantus.log 2>&1 &
  for _ in $(seq 1 120); do mongo_up && break; sleep 0.5; done
  mongo_up || { log "SecantusDB did not start; see /var/tmp/karmic-secantus.log"; exit 1; }
fi

# moto: S3 and SQS stand-ins (no signature checks, no DLQ move tasks).
MOTO_VERSION=5.2.1
MOTO_PORT=${KARMIC_TEST_MOTO_PORT:-5000}
moto_up() { curl -fsS -o /dev/null "http://127.0.0.1:${MOTO_PORT}/moto-api/" 2>/dev/null; }
if ! moto_up; then
  installed=$(pip show moto 2>/dev/null | sed -n 's/^Version: //p' || true)
  if ! command -v moto_server >/dev/null || [ "$installed" != "$MOTO_VERSION" ] ||
     ! python3 -c 'import flask, flask_cors' 2>/dev/null; then
    log "installing moto ${MOTO_VERSION}"
    pip install --quiet --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
  fi
  log "starting moto on 127.0.0.1:${MOTO_PORT}"
  nohup moto_server -H 127.0.0.1 -p "$MOTO_PORT" > /var/tmp/karmic-moto.log 2>&1 &
  for _ in $(seq 1 120); do moto_up && break; sleep 0.5; done
  moto_up || { log "moto did not start; see /var/tmp/karmic-moto.log"; exit 1; }
fi

# Drop databases left behind by test runs that were killed.
psql -h 127.0.0.1 -U postgres -d test -Atqc \
  "select datname from pg_database where datname like 'karmic_t_%'" |
  while read -r db; do
    [ -n "$db" ] && psql -h 127.0.0.1 -U postgres -d test -qc "drop database if exists \"$db\" with (force)" >/dev/null || true
  done
log "ready"
