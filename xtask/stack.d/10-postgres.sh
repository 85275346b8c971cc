#!/usr/bin/env bash
# PostgreSQL 15 on 127.0.0.1:5432 with trust auth and a `test` database.
# Pre-started on this machine kind; start it if it is down.
set -euo pipefail
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "stack: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
fi
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "stack: PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "create database test"
fi
