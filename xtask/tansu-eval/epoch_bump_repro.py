"""Minimal reproduction: an idempotent producer's local epoch bump vs tansu 0.6.0.

Usage: python3 epoch_bump_repro.py --storage URL --workdir DIR [--port 39094]

1. start tansu, produce one acked message (producer id P, epoch 0);
2. SIGSTOP the broker, produce one more message: its request stays in flight
   until message.timeout.ms (3 s) expires. The outcome is unknown, so
   librdkafka bumps the producer's epoch locally (KIP-360; no InitProducerId);
3. SIGCONT the broker and produce again: the batch carries (P, epoch 1).

tansu stores epochs only when it hands them out (InitProducerId), so
producer_select_for_update.sql finds no row for (P, 1): the SQLite engine
panics in query_one ("more or less than one row"), its single storage task
dies and every later request is answered UnableToSend; the PostgreSQL engine
answers the produce with an error (RowCount) and stays up, but rejects every
batch of that producer id from then on. A new producer (new id) works there.
"""
import argparse
import signal
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from broker import Broker

ap = argparse.ArgumentParser()
ap.add_argument("--storage", required=True)
ap.add_argument("--workdir", required=True)
ap.add_argument("--port", type=int, default=39094)
args = ap.parse_args()

b = Broker(args.port, args.storage, args.workdir)
b.start()
bootstrap = f"127.0.0.1:{args.port}"
topic = f"bump-{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": bootstrap})
admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()


def produce(p, what, wait):
    out = []
    p.produce(topic, b"x" * 200, on_delivery=lambda err, msg: out.append(err))
    p.flush(wait)
    print(f"{what}: {'no answer' if not out else out[0] or 'acked'}", flush=True)


p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
              "message.timeout.ms": 3000, "debug": "eos"})
produce(p, "1 before the stall", 10)
b.proc.send_signal(signal.SIGSTOP)
produce(p, "2 during the stall", 5)
b.proc.send_signal(signal.SIGCONT)
time.sleep(1)
produce(p, "3 after the stall (epoch bumped)", 10)
fresh = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                  "message.timeout.ms": 5000})
produce(fresh, "4 a fresh producer (new id)", 10)
text = open(f"{args.workdir}/tansu.log", "rb").read().decode(errors="replace")
print("broker log:", [l.strip() for l in text.splitlines()
                      if "panicked" in l or "more or less" in l or "RowCount" in l][:4])
b.stop(signal.SIGKILL)
