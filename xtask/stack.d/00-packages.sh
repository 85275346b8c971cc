#!/usr/bin/env bash
# Debian packages the workspace builds need: cmake and libcurl for rdkafka's
# bundled librdkafka (`cmake-build`; Debian's librdkafka is too old for the
# broker), protobuf-compiler for OTLP codegen, redis-tools/postgresql-client for
# the readiness checks below.
set -euo pipefail
need=()
for p in cmake libcurl4-openssl-dev protobuf-compiler pkg-config libssl-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v psql >/dev/null || need+=(postgresql-client)
if ((${#need[@]})); then
  echo "stack: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
