//! Relay behaviour against a real PostgreSQL: commit order, crashes,
//! several relays, retries and dead letters.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{RecordingSink, assert_ordered, fast_relay, first_publications, setup, wait_until};
use soma_outbox::{DeadLetterOrder, NewMessage, OutboxError, Relay, SinkOutcome};

/// The value of the (single) series `name` in Prometheus exposition `text`.
fn series<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
}

fn msg(key: &str, seq: u64) -> NewMessage {
    NewMessage::new("events", seq.to_string().into_bytes()).with_key(key)
}

/// Concurrent producers, one per key, each committing its messages in
/// sequence; long transactions (held open after writing) interleave with
/// short ones, and a relay drains all the while. No record may be skipped,
/// and each key's records must arrive in the order they were committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_commits_are_never_skipped_nor_reordered() {
    let db = setup("late").await;
    let sink = RecordingSink::new();
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_relay()).spawn();

    const KEYS: usize = 6;
    const PER_KEY: u64 = 25;
    let producers = (0..KEYS).map(|k| {
        let pool = db.pool.clone();
        let outbox = db.outbox.clone();
        async move {
            let key = format!("k{k}");
            for seq in 0..PER_KEY {
                let mut tx = pool.begin().await.unwrap();
                // Take the xid with the first write, like a business update would.
                outbox.enqueue(&mut tx, &[msg(&key, seq)]).await.unwrap();
                // Every third transaction of some keys stays open a while,
                // so later transactions of other keys commit before it.
                let hold = if (seq as usize + k).is_multiple_of(3) {
                    60 + 20 * (k as u64 % 3)
                } else {
                    0
                };
                tokio::time::sleep(Duration::from_millis(hold)).await;
                tx.commit().await.unwrap();
            }
        }
    });
    // A long transaction that also holds an *unrelated* write open for
    // longer than everything else: rows of later transactions wait for it.
    let blocker = {
        let pool = db.pool.clone();
        let outbox = db.outbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &[msg("blocker", 0)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            tx.commit().await.unwrap();
        }
    };
    futures::future::join(futures::future::join_all(producers), blocker).await;

    let total = KEYS as u64 * PER_KEY + 1;
    wait_until("all records published", Duration::from_secs(20), || async {
        sink.published().len() as u64 >= total
    })
    .await;
    relay.shutdown().await.unwrap();

    let published = sink.published();
    let ids: HashSet<_> = published.iter().map(|r| r.id).collect();
    assert_eq!(ids.len() as u64, total, "no record skipped");
    assert_eq!(
        published.len() as u64,
        total,
        "no duplicates without a crash"
    );
    let per_key = first_publications(&published);
    assert_ordered(&per_key);
    for k in 0..KEYS {
        assert_eq!(per_key[&format!("k{k}")].len() as u64, PER_KEY);
    }
    assert_eq!(db.pending().await, 0);
    db.drop_schema().await;
}

/// The precise late-commit case: transaction L writes message 0 of key
/// `x` and stays open; a later transaction writes message 1 of `x` and
/// commits first. A relay that read "what is committed, in id order" would
/// publish 1 and then 0, or skip 0 behind its cursor. Here 1 is held back
/// until L finishes, then both go out in transaction order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_committing_transaction_holds_back_later_ones_instead_of_being_reordered() {
    let db = setup("latecase").await;
    let sink = RecordingSink::new();
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_relay()).spawn();

    let mut long = db.pool.begin().await.unwrap();
    db.outbox.enqueue(&mut long, &[msg("x", 0)]).await.unwrap();
    db.outbox.enqueue_standalone(&[msg("x", 1)]).await.unwrap();
    // Unrelated keys committed after L are held back too (cost of the guard).
    db.outbox.enqueue_standalone(&[msg("y", 2)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        sink.published().is_empty(),
        "nothing after the open transaction may go out yet"
    );
    long.commit().await.unwrap();

    wait_until("all three published", Duration::from_secs(10), || async {
        sink.published().len() == 3
    })
    .await;
    relay.shutdown().await.unwrap();
    let per_key = first_publications(&sink.published());
    assert_eq!(per_key["x"], vec![0, 1]);
    db.drop_schema().await;
}

/// The relay publishes a batch and dies before committing: the next relay
/// publishes that batch again (at most a duplicate), nothing is lost, and
/// each key stays in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_between_publish_and_commit_duplicates_but_never_loses() {
    let db = setup("crash").await;
    let n = 300u64;
    let msgs: Vec<_> = (0..n).map(|i| msg(&format!("k{}", i % 7), i)).collect();
    db.outbox.enqueue_standalone(&msgs).await.unwrap();

    let sink = RecordingSink::new();
    let published_then_hung = sink.hang_after_next_publish();
    let mut cfg = fast_relay();
    cfg.batch_size = 50;
    let doomed = Relay::new(db.outbox.clone(), sink.clone(), cfg.clone()).spawn();
    let in_flight = tokio::time::timeout(Duration::from_secs(10), published_then_hung)
        .await
        .expect("first batch published")
        .unwrap();
    assert_eq!(in_flight, 50);
    doomed.abort(); // dies after the broker's ack, before its commit

    let survivor = Relay::new(db.outbox.clone(), sink.clone(), cfg).spawn();
    wait_until("outbox drained", Duration::from_secs(20), || async {
        db.pending().await == 0
    })
    .await;
    survivor.shutdown().await.unwrap();

    let published = sink.published();
    let distinct: HashSet<_> = published.iter().map(|r| r.id).collect();
    assert_eq!(distinct.len() as u64, n, "never a loss");
    let dups = published.len() as u64 - n;
    assert!(
        dups <= in_flight as u64,
        "duplicates only from the in-flight batch: {dups}"
    );
    assert_eq!(
        dups, in_flight as u64,
        "the uncommitted batch is published again"
    );
    assert_ordered(&first_publications(&published));
    db.drop_schema().await;
}

async fn drain_with_relays(relays: usize) {
    let db = setup(&format!("multi{relays}")).await;
    let n = 1_500u64;
    let keys = 40;
    let msgs: Vec<_> = (0..n).map(|i| msg(&format!("k{}", i % keys), i)).collect();
    for chunk in msgs.chunks(500) {
        db.outbox.enqueue_standalone(chunk).await.unwrap();
    }
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.batch_size = 20;
    cfg.shards = 12;
    // Slow the sink a little so the drain outlasts several rebalances.
    sink.set_rule(|_| None);
    let mut handles: Vec<_> = (0..relays)
        .map(|i| {
            Relay::new(
                db.outbox.clone(),
                SlowSink(sink.tagged(&format!("r{i}"))),
                cfg.clone(),
            )
            .spawn()
        })
        .collect();

    // All relays share the shards (one owner per shard).
    wait_until(
        "shards spread over every relay",
        Duration::from_secs(10),
        || {
            let owned: Vec<Vec<u32>> = handles.iter().map(|h| h.owned_shards()).collect();
            async move {
                let all: Vec<u32> = owned.iter().flatten().copied().collect();
                let distinct: HashSet<u32> = all.iter().copied().collect();
                owned.iter().all(|o| !o.is_empty()) && distinct.len() == all.len()
            }
        },
    )
    .await;

    // Kill one relay mid-drain once it has published something.
    let victim = handles.remove(0);
    wait_until("victim publishing", Duration::from_secs(20), || async {
        sink.published_tagged().iter().any(|(t, _)| t == "r0")
    })
    .await;
    let victim_shards = victim.owned_shards();
    victim.abort();
    let killed_at = std::time::Instant::now();

    // Survivors take its shards over within seconds.
    wait_until(
        "takeover of the dead relay's shards",
        Duration::from_secs(5),
        || {
            let owned: HashSet<u32> = handles.iter().flat_map(|h| h.owned_shards()).collect();
            let want = victim_shards.clone();
            async move { want.iter().all(|s| owned.contains(s)) && owned.len() == 12 }
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );

    wait_until("outbox drained", Duration::from_secs(30), || async {
        db.pending().await == 0
    })
    .await;
    for h in handles {
        h.shutdown().await.unwrap();
    }

    let published = sink.published_tagged();
    let mut count: HashMap<uuid::Uuid, Vec<String>> = HashMap::new();
    for (tag, r) in &published {
        count.entry(r.id).or_default().push(tag.clone());
    }
    assert_eq!(count.len() as u64, n, "every message delivered");
    // Duplicates only for the batch the killed relay had in flight: each
    // duplicated message was first published by the victim.
    let dups: Vec<_> = count.values().filter(|t| t.len() > 1).collect();
    assert!(
        dups.len() <= cfg.batch_size,
        "at most one in-flight batch duplicated: {}",
        dups.len()
    );
    for tags in &dups {
        assert_eq!(tags.len(), 2, "{tags:?}");
        assert_eq!(
            tags[0], "r0",
            "only the crashed relay's batch is republished: {tags:?}"
        );
    }
    assert_ordered(&first_publications(
        &published.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
    ));
    db.drop_schema().await;
}

/// A sink that takes a little time per batch, like a broker round trip.
struct SlowSink(common::TaggedSink);

#[async_trait::async_trait]
impl soma_outbox::Sink for SlowSink {
    async fn send_batch(&self, batch: &[soma_outbox::OutboxRecord]) -> Vec<SinkOutcome> {
        tokio::time::sleep(Duration::from_millis(15)).await;
        self.0.send_batch(batch).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_drain_together_and_take_over_from_a_dead_one() {
    drain_with_relays(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_drain_together_and_take_over_from_a_dead_one() {
    drain_with_relays(3).await;
}

/// Without a crash, relays running side by side never publish a message twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_without_a_crash_never_duplicate() {
    let db = setup("nodup").await;
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.batch_size = 25;
    cfg.shards = 6;
    let handles: Vec<_> = (0..3)
        .map(|i| {
            Relay::new(
                db.outbox.clone(),
                sink.tagged(&format!("r{i}")),
                cfg.clone(),
            )
            .spawn()
        })
        .collect();
    let n = 900u64;
    // Produce while relays start, rebalance and drain.
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let msgs: Vec<_> = chunk
            .iter()
            .map(|i| msg(&format!("k{}", i % 30), *i))
            .collect();
        db.outbox.enqueue_standalone(&msgs).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until("outbox drained", Duration::from_secs(30), || async {
        db.pending().await == 0
    })
    .await;
    for h in handles {
        h.shutdown().await.unwrap();
    }
    let published = sink.published();
    let distinct: HashSet<_> = published.iter().map(|r| r.id).collect();
    assert_eq!(distinct.len() as u64, n);
    assert_eq!(published.len() as u64, n, "no duplicates without a crash");
    assert_ordered(&first_publications(&published));
    db.drop_schema().await;
}

/// A failing record blocks its own key (in order) and no other; after
/// `max_attempts` it is dead-lettered with its error history. By default
/// (`DeadLetterOrder::BlockKey`) the later records of its key keep waiting
/// behind the dead letter; requeued, it goes back to its place and the key
/// drains in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_blocks_its_key_until_requeued_and_poison_never_stalls_other_keys() {
    let db = setup("dlq").await;
    let poison = msg("bad", 0);
    let poison_id = poison.id;
    let mut msgs = vec![poison];
    msgs.extend((1..4).map(|i| msg("bad", i))); // behind the poison record
    msgs.extend((0..50).map(|i| msg(&format!("good{}", i % 5), i)));
    db.outbox.enqueue_standalone(&msgs).await.unwrap();

    let sink = RecordingSink::new();
    sink.set_rule(move |r| (r.id == poison_id).then(|| SinkOutcome::retry("broker said no")));
    let mut cfg = fast_relay();
    cfg.max_attempts = 4;
    cfg.backoff_base_ms = 50;
    cfg.backoff_max_ms = 200;
    assert_eq!(cfg.dead_letter_order, DeadLetterOrder::BlockKey);
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg).spawn();

    // Other keys flow at once; the poison key's later records wait behind it.
    wait_until("other keys delivered", Duration::from_secs(10), || async {
        sink.published()
            .iter()
            .filter(|r| r.key.as_deref() != Some("bad"))
            .count()
            == 50
    })
    .await;
    wait_until("poison dead-lettered", Duration::from_secs(15), || async {
        db.outbox.dead_letters(10, None).await.unwrap().len() == 1
    })
    .await;
    // Well past the dead-lettering: the key stays blocked behind it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        sink.published()
            .iter()
            .filter(|r| r.key.as_deref() == Some("bad"))
            .count(),
        0,
        "no later record of a dead-lettered key overtakes it"
    );
    assert_eq!(db.pending().await, 3, "the key's later records wait");
    assert_eq!(
        sink.offered()
            .iter()
            .filter(|(r, _)| r.id == poison_id)
            .count(),
        4,
        "max_attempts tries"
    );
    let dead = db.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead[0].id, poison_id);
    assert_eq!(dead[0].attempts, 4);
    assert_eq!(dead[0].last_error, "broker said no");
    assert_eq!(
        dead[0].errors.as_array().unwrap().len(),
        4,
        "{:?}",
        dead[0].errors
    );
    wait_until("counters committed", Duration::from_secs(5), || async {
        let c = relay.counters();
        (c.dead_lettered, c.published) == (1, 50)
    })
    .await;
    assert!(relay.counters().failed >= 4);

    // Requeue: delivered first, in its original place, then the rest of the key.
    sink.clear_rule();
    db.outbox.requeue_dead_letter(poison_id).await.unwrap();
    wait_until("key drained", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    let bad: Vec<u64> = first_publications(&sink.published())["bad"].clone();
    assert_eq!(bad, vec![0, 1, 2, 3]);
    assert!(db.outbox.dead_letters(10, None).await.unwrap().is_empty());
    assert_eq!(relay.counters().order_violations, 0);
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// With `DeadLetterOrder::ReleaseKey` (an explicit choice) a dead letter
/// gives up its place: the key's later records proceed at once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_key_lets_later_records_proceed_past_a_dead_letter() {
    let db = setup("dlqrel").await;
    let poison = msg("bad", 0);
    let poison_id = poison.id;
    let mut msgs = vec![poison];
    msgs.extend((1..4).map(|i| msg("bad", i)));
    db.outbox.enqueue_standalone(&msgs).await.unwrap();
    let sink = RecordingSink::new();
    sink.set_rule(move |r| (r.id == poison_id).then(|| SinkOutcome::retry("broker said no")));
    let mut cfg = fast_relay();
    cfg.max_attempts = 3;
    cfg.dead_letter_order = DeadLetterOrder::ReleaseKey;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg).spawn();
    wait_until("key unblocked", Duration::from_secs(15), || async {
        db.pending().await == 0
    })
    .await;
    let bad: Vec<u64> = first_publications(&sink.published())["bad"].clone();
    assert_eq!(bad, vec![1, 2, 3]);
    assert_eq!(db.outbox.dead_letters(10, None).await.unwrap().len(), 1);
    // The later records were only offered after the poison record was settled.
    let offered = sink.offered();
    let last_poison_try = offered
        .iter()
        .rposition(|(r, _)| r.id == poison_id)
        .unwrap();
    let first_later = offered
        .iter()
        .position(|(r, o)| r.id != poison_id && *o == SinkOutcome::Delivered)
        .unwrap();
    assert!(first_later > last_poison_try);
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// A `Reject` dead-letters at once and holds its key; the replay guard
/// works; purging the dead letter releases the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_replay_guard_and_purge() {
    let db = common::setup_with("reject", |c| c.max_replays = 1).await;
    let m = msg("k", 0);
    let id = m.id;
    db.outbox
        .enqueue_standalone(&[m, msg("k", 1)])
        .await
        .unwrap();
    let sink = RecordingSink::new();
    sink.set_rule(move |r| (r.id == id).then(|| SinkOutcome::reject("too large for broker")));
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_relay()).spawn();
    wait_until("rejected", Duration::from_secs(10), || async {
        db.outbox.dead_letters(10, None).await.unwrap().len() == 1
    })
    .await;
    let dead = db.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!((dead.len(), dead[0].attempts), (1, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db.pending().await, 1, "the key's next record waits");
    assert!(sink.published().is_empty());

    // First requeue allowed, rejected again, second refused by the guard.
    db.outbox.requeue_dead_letter(id).await.unwrap();
    wait_until("rejected again", Duration::from_secs(10), || async {
        db.outbox.dead_letters(10, None).await.unwrap().len() == 1
    })
    .await;
    let e: OutboxError = db.outbox.requeue_dead_letter(id).await.unwrap_err();
    assert!(e.is_replay_limit(), "{e}");
    assert!(
        db.outbox
            .requeue_dead_letter(uuid::Uuid::now_v7())
            .await
            .unwrap_err()
            .is_not_found()
    );
    // The operator gives up on it: the key continues.
    assert_eq!(
        db.outbox
            .purge_dead_letters(Some(&[id]), None)
            .await
            .unwrap(),
        1
    );
    assert!(db.outbox.dead_letters(10, None).await.unwrap().is_empty());
    wait_until("next record delivered", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    assert_eq!(first_publications(&sink.published())["k"], vec![1]);
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// The sink is unavailable for far longer than `max_attempts` × backoff:
/// nothing is dead-lettered, no attempt is counted, the relay probes one
/// record at a time, reports degraded health and the wait metrics; when the
/// sink is back everything is delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unavailable_sink_costs_latency_never_messages_or_order() {
    let db = setup("unavail").await;
    let registry = soma_observability::metrics::MetricsRegistry::default();
    let health = soma_observability::health::HealthRegistry::new();
    let n = 120u64;
    let msgs: Vec<_> = (0..n).map(|i| msg(&format!("k{}", i % 6), i)).collect();
    db.outbox.enqueue_standalone(&msgs).await.unwrap();
    let sink = RecordingSink::new();
    sink.set_rule(|_| Some(SinkOutcome::unavailable("broker transport failure")));
    let mut cfg = fast_relay();
    cfg.max_attempts = 2;
    cfg.backoff_base_ms = 1;
    cfg.backoff_max_ms = 5;
    cfg.unavailable_backoff_initial_ms = 20;
    cfg.unavailable_backoff_max_ms = 80;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg)
        .metrics(&registry)
        .health(&health)
        .spawn();
    wait_until("relay backing off", Duration::from_secs(10), || async {
        relay.sink_unavailable() && sink.calls() >= 5
    })
    .await;
    let component = health
        .component("outbox_relay")
        .expect("outbox_relay component");
    assert_eq!(component.status.as_str(), "degraded", "{component:?}");
    // An outage many times max_attempts × backoff long.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_during = sink.calls();
    assert!(calls_during >= 20, "probed {calls_during} times");
    assert!(
        sink.offered().len() <= calls_during + 100,
        "while unavailable each probe offers one record (offered {} in {calls_during} calls)",
        sink.offered().len()
    );
    assert_eq!(db.pending().await, n, "nothing left the outbox");
    assert!(db.outbox.dead_letters(10, None).await.unwrap().is_empty());
    assert_eq!(
        relay.counters().failed,
        0,
        "unavailability is not an attempt"
    );
    let attempts: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(attempts), 0)::int8 FROM \"{}\".outbox",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 0);

    sink.clear_rule();
    wait_until(
        "drained after the outage",
        Duration::from_secs(10),
        || async { db.pending().await == 0 },
    )
    .await;
    let published = sink.published();
    assert_eq!(published.len() as u64, n, "each record once");
    assert_ordered(&first_publications(&published));
    assert!(!relay.sink_unavailable());
    let component = health.component("outbox_relay").unwrap();
    assert_eq!(component.status.as_str(), "up");
    let text = registry.encode();
    let value = |name: &str| -> f64 { series(&text, name).parse().unwrap() };
    assert_eq!(value("soma_outbox_relay_sink_unavailable"), 0.0);
    assert!(value("soma_outbox_relay_sink_wait_milliseconds_total") >= 2_000.0);
    assert_eq!(value("soma_outbox_failed_total"), 0.0);
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// After an outage the relay leaves its backoff when the sink answers a
/// probe, whatever the answer: a probe it refuses (dead-lettered) shows the
/// sink is reachable, so health, the gauge and `sink_unavailable()` say so
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_probe_the_sink_refuses_ends_the_backoff_it_answered() {
    let db = setup("refprobe").await;
    let registry = soma_observability::metrics::MetricsRegistry::default();
    let health = soma_observability::health::HealthRegistry::new();
    let poison = msg("p", 0);
    let pid = poison.id;
    db.outbox.enqueue_standalone(&[poison]).await.unwrap();
    let sink = RecordingSink::new();
    sink.set_rule(|_| Some(SinkOutcome::unavailable("broker transport failure")));
    let mut cfg = fast_relay();
    // Long enough that a relay still backing off is seen backing off.
    cfg.unavailable_backoff_initial_ms = 2_000;
    cfg.unavailable_backoff_max_ms = 2_000;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg)
        .metrics(&registry)
        .health(&health)
        .spawn();
    wait_until("relay backing off", Duration::from_secs(10), || async {
        relay.sink_unavailable()
    })
    .await;
    // The broker is back and refuses the one waiting record.
    sink.set_rule(move |r| (r.id == pid).then(|| SinkOutcome::reject("record too large")));
    wait_until("probe refused", Duration::from_secs(10), || async {
        relay.counters().dead_lettered == 1
    })
    .await;
    // (The flag is cleared as the relay takes the batch's result, just
    // after the counters.)
    wait_until(
        "the backoff left: the sink answered",
        Duration::from_secs(1),
        || async { !relay.sink_unavailable() },
    )
    .await;
    let component = health.component("outbox_relay").unwrap();
    assert_eq!(component.status.as_str(), "up", "{component:?}");
    let text = registry.encode();
    assert_eq!(series(&text, "soma_outbox_relay_sink_unavailable"), "0");
    db.outbox.enqueue_standalone(&[msg("k", 1)]).await.unwrap();
    wait_until("published", Duration::from_secs(10), || async {
        sink.published().len() == 1
    })
    .await;
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// The opt-in maximum age dead-letters a message the sink could not take
/// in time, even while the sink is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_after_secs_is_the_only_way_an_outage_dead_letters() {
    let db = setup("maxage").await;
    db.outbox
        .enqueue_standalone(&[msg("k", 0), msg("k", 1)])
        .await
        .unwrap();
    let sink = RecordingSink::new();
    sink.set_rule(|_| Some(SinkOutcome::unavailable("broker down")));
    let enqueued = std::time::Instant::now();
    let mut cfg = fast_relay();
    cfg.dead_letter_after_secs = 3;
    cfg.dead_letter_order = DeadLetterOrder::ReleaseKey;
    cfg.unavailable_backoff_initial_ms = 20;
    cfg.unavailable_backoff_max_ms = 50;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg).spawn();
    // Probed many times meanwhile, and younger than 3 s: still waiting.
    tokio::time::sleep_until((enqueued + Duration::from_secs(1)).into()).await;
    assert!(sink.calls() >= 5, "probed {} times", sink.calls());
    assert!(
        db.outbox.dead_letters(10, None).await.unwrap().is_empty(),
        "dead-lettered before dead_letter_after_secs"
    );
    wait_until("both aged out", Duration::from_secs(10), || async {
        db.outbox.dead_letters(10, None).await.unwrap().len() == 2
    })
    .await;
    let dead = db.outbox.dead_letters(10, None).await.unwrap();
    assert!(
        dead.iter()
            .all(|d| d.last_error.contains("dead_letter_after_secs")),
        "{dead:?}"
    );
    assert!(sink.published().is_empty());
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// A sink that does not answer within `sink_timeout_ms` counts as
/// unavailable: no attempt is counted, the record keeps its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_timeout_is_unavailability_not_an_attempt() {
    let db = setup("sinkto").await;
    db.outbox
        .enqueue_standalone(&[msg("k", 0), msg("k", 1)])
        .await
        .unwrap();
    let slow = StalledSink {
        slow: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        inner: RecordingSink::new(),
    };
    let mut cfg = fast_relay();
    cfg.sink_timeout_ms = 50;
    cfg.max_attempts = 1;
    cfg.unavailable_backoff_initial_ms = 10;
    cfg.unavailable_backoff_max_ms = 20;
    let relay = Relay::new(db.outbox.clone(), slow.clone(), cfg).spawn();
    wait_until("backing off", Duration::from_secs(10), || async {
        relay.sink_unavailable()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(db.outbox.dead_letters(10, None).await.unwrap().is_empty());
    assert_eq!(relay.counters().failed, 0);
    slow.slow.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until("delivered", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    assert_eq!(first_publications(&slow.inner.published())["k"], vec![0, 1]);
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// Sleeps past any timeout while `slow` is set, then records like [`RecordingSink`].
#[derive(Clone)]
struct StalledSink {
    slow: Arc<std::sync::atomic::AtomicBool>,
    inner: RecordingSink,
}

#[async_trait::async_trait]
impl soma_outbox::Sink for StalledSink {
    async fn send_batch(&self, batch: &[soma_outbox::OutboxRecord]) -> Vec<SinkOutcome> {
        if self.slow.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        self.inner.send_batch(batch).await
    }
}

/// Graceful shutdown finishes the in-flight batch (it is committed, not
/// re-published).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_the_in_flight_batch() {
    let db = setup("shutdown").await;
    let msgs: Vec<_> = (0..40).map(|i| msg("k", i)).collect();
    db.outbox.enqueue_standalone(&msgs).await.unwrap();
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.batch_size = 40;
    let relay = Relay::new(db.outbox.clone(), SlowSink(sink.tagged("r")), cfg).spawn();
    wait_until("batch in flight", Duration::from_secs(10), || async {
        sink.calls() > 0
    })
    .await;
    relay.shutdown().await.unwrap();
    assert_eq!(sink.published().len(), 40);
    assert_eq!(
        db.pending().await,
        0,
        "in-flight batch committed on shutdown"
    );
    db.drop_schema().await;
}

/// Retention keeps delivered rows marked sent (they still dedupe) and they
/// are not delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_marks_sent_and_keeps_deduping() {
    let db = setup("retain").await;
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.retention_secs = 3600;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg);
    let printed = format!("{relay:?}");
    assert!(
        printed.starts_with("Relay")
            && printed.contains(&db.schema)
            && printed.contains("retention_secs: 3600"),
        "{printed}"
    );
    let relay = relay.spawn();
    let m = msg("k", 0).with_dedupe_key("order-1");
    db.outbox.enqueue_standalone(&[m]).await.unwrap();
    wait_until("delivered", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    let again = db
        .outbox
        .enqueue_standalone(&[msg("k", 1).with_dedupe_key("order-1")])
        .await
        .unwrap();
    assert!(
        !again[0].is_inserted(),
        "sent message still dedupes during retention"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.shutdown().await.unwrap();
    assert_eq!(sink.published().len(), 1);
    let purge = |retention| db.outbox.purge_sent(retention, 100);
    assert_eq!(
        purge(Duration::from_secs(3600)).await.unwrap(),
        0,
        "kept within retention"
    );
    assert_eq!(purge(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(purge(Duration::ZERO).await.unwrap(), 0, "purged once");
    db.drop_schema().await;
}

/// The relay's monitor purges what outlived the retention by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_purges_sent_messages_once_their_retention_passed() {
    let db = setup("retain1").await;
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.retention_secs = 1;
    cfg.stats_interval_ms = 100;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg).spawn();
    db.outbox.enqueue_standalone(&[msg("k", 0)]).await.unwrap();
    let rows = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM \"{}\".outbox", db.schema))
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    wait_until("delivered", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    wait_until(
        "purged after its second of retention",
        Duration::from_secs(10),
        || async { rows().await == 0 },
    )
    .await;
    relay.shutdown().await.unwrap();
    assert_eq!(sink.published().len(), 1);
    db.drop_schema().await;
}

/// A relay with a different shard count than running relays refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_must_agree_on_the_shard_count() {
    let db = setup("shards").await;
    let with_shards = |shards| {
        let mut c = fast_relay();
        c.shards = shards;
        c
    };
    let a = Relay::new(db.outbox.clone(), RecordingSink::new(), with_shards(4)).spawn();
    wait_until(
        "first relay owns shards",
        Duration::from_secs(10),
        || async { !a.owned_shards().is_empty() },
    )
    .await;
    let b = Relay::new(db.outbox.clone(), RecordingSink::new(), with_shards(5)).spawn();
    wait_until("second relay stops", Duration::from_secs(10), || async {
        b.is_finished()
    })
    .await;
    assert!(b.shutdown().await.unwrap_err().is_shard_count_mismatch());
    a.shutdown().await.unwrap();
    // With no relay running, the count may change.
    let c = Relay::new(db.outbox.clone(), RecordingSink::new(), with_shards(5)).spawn();
    wait_until(
        "relay with new count owns shards",
        Duration::from_secs(10),
        || async { c.owned_shards().len() == 5 },
    )
    .await;
    c.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// The relay exports its metrics through soma-observability.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_exported() {
    let db = setup("metrics").await;
    let registry = soma_observability::metrics::MetricsRegistry::default();
    let poison = msg("p", 0);
    let pid = poison.id;
    db.outbox
        .enqueue_standalone(&[poison, msg("a", 1), msg("b", 2)])
        .await
        .unwrap();
    let sink = RecordingSink::new();
    sink.set_rule(move |r| (r.id == pid).then(|| SinkOutcome::reject("nope")));
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_relay())
        .metrics(&registry)
        .spawn();
    wait_until("drained", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    // Gauges refresh every stats interval (200 ms in tests).
    let want = "soma_outbox_dead_letters{";
    let mut text = String::new();
    for _ in 0..100 {
        text = registry.encode();
        if text
            .lines()
            .any(|l| l.starts_with(want) && l.ends_with(" 1"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.shutdown().await.unwrap();
    let line = |name: &str| series(&text, name).to_owned();
    assert_eq!(line("soma_outbox_published_total"), "2");
    assert_eq!(line("soma_outbox_dead_lettered_total"), "1");
    assert_eq!(line("soma_outbox_pending"), "0");
    assert_eq!(line("soma_outbox_dead_letters"), "1");
    assert!(text.contains("soma_outbox_relay_batch_duration_seconds_bucket"));
    assert!(text.contains("soma_outbox_oldest_pending_age_seconds"));
    db.drop_schema().await;
}

/// The server kills the relay's connection mid-drain (as after a network
/// loss): the open batch rolls back, the relay reconnects, takes its shards
/// again and finishes; nothing is lost and each key stays in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_reconnects_after_its_connection_is_killed() {
    let db = setup("kill").await;
    let n = 600u64;
    let msgs: Vec<_> = (0..n).map(|i| msg(&format!("k{}", i % 9), i)).collect();
    db.outbox.enqueue_standalone(&msgs).await.unwrap();
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.batch_size = 20;
    let relay = Relay::new(db.outbox.clone(), SlowSink(sink.tagged("r")), cfg).spawn();
    wait_until("draining", Duration::from_secs(10), || async {
        sink.published().len() > 60
    })
    .await;

    kill_relay_session(&db).await;

    wait_until(
        "drained after reconnect",
        Duration::from_secs(20),
        || async { db.pending().await == 0 },
    )
    .await;
    assert_eq!(relay.owned_shards().len(), 8, "shards re-acquired");
    relay.shutdown().await.unwrap();
    let published = sink.published();
    let distinct: HashSet<_> = published.iter().map(|r| r.id).collect();
    assert_eq!(distinct.len() as u64, n, "nothing lost");
    assert!(
        published.len() as u64 - n <= 20,
        "at most the in-flight batch again"
    );
    assert_ordered(&first_publications(&published));
    db.drop_schema().await;
}

/// An idle relay wakes on NOTIFY at once; without notifications it still
/// finds work by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wakes_on_notify_and_falls_back_to_polling() {
    let db = setup("wake").await;
    let sink = RecordingSink::new();
    // Polling alone would take a minute.
    let mut slow_poll = fast_relay();
    slow_poll.poll_interval_ms = 60_000;
    slow_poll.rebalance_interval_ms = 60_000;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), slow_poll).spawn();
    wait_until("relay owns shards", Duration::from_secs(10), || async {
        relay.owned_shards().len() == 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let it go idle
    let start = std::time::Instant::now();
    db.outbox.enqueue_standalone(&[msg("k", 0)]).await.unwrap();
    wait_until("woken by NOTIFY", Duration::from_secs(5), || async {
        sink.published().len() == 1
    })
    .await;
    assert!(start.elapsed() < Duration::from_secs(5));
    relay.shutdown().await.unwrap();

    // No notifications at all (trigger disabled): polling finds the message.
    sqlx::query(&format!(
        "ALTER TABLE \"{}\".outbox DISABLE TRIGGER outbox_notify",
        db.schema
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut fast_poll = fast_relay();
    fast_poll.poll_interval_ms = 100;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_poll).spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.outbox.enqueue_standalone(&[msg("k", 1)]).await.unwrap();
    wait_until("found by polling", Duration::from_secs(5), || async {
        sink.published().len() == 2
    })
    .await;
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// Ownership of `handles`, sorted per relay.
fn ownership(handles: &[&soma_outbox::RelayHandle]) -> Vec<Vec<u32>> {
    handles
        .iter()
        .map(|h| {
            let mut o = h.owned_shards();
            o.sort_unstable();
            o
        })
        .collect()
}

/// True when `owned` covers `shards` exactly once with no relay above its
/// fair share (`shards / relays`, rounded up).
fn exactly_fair(owned: &[Vec<u32>], shards: u32) -> bool {
    let fair = shards.div_ceil(owned.len() as u32) as usize;
    let all: Vec<u32> = owned.iter().flatten().copied().collect();
    let distinct: HashSet<u32> = all.iter().copied().collect();
    all.len() == shards as usize
        && distinct.len() == all.len()
        && owned.iter().all(|o| o.len() <= fair)
}

/// Scale-out hand-over without a crash: a relay running alone owns every
/// shard; a second one joins, the first *gives up* half (unlocks them) and
/// the second actually acquires and drains them. Ownership ends exactly
/// fair and stays so (no shard given up and taken back in a loop), and a
/// third relay makes it four each. Nothing is published twice: no shard is
/// ever owned by two relays at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_relay_takes_over_exactly_the_shards_the_first_gives_up() {
    let db = setup("handover").await;
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.shards = 12;
    cfg.batch_size = 10;
    let a = Relay::new(db.outbox.clone(), sink.tagged("a"), cfg.clone()).spawn();
    wait_until("a owns all 12 shards", Duration::from_secs(10), || async {
        a.owned_shards().len() == 12
    })
    .await;

    let b = Relay::new(db.outbox.clone(), sink.tagged("b"), cfg.clone()).spawn();
    wait_until("6 + 6 after b joins", Duration::from_secs(10), || async {
        exactly_fair(&ownership(&[&a, &b]), 12)
    })
    .await;
    // Stable: over several rebalance intervals nothing moves, not even a
    // shard given up and taken back within one rebalance.
    let settled = ownership(&[&a, &b]);
    assert_eq!(settled.iter().map(Vec::len).collect::<Vec<_>>(), [6, 6]);
    let moves = |hs: &[&soma_outbox::RelayHandle]| -> Vec<u64> {
        hs.iter().map(|h| h.counters().shard_moves).collect()
    };
    // a took 12 and gave up 6; b took 6.
    let before = moves(&[&a, &b]);
    assert_eq!(before, [18, 6], "shard moves so far");
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            ownership(&[&a, &b]),
            settled,
            "ownership moved while stable"
        );
    }
    assert_eq!(moves(&[&a, &b]), before, "shards flapped while stable");

    // b really processes the shards a gave up: with 60 keys every shard
    // gets records, and each relay publishes only records of its own shards.
    let n = 600u64;
    let msgs: Vec<_> = (0..n).map(|i| msg(&format!("h{}", i % 60), i)).collect();
    db.outbox.enqueue_standalone(&msgs).await.unwrap();
    wait_until("drained by a and b", Duration::from_secs(20), || async {
        db.pending().await == 0
    })
    .await;
    let published = sink.published_tagged();
    assert_eq!(published.len() as u64, n, "each record once");
    let mut by_key: HashMap<String, HashSet<String>> = HashMap::new();
    for (tag, r) in &published {
        by_key
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .insert(tag.clone());
    }
    let b_keys = by_key.values().filter(|t| t.contains("b")).count();
    let a_keys = by_key.values().filter(|t| t.contains("a")).count();
    assert!(
        a_keys > 0 && b_keys > 0,
        "both relays drain their shards (a: {a_keys} keys, b: {b_keys} keys)"
    );
    assert!(
        by_key.values().all(|t| t.len() == 1),
        "a key is published by one relay only while ownership is stable"
    );
    assert_ordered(&first_publications(
        &published.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
    ));

    let c = Relay::new(db.outbox.clone(), sink.tagged("c"), cfg.clone()).spawn();
    wait_until(
        "4 + 4 + 4 after c joins",
        Duration::from_secs(10),
        || async {
            let o = ownership(&[&a, &b, &c]);
            exactly_fair(&o, 12) && o.iter().all(|s| s.len() == 4)
        },
    )
    .await;
    // A graceful leave hands its shards back: the two left end 6 + 6.
    c.shutdown().await.unwrap();
    wait_until("6 + 6 after c leaves", Duration::from_secs(10), || async {
        let o = ownership(&[&a, &b]);
        exactly_fair(&o, 12) && o.iter().all(|s| s.len() == 6)
    })
    .await;
    // Shards taken back after a leave are really released on the next
    // join (a relay that locked a shard it already held would hold it
    // twice, and one unlock would not free it).
    let d = Relay::new(db.outbox.clone(), sink.tagged("d"), cfg.clone()).spawn();
    wait_until(
        "4 + 4 + 4 after d joins",
        Duration::from_secs(10),
        || async {
            let o = ownership(&[&a, &b, &d]);
            exactly_fair(&o, 12) && o.iter().all(|s| s.len() == 4)
        },
    )
    .await;
    d.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// A sink that breaks the contract once: of the first batch holding two
/// records of key `v`, it fails the first and delivers the second.
struct OneViolation {
    inner: RecordingSink,
    done: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl soma_outbox::Sink for OneViolation {
    async fn send_batch(&self, batch: &[soma_outbox::OutboxRecord]) -> Vec<SinkOutcome> {
        use std::sync::atomic::Ordering;
        let vs: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].key.as_deref() == Some("v"))
            .collect();
        if vs.len() >= 2 && !self.done.swap(true, Ordering::SeqCst) {
            let mut out = Vec::with_capacity(batch.len());
            for (i, _) in batch.iter().enumerate() {
                out.push(if i == vs[0] {
                    SinkOutcome::retry("first of v fails")
                } else {
                    SinkOutcome::Delivered
                });
            }
            return out;
        }
        self.inner.send_batch(batch).await
    }
}

/// A sink that delivers a later record of a key after failing an earlier
/// one is a contract violation: the relay counts exactly that one, in its
/// counters and in `soma_outbox_relay_order_violations_total`, and a sink
/// that keeps the contract counts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_order_violation_is_counted_once_in_counters_and_metrics() {
    let db = setup("violation").await;
    let registry = soma_observability::metrics::MetricsRegistry::default();
    db.outbox
        .enqueue_standalone(&[msg("v", 0), msg("v", 1), msg("w", 2), msg("v", 3)])
        .await
        .unwrap();
    let sink = OneViolation {
        inner: RecordingSink::new(),
        done: Default::default(),
    };
    let relay = Relay::new(db.outbox.clone(), sink, fast_relay())
        .metrics(&registry)
        .spawn();
    wait_until("drained", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    let counters = relay.counters();
    relay.shutdown().await.unwrap();
    // v1 and v3 were delivered while v0 failed: two later records of the
    // key went out ahead of it.
    assert_eq!(counters.order_violations, 2, "{counters:?}");
    assert_eq!(
        series(
            &registry.encode(),
            "soma_outbox_relay_order_violations_total"
        ),
        "2"
    );
    assert_eq!(counters.published, 4, "{counters:?}");
    db.drop_schema().await;

    // The same records through a sink that keeps the contract: none.
    let db = setup("noviolation").await;
    db.outbox
        .enqueue_standalone(&[msg("v", 0), msg("v", 1), msg("v", 3)])
        .await
        .unwrap();
    let sink = RecordingSink::new();
    let first = std::sync::atomic::AtomicBool::new(true);
    sink.set_rule(move |r| {
        (r.key.as_deref() == Some("v") && first.swap(false, std::sync::atomic::Ordering::SeqCst))
            .then(|| SinkOutcome::retry("first fails"))
    });
    let relay = Relay::new(db.outbox.clone(), sink, fast_relay()).spawn();
    wait_until("drained", Duration::from_secs(10), || async {
        db.pending().await == 0
    })
    .await;
    assert_eq!(relay.counters().order_violations, 0);
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// `.metrics(&registry)` exports the relay's families and `.health(&health)`
/// registers the component `outbox_relay` (as the relay is built).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_plug_in_through_the_registries() {
    let db = setup("plugin").await;
    let registry = soma_observability::MetricsRegistry::default();
    let health = soma_observability::HealthRegistry::new();
    let sink = RecordingSink::new();
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_relay())
        .metrics(&registry)
        .health(&health);
    let component = health
        .component("outbox_relay")
        .expect("outbox_relay component");
    assert_eq!(component.status.as_str(), "up");
    let relay = relay.spawn();
    db.outbox.enqueue_standalone(&[msg("k", 0)]).await.unwrap();
    wait_until("published", Duration::from_secs(10), || async {
        sink.published().len() == 1
    })
    .await;
    relay.shutdown().await.unwrap();
    let text = registry.encode();
    assert_eq!(series(&text, "soma_outbox_published_total"), "1", "{text}");
    assert!(text.contains("soma_outbox_relay_batch_duration_seconds_bucket{"));
    db.drop_schema().await;
}

/// Terminates the relay's own session (as after a network loss), asserting
/// it was exactly one connection.
async fn kill_relay_session(db: &common::TestDb) {
    let app = format!("soma-outbox-relay {}", db.schema);
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&app)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(killed, vec![true], "exactly the relay's own connection");
}

/// Scans of `schema.outbox` the server has counted so far (every claim
/// query scans it once; the statistics reach other sessions within about a
/// second).
async fn outbox_scans(db: &common::TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int8
         FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'outbox'",
    )
    .bind(&db.schema)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// An idle relay claims once per poll interval: after a wake-up it polls
/// fast only briefly (also when the wake-up found nothing claimable yet,
/// because an older transaction is still open), and a batch that found
/// nothing never loops straight into the next one. Without this, a relay
/// that spins or keeps polling fast costs the database hundreds of claims
/// a second while every functional test still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_relay_claims_once_per_poll_interval_even_after_a_wake_up() {
    let db = setup("idle").await;
    let sink = RecordingSink::new();
    let mut cfg = fast_relay();
    cfg.poll_interval_ms = 500;
    cfg.rebalance_interval_ms = 60_000;
    cfg.stats_interval_ms = 60_000;
    let relay = Relay::new(db.outbox.clone(), sink.clone(), cfg).spawn();
    wait_until("relay owns shards", Duration::from_secs(10), || async {
        relay.owned_shards().len() == 8
    })
    .await;
    // 4 s at one claim per 500 ms is 8 claims (a claim may scan the table
    // up to three times; the statistics may lag about a second at either
    // end). Spinning or 5 ms polling would be hundreds.
    let idle_claims = async |what: &str| {
        // Past the fast polling, and past the statistics' flush delay.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let before = outbox_scans(&db).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let scans = outbox_scans(&db).await - before;
        assert!(
            (4..=60).contains(&scans),
            "{what}: an idle relay polling every 500 ms scanned the outbox {scans} times in 4 s"
        );
    };

    // A message wakes the relay (NOTIFY) and is published.
    db.outbox.enqueue_standalone(&[msg("k", 0)]).await.unwrap();
    wait_until("published", Duration::from_secs(10), || async {
        sink.published().len() == 1
    })
    .await;
    idle_claims("after a wake-up that found work").await;

    // A wake-up that finds nothing claimable: the message committed after
    // a transaction that is still open waits for it.
    let mut open = db.pool.begin().await.unwrap();
    db.outbox.enqueue(&mut open, &[msg("a", 1)]).await.unwrap();
    db.outbox.enqueue_standalone(&[msg("b", 2)]).await.unwrap();
    idle_claims("after a wake-up that found nothing claimable").await;
    assert_eq!(
        sink.published().len(),
        1,
        "held behind the open transaction"
    );
    open.commit().await.unwrap();
    wait_until("both published", Duration::from_secs(10), || async {
        sink.published().len() == 3
    })
    .await;
    relay.shutdown().await.unwrap();
    db.drop_schema().await;
}

/// `soma_outbox_relay_shards_owned` follows what the relay holds: all
/// shards once it runs, the same after its connection is killed and it
/// takes them again (not twice), none after shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shards_owned_gauge_follows_ownership_through_a_reconnect_and_shutdown() {
    let db = setup("gauge").await;
    let registry = soma_observability::MetricsRegistry::default();
    let sink = RecordingSink::new();
    let relay = Relay::new(db.outbox.clone(), sink.clone(), fast_relay())
        .metrics(&registry)
        .spawn();
    let gauge = || series(&registry.encode(), "soma_outbox_relay_shards_owned").to_owned();
    // (The gauge follows the shared view of the owned shards by a few
    // instructions: wait for both.)
    wait_until("relay owns shards", Duration::from_secs(10), || async {
        relay.owned_shards().len() == 8 && gauge() == "8"
    })
    .await;

    kill_relay_session(&db).await;
    // The relay notices at its next claim, gives its shards up and retakes them.
    wait_until("relay reconnected", Duration::from_secs(10), || async {
        relay.counters().shard_moves >= 16 && relay.owned_shards().len() == 8
    })
    .await;
    wait_until("the gauge says 8 again", Duration::from_secs(1), || async {
        gauge() == "8"
    })
    .await;
    // And stays there: not 16, as a gauge counting the retaken shards twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gauge(), "8", "after the reconnect");
    db.outbox.enqueue_standalone(&[msg("k", 0)]).await.unwrap();
    wait_until("published", Duration::from_secs(5), || async {
        sink.published().len() == 1
    })
    .await;
    relay.shutdown().await.unwrap();
    assert_eq!(gauge(), "0", "after shutdown");
    db.drop_schema().await;
}
