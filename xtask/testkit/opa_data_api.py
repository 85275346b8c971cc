#!/usr/bin/env python3
"""Minimal OPA Data API server backed by OPA's real Go evaluator.

The evaluator comes from the `opa-golib-python-bindings` wheel (OPA v1.20.2
compiled as a shared library), unpacked by `xtask/stack.d/40-opa.sh` into
`.stack/opa/site`. This serves the subset of OPA's REST API the soma-policy
tests use, with OPA's own semantics:

  POST /v1/data/{path}   body {"input": ...}  ->  {"result": <value>}
                         (no "result" key when the document is undefined,
                          HTTP 400 with {"code", "message"} on a bad body,
                          HTTP 500 on an evaluation error)
  GET  /health           ->  {}

Test-only extra: GET /_received returns the request bodies received so far,
so a test can assert exactly what soma-policy sends to OPA.

Usage: opa_data_api.py --site DIR --policy-dir DIR --port N
Listens on 127.0.0.1 only.
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", required=True, help="directory holding opa_bindings")
    ap.add_argument("--policy-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()

    sys.path.insert(0, args.site)
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError  # noqa: E402

    engine = OpaEngine()
    for root, _dirs, files in os.walk(args.policy_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(".rego"):
                with open(path, encoding="utf-8") as f:
                    engine.add_policy(os.path.relpath(path, args.policy_dir), f.read())
            elif name == "data.json":
                with open(path, encoding="utf-8") as f:
                    engine.add_data(json.load(f))

    received = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; without TCP_NODELAY,
        # Nagle plus the client's delayed ACK adds ~40 ms to every reply.
        disable_nagle_algorithm = True

        def log_message(self, *_args):
            pass

        def _send(self, status, body):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/_received":
                with lock:
                    self._send(200, list(received))
            else:
                self._send(404, {"code": "not_found", "message": self.path})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self.path.startswith("/v1/data"):
                self._send(404, {"code": "not_found", "message": self.path})
                return
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ValueError("body must be an object")
            except ValueError as e:
                self._send(400, {"code": "invalid_parameter", "message": str(e)})
                return
            with lock:
                received.append(body)
            doc = self.path[len("/v1/data"):].strip("/").replace("/", ".")
            try:
                with lock:
                    result = engine.eval_document(doc, body.get("input"))
                self._send(200, {"result": result})
            except OpaUndefinedError:
                self._send(200, {})
            except OpaError as e:
                self._send(500, {"code": "internal_error", "message": str(e)})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
