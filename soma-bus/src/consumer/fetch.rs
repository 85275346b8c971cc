//! The fetch loop: receive records and hand them to their lanes, commit on a
//! timer, probe the broker while degraded, assign partitions in broadcast
//! mode, and shut down gracefully.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::lanes::{Work, lane, lane_of};
use super::progress::commit;
use super::{Ctx, Shared, ShutdownReport};
use crate::error::BusError;

/// The consumer task: start the lanes, fetch until stopped, then shut down
/// gracefully.
pub(super) async fn run(consumer: Arc<StreamConsumer<Ctx>>, s: Arc<Shared>) -> ShutdownReport {
    let (lanes, workers) = spawn_lanes(&s);
    fetch(&consumer, &s, &lanes).await;
    drop(lanes);
    shut_down(&consumer, &s, workers).await
}

/// `consumer.concurrency` lanes, each with a queue of `consumer.lane_capacity`.
fn spawn_lanes(s: &Arc<Shared>) -> (Vec<mpsc::Sender<Work>>, Vec<JoinHandle<()>>) {
    (0..s.cfg.consumer.concurrency)
        .map(|_| {
            let (tx, rx) = mpsc::channel::<Work>(s.cfg.consumer.lane_capacity);
            (tx, tokio::spawn(lane(rx, s.clone())))
        })
        .unzip()
}

/// An interval that delays (rather than bursts) after a missed tick.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Receives records and hands each to its lane until `stop` (or a lane is
/// gone); commits on a timer; while degraded (or an unassigned broadcast
/// consumer) asks the broker for the topics' metadata.
async fn fetch(consumer: &Arc<StreamConsumer<Ctx>>, s: &Shared, lanes: &[mpsc::Sender<Work>]) {
    let mut commit_tick = ticker(Duration::from_millis(
        s.cfg.consumer.commit_interval_ms.max(10),
    ));
    let mut probe_tick = ticker(PROBE_INTERVAL);
    let mut partitions_tick = ticker(PARTITIONS_INTERVAL);
    // Broadcast: the partitions assigned so far (none until the first
    // metadata answer; retried every probe tick until then).
    let mut assigned: Option<HashSet<(String, i32)>> = None;
    let mut errors_in_row = 0u32;
    loop {
        tokio::select! {
            biased;
            () = s.stop.cancelled() => return,
            _ = commit_tick.tick() => {
                commit(consumer, s, CommitMode::Async);
            }
            // Unassigned broadcast consumer, or degraded by a consume error:
            // ask the broker for the topics' metadata. An answer clears the
            // error (an idle topic brings no message that would).
            _ = probe_tick.tick(), if errors_in_row > 0 || (s.broadcast && assigned.is_none()) => {
                if probe(consumer, s, &mut assigned).await {
                    errors_in_row = 0;
                }
            }
            _ = partitions_tick.tick(), if s.broadcast && assigned.is_some() => {
                if let Ok(parts) = topic_partitions(consumer, &s.topics).await {
                    assign_new(consumer, s, &mut assigned, parts);
                }
            }
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    errors_in_row = 0;
                    let owned = detach(&m);
                    if !hand_to_lane(s, lanes, owned).await {
                        return;
                    }
                }
                Err(error) => {
                    errors_in_row += 1;
                    tracing::warn!(event = "consume_error", %error, group = %s.group);
                    if let Some(h) = &s.health {
                        h.set_degraded(format!("consume error: {error}"));
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(errors_in_row.min(20)))).await;
                }
            }
        }
        // A paused lane (failing DLQ write) keeps the component degraded.
        if errors_in_row == 0 && s.dlq_blocked.load(Ordering::Acquire) == 0 {
            if let Some(h) = &s.health {
                if h.status().is_some_and(|st| !st.is_up()) {
                    h.set_up();
                }
            }
        }
    }
}

/// Asks the broker for the topics' partitions (assigning new ones in
/// broadcast mode); true when it answered.
async fn probe(
    consumer: &Arc<StreamConsumer<Ctx>>,
    s: &Shared,
    assigned: &mut Option<HashSet<(String, i32)>>,
) -> bool {
    match topic_partitions(consumer, &s.topics).await {
        Ok(parts) => {
            if s.broadcast {
                assign_new(consumer, s, assigned, parts);
            }
            true
        }
        Err(error) => {
            tracing::debug!(event = "consumer_probe_failed", %error, group = %s.group);
            false
        }
    }
}

/// Tracks `msg` as in flight and queues it on its key's lane; false when
/// fetching must stop (shutdown, or the lane is gone). A message not handed
/// to a lane stays uncommitted and is redelivered later.
async fn hand_to_lane(s: &Shared, lanes: &[mpsc::Sender<Work>], msg: OwnedMessage) -> bool {
    if !s.broadcast {
        s.progress
            .lock()
            .start(msg.topic(), msg.partition(), msg.offset());
    }
    let lane = lane_of(&msg, lanes.len());
    tokio::select! {
        () = s.stop.cancelled() => false,
        r = lanes[lane].send(Work { msg }) => r.is_ok(),
    }
}

/// Graceful shutdown once fetching stopped: let the lanes finish (within
/// `consumer.shutdown_timeout_ms`, then a second's grace before aborting them),
/// commit, leave the group (or the assignment), report down.
async fn shut_down(
    consumer: &StreamConsumer<Ctx>,
    s: &Shared,
    workers: Vec<JoinHandle<()>>,
) -> ShutdownReport {
    // A set that forgets finished lanes: a JoinHandle must not be polled
    // again after it completed, which a second `join_all` over the same
    // handles (after the deadline) would do.
    let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
    let mut running: FuturesUnordered<JoinHandle<()>> = workers.into_iter().collect();
    let deadline = Instant::now() + Duration::from_millis(s.cfg.consumer.shutdown_timeout_ms);
    let drained = tokio::time::timeout_at(deadline.into(), drain_lanes(&mut running))
        .await
        .is_ok();
    if !drained {
        // Stop DLQ retries; give running handlers a moment, then abort them.
        s.hard.cancel();
        let grace = tokio::time::timeout(Duration::from_secs(1), drain_lanes(&mut running));
        if grace.await.is_err() {
            for a in &aborts {
                a.abort();
            }
        }
    }
    let committed = commit(consumer, s, CommitMode::Sync);
    if s.broadcast {
        let _ = consumer.unassign();
    } else {
        consumer.unsubscribe();
    }
    if let Some(h) = &s.health {
        h.set_down("consumer stopped");
    }
    ShutdownReport { drained, committed }
}

/// How often a degraded (or not yet assigned broadcast) consumer asks the
/// broker for metadata.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a broadcast consumer looks for partitions added to its topics.
const PARTITIONS_INTERVAL: Duration = Duration::from_secs(30);
/// The longest one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Every partition of `topics`, as the broker reports them now (a blocking
/// librdkafka call, run off the async workers). A topic the broker does not
/// know is an error.
async fn topic_partitions(
    consumer: &Arc<StreamConsumer<Ctx>>,
    topics: &[String],
) -> Result<Vec<(String, i32)>, BusError> {
    let consumer = consumer.clone();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut parts = Vec::new();
        for topic in &topics {
            let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
            for t in md.topics().iter().filter(|t| t.name() == topic) {
                if let Some(err) = t.error() {
                    return Err(BusError::Kafka(rdkafka::error::KafkaError::MetadataFetch(
                        err.into(),
                    )));
                }
                if t.partitions().is_empty() {
                    return Err(BusError::Config(format!("topic {topic} has no partitions")));
                }
                parts.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
            }
        }
        Ok(parts)
    })
    .await
    .map_err(|e| BusError::Config(format!("metadata task failed: {e}")))?
}

/// Broadcast: adds the partitions in `parts` not yet assigned. The first
/// assignment starts at the end of each partition (messages from before the
/// consumer started are not its business) unless the consumer reads from the
/// beginning; partitions that appear later start at their beginning (all
/// they hold was published while it ran).
fn assign_new(
    consumer: &StreamConsumer<Ctx>,
    s: &Shared,
    assigned: &mut Option<HashSet<(String, i32)>>,
    parts: Vec<(String, i32)>,
) {
    let first = assigned.is_none();
    let known = assigned.get_or_insert_with(HashSet::new);
    let mut tpl = TopicPartitionList::new();
    let mut added = Vec::new();
    for (topic, partition) in parts {
        if known.contains(&(topic.clone(), partition)) {
            continue;
        }
        let at = if first && !s.from_beginning {
            Offset::End
        } else {
            Offset::Beginning
        };
        if tpl.add_partition_offset(&topic, partition, at).is_ok() {
            added.push((topic, partition));
        }
    }
    if added.is_empty() {
        return;
    }
    match consumer.incremental_assign(&tpl) {
        Ok(()) => {
            tracing::info!(event = "broadcast_assigned", partitions = added.len(), group = %s.group);
            known.extend(added);
        }
        Err(error) => {
            tracing::warn!(event = "broadcast_assign_failed", %error, group = %s.group);
            if first && known.is_empty() {
                *assigned = None;
            }
        }
    }
}

/// Waits until every lane task in `running` has ended.
async fn drain_lanes(running: &mut FuturesUnordered<JoinHandle<()>>) {
    while running.next().await.is_some() {}
}

/// Keeps the message's topic/partition/offset/key/payload/headers.
fn detach(m: &BorrowedMessage<'_>) -> OwnedMessage {
    m.detach()
}
