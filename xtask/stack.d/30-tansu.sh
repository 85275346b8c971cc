#!/usr/bin/env bash
# tansu 0.6.0, the Kafka-protocol broker, on 127.0.0.1:9092 with PostgreSQL
# storage in the `tansu` database of the stack's PostgreSQL (not `test`), so
# it survives kill -9 and restarts and broker-outage tests are honest. Why not
# SQLite: see "Known limits of the local broker" in the workspace README.
# Installed from crates.io when missing (~12 min cold on 2 cores; reused from
# ~/.cargo/bin afterwards).
set -euo pipefail
: "${SOMA_STACK_DIR:?run through cargo xtask stack up}"
export PATH="$HOME/.cargo/bin:$PATH"
want="0.6.0"
# Both storage engines are built in (SQLite and PostgreSQL) so the stack can
# pick one; the marker records which features the installed binary has.
features="dynostore,libsql,postgres"
marker="$HOME/.cargo/tansu-$want.features"
if ! command -v tansu >/dev/null || ! tansu --version 2>/dev/null | grep -q "$want" \
   || [ "$(cat "$marker" 2>/dev/null)" != "$features" ]; then
  echo "stack: installing tansu $want with $features (cargo install, ~10 min cold)"
  cargo install tansu --locked --force --version "$want" --no-default-features --features "$features"
  echo "$features" >"$marker"
fi
port_open() { (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; }
if port_open; then
  exit 0
fi
dir="$SOMA_STACK_DIR/tansu"
mkdir -p "$dir"
# tansu does not create its PostgreSQL tables; tansu-pg-schema.sql (ours,
# derived from tansu's SQLite DDL and queries) does, idempotently.
db="tansu"
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='$db'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $db"
fi
PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -U postgres -d "$db" -q \
  -v ON_ERROR_STOP=1 -f "$SOMA_REPO/xtask/stack.d/tansu-pg-schema.sql"
echo "stack: starting tansu on 127.0.0.1:9092 (data in PostgreSQL database $db, log in $dir)"
cd "$dir"
# Loopback needs no TLS (sslmode=disable: the server's certificate names
# localhost, not 127.0.0.1, and tansu would refuse it). tansu reads a few
# variables (LISTENER_URL, STORAGE_ENGINE, ...) as flag defaults; the flags
# below win, and we clear them so nothing else leaks in.
env -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE -u CLUSTER_ID \
  nohup tansu broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine "postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" \
    >"$dir/tansu.log" 2>&1 &
echo $! >"$SOMA_STACK_DIR/tansu.pid"
for _ in $(seq 1 120); do
  port_open && exit 0
  sleep 0.25
done
echo "stack: tansu did not open 127.0.0.1:9092; log: $dir/tansu.log" >&2
tail -n 30 "$dir/tansu.log" >&2 || true
exit 1
