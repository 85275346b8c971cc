#!/usr/bin/env bash
# The local memory service (examples/memory-service): a SomaBrain-compatible
# stand-in on PostgreSQL (schema soma_memory in db `test`), so the example
# platform's remember / recall / context / reward calls reach a real server.
# Listens on 127.0.0.1:9696 — the platform's somabrain.base_url — with token
# `local-dev-token` (examples/memory-service/config/local.toml).
#
# SOMA_MEMORY_BIND overrides the address (e.g. to try the script on a
# private port); SOMA_* settings of the service (SOMA_POSTGRES__SCHEMA, ...)
# pass through. Built with cargo into $CARGO_TARGET_DIR when set, else the
# workspace's target/. The pid goes to $SOMA_STACK_DIR/memory-service.pid
# (`cargo xtask stack down` stops it), the log to
# $SOMA_STACK_DIR/memory-service/memory-service.log.
set -euo pipefail
: "${SOMA_STACK_DIR:?run through cargo xtask stack up}"
ROOT="${SOMA_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
bind="${SOMA_MEMORY_BIND:-127.0.0.1:9696}"
pidfile="$SOMA_STACK_DIR/memory-service.pid"
dir="$SOMA_STACK_DIR/memory-service"
log="$dir/memory-service.log"
ready() { curl -fsS --max-time 2 "http://$bind/readyz" >/dev/null 2>&1; }

if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && ready; then
  exit 0
fi
taken() { (exec 3<>"/dev/tcp/${bind%:*}/${bind##*:}") 2>/dev/null; }
if taken; then
  # Another checkout's memory service (a second clone, a CI clone) holds the
  # port: this checkout's tests must meet this checkout's service, so stop
  # that one. Anything else on the port is left alone.
  pid="$(ss -Hltnp "sport = :${bind##*:}" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true)"
  exe="$(readlink "/proc/${pid:-0}/exe" 2>/dev/null || true)"
  exe="${exe% (deleted)}"
  if [ -n "$pid" ] && [ "$(basename "$exe")" = soma-memory-service ]; then
    echo "stack: $bind is held by another checkout's memory service ($exe, pid $pid); stopping it to start this checkout's" >&2
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do taken || break; sleep 0.25; done
  fi
  if taken; then
    echo "stack: $bind is taken by another process; not starting the memory service" >&2
    exit 1
  fi
fi

cd "$ROOT"
echo "stack: building soma-memory-service"
cargo build --quiet -p soma-memory-service
target="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$target" in /*) ;; *) target="$ROOT/$target" ;; esac
bin="$target/debug/soma-memory-service"

mkdir -p "$dir"
echo "stack: starting the memory service on $bind (log: $log)"
# The stack's own variables are not settings of the service.
env -u SOMA_STACK_DIR -u SOMA_REPO -u SOMA_MEMORY_BIND SOMA_HTTP__BIND="$bind" \
  nohup "$bin" --config "$ROOT/examples/memory-service/config/local.toml" \
  >"$log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 1 120); do
  ready && exit 0
  kill -0 "$(cat "$pidfile")" 2>/dev/null || break
  sleep 0.25
done
echo "stack: the memory service did not become ready on $bind; log: $log" >&2
tail -n 30 "$log" >&2 || true
exit 1
