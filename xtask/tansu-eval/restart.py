"""Restart (and stall) cycles with live idempotent producers (librdkafka, acks=all, enable.idempotence).

Usage: python3 restart.py --storage URL --workdir DIR [--port 39092] [--cycles 3]

Each cycle: produce steadily for --steady seconds, stop the broker (kill -9 on odd
steps, SIGTERM on even ones), keep producing while it is down for --down seconds,
start it again and measure the time to the first ack of a message produced after
the restart. A restart fails if no ack arrives within --ack-timeout seconds. At the
end every acked message is read back and counted (lost / duplicated).
"""
import argparse
import json
import re
import signal
import time
import uuid

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from broker import Broker

ap = argparse.ArgumentParser()
ap.add_argument("--storage", required=True)
ap.add_argument("--workdir", required=True)
ap.add_argument("--port", type=int, default=39092)
ap.add_argument("--cycles", type=int, default=3, help="pairs of (kill -9, SIGTERM)")
ap.add_argument("--producers", type=int, default=2)
ap.add_argument("--rate", type=float, default=50.0, help="msgs/s per producer")
ap.add_argument("--partitions", type=int, default=4)
ap.add_argument("--steady", type=float, default=8.0)
ap.add_argument("--down", type=float, default=2.0)
ap.add_argument("--ack-timeout", type=float, default=45.0)
ap.add_argument("--message-timeout-ms", type=int, default=60000,
                help="librdkafka message.timeout.ms; below --down messages time out in flight")
ap.add_argument("--heal", action="store_true",
                help="replace a producer (new producer id) after 3 failed deliveries in a row "
                     "with no ack in between, or a fatal error, as soma-bus's producer does")
ap.add_argument("--schedule", default="kill,term",
                help="repeating outage kinds: kill (kill -9), term (SIGTERM), stall (SIGSTOP for --down s)")
args = ap.parse_args()

broker = Broker(args.port, args.storage, args.workdir)
bootstrap = f"127.0.0.1:{args.port}"
broker.start()
topic = f"restart-{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": bootstrap})
for f in admin.create_topics([NewTopic(topic, args.partitions, 1)]).values():
    f.result()

acked = {}      # (producer, seq) -> ack time
failed = {}     # (producer, seq) -> error string
fatal = []      # (time, producer, error)
produced_at = {}


class P:
    """An idempotent producer configured like soma-bus; replaced (healed) after a fatal error."""

    def __init__(self, n):
        self.n, self.seq, self.generation = n, 0, 0
        self.failed_in_a_row = 0
        self.p = self.make()

    def make(self):
        def on_error(err):
            if err.fatal():
                fatal.append((time.monotonic(), self.n, str(err)))
        return Producer({
            "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
            "linger.ms": 5, "message.timeout.ms": args.message_timeout_ms, "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 1000, "error_cb": on_error,
        })

    def send(self):
        key = (self.n, self.seq)
        self.seq += 1
        produced_at[key] = time.monotonic()

        gen = self.generation

        def on_delivery(err, msg, key=key):
            if err is None:
                acked[key] = time.monotonic()
                if gen == self.generation:
                    self.failed_in_a_row = 0
            else:
                failed[key] = str(err)
                if gen == self.generation:
                    self.failed_in_a_row += 1
        value = json.dumps({"p": key[0], "s": key[1]}).encode().ljust(200, b" ")
        try:
            self.p.produce(topic, value=value, key=str(key[1] % 64).encode(), on_delivery=on_delivery)
        except BufferError as e:
            failed[key] = f"local: {e}"
        self.p.poll(0)

    def heal_if_fatal(self):
        is_fatal = fatal and fatal[-1][1] == self.n and fatal[-1][0] > getattr(self, "healed_at", 0)
        if is_fatal or (args.heal and self.failed_in_a_row >= 3):
            self.failed_in_a_row = 0
            self.p.purge()
            self.p.flush(1)
            self.p = self.make()
            self.generation += 1
            self.healed_at = time.monotonic()


producers = [P(n) for n in range(args.producers)]


def run_for(seconds):
    end = time.monotonic() + seconds
    interval = 1.0 / args.rate
    nxt = time.monotonic()
    while time.monotonic() < end:
        for p in producers:
            p.send()
            p.heal_if_fatal()
        nxt += interval
        while True:
            for p in producers:
                p.p.poll(0)
            delay = nxt - time.monotonic()
            if delay <= 0:
                break
            time.sleep(min(delay, 0.005))


def log_panics():
    text = open(f"{args.workdir}/tansu.log", "rb").read().decode(errors="replace")
    return [line.strip() for line in text.splitlines() if "panicked" in line]


events = []
run_for(args.steady)
kinds = args.schedule.split(",")
for step in range(len(kinds) * args.cycles):
    kind = kinds[step % len(kinds)]
    if kind == "stall":
        broker.proc.send_signal(signal.SIGSTOP)
        run_for(args.down)
        broker.proc.send_signal(signal.SIGCONT)
        t_up = time.monotonic()
    else:
        broker.stop(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        run_for(args.down)
        t_up = broker.start()
    # first ack of a message produced after the broker was back
    first_seq = {p.n: p.seq for p in producers}
    first_ack = None
    deadline = t_up + args.ack_timeout
    while time.monotonic() < deadline and first_ack is None:
        run_for(0.1)
        later = [t for (n, s), t in list(acked.items()) if s >= first_seq[n] and t >= t_up]
        if later:
            first_ack = min(later) - t_up
    ev = {"step": step, "outage": kind,
          "first_ack_after_start_s": None if first_ack is None else round(first_ack, 3),
          "broker_alive": broker.proc.poll() is None, "panics_so_far": len(log_panics())}
    events.append(ev)
    print(json.dumps(ev), flush=True)
    run_for(args.steady)

for p in producers:
    left = p.p.flush(60)
    if left:
        print(f"producer {p.n}: {left} messages still unacked after 60 s flush")

# read everything back
c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"rb-{uuid.uuid4().hex[:8]}",
              "auto.offset.reset": "earliest", "enable.auto.commit": False,
              # tansu 0.6.0 on PostgreSQL 15 cannot answer read_committed ListOffsets
              "isolation.level": "read_uncommitted",
              "enable.partition.eof": True})
highs = {}
for part in range(args.partitions):
    lo, hi = c.get_watermark_offsets(TopicPartition(topic, part), timeout=30)
    highs[part] = hi
c.assign([TopicPartition(topic, part, 0) for part in range(args.partitions)])
seen = {}
done = set(p for p, hi in highs.items() if hi == 0)
t0 = time.monotonic()
while len(done) < args.partitions and time.monotonic() - t0 < 300:
    m = c.poll(1.0)
    if m is None:
        continue
    if m.error():
        if m.error().code() == KafkaError._PARTITION_EOF:
            if m.offset() >= highs[m.partition()]:
                done.add(m.partition())
        continue
    d = json.loads(m.value())
    k = (d["p"], d["s"])
    seen[k] = seen.get(k, 0) + 1
c.close()

lost = [k for k in acked if k not in seen]
dups = {k: n for k, n in seen.items() if n > 1}
unacked_present = [k for k in seen if k not in acked]
summary = {
    "storage": args.storage.split("://")[0], "restarts": len(events),
    "restarts_recovered": sum(1 for e in events if e["first_ack_after_start_s"] is not None),
    "first_ack_s": [e["first_ack_after_start_s"] for e in events],
    "produced": sum(p.seq for p in producers), "acked": len(acked), "failed": len(failed),
    "failed_errors": sorted(set(re.sub(r"\d+", "N", e) for e in failed.values()))[:8],
    "fatal_producer_errors": [f[2] for f in fatal][:8], "producers_replaced": sum(p.generation for p in producers),
    "read_back": sum(seen.values()), "high_watermarks": highs,
    "lost_acked": len(lost), "duplicated": len(dups), "present_but_not_acked": len(unacked_present),
    "panics": log_panics()[:5], "events": events,
}
print(json.dumps(summary, indent=1), flush=True)
broker.stop(signal.SIGTERM)
