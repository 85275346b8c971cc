"""PREPARE every query tansu 0.6.0's postgres engine uses against our schema.

Usage: python3 check_pg_queries.py postgresql://postgres@127.0.0.1:5432/tansu_eval

Prints, per query, the parameter and result types PostgreSQL infers (or the
error), so they can be compared with the Rust types pg.rs binds and reads.
Exit status 1 if any query fails to prepare.
"""
import glob
import os
import re
import sys

import psycopg

src = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/tansu-storage-0.6.0/src"))[0]
pg_rs = open(f"{src}/pg.rs").read()
used = sorted(set(re.findall(r'"([a-z_/-]+\.sql)"', pg_rs)))
files = {q: f"{src}/sql/{q}" for q in used if q not in ("ping.sql", "record_fetch_pg.sql")}
files["record_fetch_pg.sql"] = f"{src}/pg/record_fetch.sql"

conn = psycopg.connect(sys.argv[1], autocommit=True)
names = {r[0]: r[1] for r in conn.execute("select oid, typname from pg_type")}
failed = 0
for q, path in sorted(files.items()):
    text = "\n".join(line for line in open(path) if not line.lstrip().startswith("--")).strip()
    if text.upper().startswith("COPY"):
        print(f"{q:50} COPY (column types checked by hand)")
        continue
    name = q.replace(".sql", "").replace("/", "_").encode()
    res = conn.pgconn.prepare(name, text.encode())
    if res.error_message:
        failed += 1
        print(f"{q:50} ERROR {res.error_message.decode().strip()}")
        continue
    d = conn.pgconn.describe_prepared(name)
    params = [names[d.param_type(i)] for i in range(d.nparams)]
    result = [names[d.ftype(i)] for i in range(d.nfields)]
    print(f"{q:50} params {params} -> {result}")
    conn.execute(f"deallocate {name.decode()}")
sys.exit(1 if failed else 0)
