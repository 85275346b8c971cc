"""Produce and fetch throughput of a private tansu at 1k and 100k stored records.

Usage: python3 bench.py --storage URL --workdir DIR [--partitions 1] [--sqlite-index]

Records are 200-byte values with a key and two headers (like soma-bus's
envelope headers). Produce: an idempotent producer (acks=all, linger.ms=5)
sends --probe records as fast as the broker acks them, timed from the first
send to the last ack (after one warm-up record that gets the producer id). Fetch: a consumer assigned every partition reads from
offset 0 (max.partition.fetch.bytes 64 KiB) for at most --fetch-cap seconds,
timed from its assignment (so the first fetch's latency counts).
Between the two measurements the topic is filled to the next size with a
batching producer (not timed). Prints one JSON line per measurement.
"""
import argparse
import json
import os
import sqlite3
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from broker import Broker

ap = argparse.ArgumentParser()
ap.add_argument("--storage", required=True)
ap.add_argument("--workdir", required=True)
ap.add_argument("--port", type=int, default=39095)
ap.add_argument("--partitions", type=int, default=1)
ap.add_argument("--sizes", default="1000,100000")
ap.add_argument("--probe", type=int, default=1000)
ap.add_argument("--fetch-cap", type=float, default=45.0)
ap.add_argument("--sqlite-index", action="store_true",
                help="create index header(topition, offset_id) once the broker made its tables")
args = ap.parse_args()

broker = Broker(args.port, args.storage, args.workdir)
broker.start()
bootstrap = f"127.0.0.1:{args.port}"
if args.sqlite_index:
    db = sqlite3.connect(os.path.join(args.workdir, "tansu.db"), timeout=30)
    db.execute("create index if not exists header_topition_offset_id on header (topition, offset_id)")
    db.commit()
    db.close()
topic = f"bench-{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": bootstrap})
admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result()
value = b"v" * 200
stored = 0


def produce(n, conf, warm_up=False):
    global stored
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", **conf})
    if warm_up:
        # producer id and metadata first, so the timing is the broker's produce path
        p.produce(topic, value, key=b"warm-up")
        p.flush(30)
        stored += 1
    acked, failed = [0], [0]

    def cb(err, msg):
        if err is None:
            acked[0] += 1
        else:
            failed[0] += 1
    t0 = time.monotonic()
    for i in range(n):
        while True:
            try:
                p.produce(topic, value, key=str(stored + i).encode(), on_delivery=cb,
                          headers=[("soma-id", uuid.uuid4().bytes),
                                   ("traceparent", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01")])
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    p.flush(600)
    dt = time.monotonic() - t0
    stored += acked[0]
    return acked[0], failed[0], dt


def fetch():
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"b-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "max.partition.fetch.bytes": 65536,
                  "isolation.level": "read_uncommitted",
                  "socket.timeout.ms": 120000})
    c.assign([TopicPartition(topic, part, 0) for part in range(args.partitions)])
    n, start, first = 0, time.monotonic(), None
    while n < stored and time.monotonic() - start < args.fetch_cap:
        for m in c.consume(500, 0.05):
            if not m.error():
                if first is None:
                    first = time.monotonic() - start
                n += 1
    dt = time.monotonic() - start
    c.close()
    return n, dt, first


engine = args.storage.split(":")[0] + (" +header index" if args.sqlite_index else "")
for size in [int(s) for s in args.sizes.split(",")]:
    fill = size - args.probe - 1 - stored
    if fill > 0:
        produce(fill, {"linger.ms": 50, "batch.num.messages": 2000, "enable.idempotence": False})
    acked, failed, dt = produce(args.probe, {"enable.idempotence": True, "linger.ms": 5},
                                warm_up=True)
    n, fdt, first = fetch()
    print(json.dumps({"engine": engine, "partitions": args.partitions, "stored": stored,
                      "produce_msgs_per_s": round(acked / dt), "produce_failed": failed,
                      "fetch_msgs_per_s": round(n / fdt), "fetched": n, "first_record_s": None if first is None else round(first, 2),
                      "fetch_capped": n < stored}), flush=True)
broker.stop()
