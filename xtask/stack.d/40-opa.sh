#!/usr/bin/env bash
# OPA's real Go evaluator for soma-policy's tests (RemoteOpa over HTTP and the
# regorus-vs-OPA differential test). No `opa` server binary comes from the
# registries we install from; the PyPI wheel `opa-golib-python-bindings`
# ships OPA v1.20.2 as a shared library with a ctypes wrapper. Its metadata
# says Python >= 3.14, but the library only needs ctypes, so we download the
# py3-none wheel for 3.14 and unpack it (no pip install) under
# .stack/opa/site, where xtask/testkit/opa_data_api.py (soma_testkit::OpaServer) loads it
# with the machine's python3. Idempotent; a no-op when already unpacked.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VERSION="0.4.4"
DEST="$ROOT/.stack/opa"
MARKER="$DEST/site/.installed-$VERSION"
if [ -f "$MARKER" ] && [ -f "$DEST/site/opa_bindings/libopabridge.so" ]; then
  exit 0
fi
echo "stack: installing OPA evaluator (opa-golib-python-bindings $VERSION)"
command -v python3 >/dev/null || { echo "stack: python3 is required for the OPA evaluator" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-pip; }
mkdir -p "$DEST/wheel"
python3 -m pip download --quiet --no-deps --python-version 3.14 --only-binary=:all: \
  -d "$DEST/wheel" "opa-golib-python-bindings==$VERSION"
WHEEL="$(ls "$DEST"/wheel/opa_golib_python_bindings-"$VERSION"-*.whl | head -n1)"
rm -rf "$DEST/site.tmp" && mkdir -p "$DEST/site.tmp"
python3 -m zipfile -e "$WHEEL" "$DEST/site.tmp"
# Smoke test: the shared library loads and evaluates a policy.
python3 - "$DEST/site.tmp" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from opa_bindings import OpaEngine
e = OpaEngine()
e.add_policy("smoke.rego", "package smoke\nallow if input.x == 1\n")
assert e.eval_document("smoke.allow", {"x": 1}) is True
PY
rm -rf "$DEST/site" && mv "$DEST/site.tmp" "$DEST/site"
touch "$DEST/site/.installed-$VERSION"
echo "stack: OPA evaluator ready in $DEST/site"
