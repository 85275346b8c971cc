#!/usr/bin/env bash
# Exposition-format checkers for soma-observability's `/metrics` tests:
# - promtool (from Debian's `prometheus` package): `promtool check metrics`
#   parses and lints the Prometheus text format. Only the promtool binary is
#   unpacked (to /opt/promtool); the Prometheus server in the same package is
#   neither installed as a service nor started.
# - python3-prometheus-client: its strict OpenMetrics parser checks the
#   OpenMetrics text format (run with Debian's /usr/bin/python3).
set -euo pipefail
if ! { command -v promtool >/dev/null 2>&1 && promtool --version >/dev/null 2>&1; }; then
  echo "stack: installing promtool"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (
    cd "$work"
    if ! apt-get download prometheus >/dev/null 2>&1; then
      apt-get update -qq
      apt-get download prometheus >/dev/null
    fi
    dpkg-deb -x prometheus_*.deb "$work/pkg"
  )
  mkdir -p /opt/promtool
  install -m 0755 "$work/pkg/usr/bin/promtool" /opt/promtool/promtool
  ln -sf /opt/promtool/promtool /usr/local/bin/promtool
  promtool --version >/dev/null || { echo "stack: promtool did not install" >&2; exit 1; }
fi
if ! /usr/bin/python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1; then
  echo "stack: installing python3-prometheus-client"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-prometheus-client >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-prometheus-client >/dev/null
  fi
  /usr/bin/python3 -c 'import prometheus_client.openmetrics.parser' || { echo "stack: python3-prometheus-client did not install" >&2; exit 1; }
fi
