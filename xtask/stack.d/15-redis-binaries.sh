#!/usr/bin/env bash
# redis-server, redis-cli and redis-benchmark binaries. soma-redis's restart
# test starts its own /usr/bin/redis-server on a free loopback port, the
# one-round-trip test reads `redis-cli monitor`, and its benchmark runs
# redis-benchmark side by side with the client. 20-redis.sh needs the server too.
set -euo pipefail
need=()
[ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v redis-cli >/dev/null && command -v redis-benchmark >/dev/null || need+=(redis-tools)
if ((${#need[@]})); then
  echo "stack: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the package from starting its own service; 20-redis.sh
  # starts the shared instance with the workspace's settings.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq "${need[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
  else
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
