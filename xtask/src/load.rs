//! A chat load generator for the example platform, and what its client saw.
//!
//! [`Load`] posts chat messages over HTTP to many conversations (one message
//! in flight per conversation, so each conversation has a well-defined send
//! order) and keeps one SSE stream open per conversation. Every `202` answer
//! is recorded with its conversation and send sequence; every reply event
//! the streams deliver is recorded with its event id. [`Observed::tally`]
//! turns that into what the delivery promise is judged by: accepted,
//! delivered, duplicates the client saw, replies completed out of send order.
//!
//! A `POST` that is not answered `202` is retried (same `Idempotency-Key`,
//! so a retry of a message the gateway did accept gets the first answer
//! back) until `give_up` has passed; every non-`202` answer is counted by
//! status. An SSE stream that ends or fails is reopened and counted; it is
//! reopened with `Last-Event-ID` (the last event id it saw), so the gateway —
//! any gateway — replays what it missed meanwhile from its session event
//! store. Event ids are numbers per conversation, so they are recorded per
//! conversation. Used by `cargo xtask chaos`; meant to serve a load benchmark too.
//!
//! With several gateways (replicas behind one client, as behind a load
//! balancer) the POSTs and SSE streams are spread over them: a message goes
//! first to gateway `(conversation + seq) % n`, a stream to
//! `conversation % n`. A POST refused or failed there (connection refused
//! during a drain, `503`, …) is sent again at once to the next gateway with
//! the same `Idempotency-Key`; one that succeeds there is a **failover**,
//! counted apart from the errors, which are then only what the client could
//! not route around. A reopened SSE stream goes to the next gateway.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// One conversation the generator talks in: its id and the token it sends with.
#[derive(Debug, Clone)]
pub(crate) struct Conversation {
    pub(crate) id: String,
    pub(crate) token: String,
}

/// A message the gateway accepted.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) seq: u64,
    pub(crate) delivery: String,
}

/// Everything the client saw.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// Accepted message id → what was sent.
    pub(crate) accepted: HashMap<String, Sent>,
    /// Per conversation, accepted message ids in send order.
    pub(crate) send_order: Vec<Vec<String>>,
    /// Logical sends (one idempotency key) answered with two different
    /// message ids: the gateway took the same message twice.
    pub(crate) double_accepts: u64,
    /// Non-`202` answers and transport errors, by status (`503`, `connect`, …),
    /// that no other gateway answered in their place.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Sends refused or failed by one gateway and accepted at once by
    /// another (same idempotency key).
    pub(crate) failovers: u64,
    /// Logical sends given up on (never answered `202`).
    pub(crate) gave_up: u64,
    /// Every SSE event id seen, and how often one was seen again.
    event_ids: HashSet<String>,
    pub(crate) duplicate_event_ids: u64,
    /// Message id → ids of the `assistant.completed` events seen for it.
    pub(crate) completed: HashMap<String, Vec<String>>,
    /// Per conversation, message ids in the order their replies completed.
    pub(crate) completion_order: Vec<Vec<String>>,
    /// SSE streams reopened after they ended or failed.
    pub(crate) sse_reconnects: u64,
    /// `event: lagged` received (the client fell behind the gateway's buffer).
    pub(crate) sse_lagged: u64,
    /// When the last reply completed.
    pub(crate) last_completion: Option<Instant>,
}

/// The client's view, counted.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    pub(crate) accepted: u64,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) order_violations: u64,
    pub(crate) missing: Vec<String>,
}

impl Observed {
    /// Counts what the client saw: delivered (a `assistant.completed` for an
    /// accepted message), duplicates (an event id seen again, a second
    /// completed reply for one message, one send accepted as two messages)
    /// and per-conversation order violations.
    pub(crate) fn tally(&self) -> Tally {
        let mut t = Tally {
            accepted: self.accepted.len() as u64,
            ..Tally::default()
        };
        for id in self.accepted.keys() {
            match self.completed.get(id) {
                Some(ids) => {
                    t.delivered += 1;
                    let distinct: HashSet<&String> = ids.iter().collect();
                    t.duplicates += distinct.len() as u64 - 1;
                }
                None => t.missing.push(id.clone()),
            }
        }
        t.duplicates += self.duplicate_event_ids + self.double_accepts;
        t.order_violations = self
            .completion_order
            .iter()
            .map(|order| order_violations(order, &self.accepted))
            .sum();
        t
    }

    /// Whether every accepted message has a completed reply.
    pub(crate) fn all_delivered(&self) -> bool {
        self.accepted
            .keys()
            .all(|id| self.completed.contains_key(id))
    }

    fn record_event(&mut self, conversation: usize, event: &str, id: &str, data: &Value) {
        if event == "lagged" {
            self.sse_lagged += 1;
            return;
        }
        if !event.starts_with("assistant.") {
            // `reset`, `shutdown`, `unavailable`: stream control, not replies
            // (a `reset` id repeats the last id replayed).
            return;
        }
        if !id.is_empty() && !self.event_ids.insert(format!("{conversation}/{id}")) {
            self.duplicate_event_ids += 1;
            return;
        }
        if event != "assistant.completed" {
            return;
        }
        let Some(message_id) = data["message_id"].as_str() else {
            return;
        };
        let ids = self.completed.entry(message_id.to_owned()).or_default();
        if ids.is_empty() {
            self.completion_order[conversation].push(message_id.to_owned());
        }
        ids.push(id.to_owned());
        self.last_completion = Some(Instant::now());
    }
}

/// Replies completed before the reply of a message sent earlier in the same
/// conversation: for each completion, whether a later-sent message already
/// completed. Ids not accepted (warm-up, other runs) are ignored.
pub(crate) fn order_violations(
    completion_order: &[String],
    accepted: &HashMap<String, Sent>,
) -> u64 {
    let mut highest: Option<u64> = None;
    let mut violations = 0;
    for id in completion_order {
        let Some(sent) = accepted.get(id) else {
            continue;
        };
        match highest {
            Some(h) if sent.seq < h => violations += 1,
            _ => highest = Some(sent.seq),
        }
    }
    violations
}

/// The load generator.
pub(crate) struct Load {
    client: reqwest::Client,
    /// The gateways' base URLs.
    bases: Arc<Vec<String>>,
    run: String,
    conversations: Arc<Vec<Conversation>>,
    pub(crate) observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    listeners: Vec<JoinHandle<()>>,
    next_seq: Vec<u64>,
}

impl Load {
    /// A generator talking to the gateways at `bases` (`http://host:port`,
    /// at least one); `run` makes its idempotency keys unique.
    pub(crate) fn new(bases: &[String], run: &str, conversations: Vec<Conversation>) -> Self {
        assert!(!bases.is_empty(), "the load needs a gateway");
        let n = conversations.len();
        let observed = Observed {
            send_order: vec![Vec::new(); n],
            completion_order: vec![Vec::new(); n],
            ..Observed::default()
        };
        Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .expect("an HTTP client without TLS settings builds"),
            bases: Arc::new(
                bases
                    .iter()
                    .map(|b| b.trim_end_matches('/').to_owned())
                    .collect(),
            ),
            run: run.to_owned(),
            conversations: Arc::new(conversations),
            observed: Arc::new(Mutex::new(observed)),
            stop: Arc::new(AtomicBool::new(false)),
            listeners: Vec::new(),
            next_seq: vec![0; n],
        }
    }

    /// Opens one SSE stream per conversation (reopened until [`Load::stop`])
    /// and waits until every stream answered `200` once, or `within` passed.
    pub(crate) async fn listen(&mut self, within: Duration) -> Result<(), String> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(self.conversations.len());
        for i in 0..self.conversations.len() {
            let ctx = Listener {
                client: self.client.clone(),
                urls: self
                    .bases
                    .iter()
                    .map(|b| format!("{b}/v1/conversations/{}/events", self.conversations[i].id))
                    .collect(),
                at: i % self.bases.len(),
                token: self.conversations[i].token.clone(),
                conversation: i,
                observed: self.observed.clone(),
                stop: self.stop.clone(),
                opened: Some(tx.clone()),
                last_event_id: None,
            };
            self.listeners.push(tokio::spawn(ctx.run()));
        }
        drop(tx);
        let deadline = tokio::time::Instant::now() + within;
        let mut open = 0;
        while open < self.conversations.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(_)) => open += 1,
                _ => {
                    return Err(format!(
                        "only {open} of {} SSE streams opened within {within:?}",
                        self.conversations.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sends `total` messages round-robin over the conversations: as fast as
    /// one-in-flight-per-conversation allows when `over` is `None`, else
    /// message `k` no earlier than `k * over / total` after the start.
    /// Each message is retried until `give_up` after its first attempt.
    /// Returns when every conversation has sent its share.
    pub(crate) fn send(
        &mut self,
        total: u64,
        over: Option<Duration>,
        give_up: Duration,
    ) -> JoinHandle<()> {
        let n = self.conversations.len() as u64;
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for c in 0..n {
            let share: Vec<u64> = (0..total).filter(|k| k % n == c).collect();
            let first_seq = self.next_seq[c as usize];
            self.next_seq[c as usize] += share.len() as u64;
            let sender = Sender {
                client: self.client.clone(),
                bases: self.bases.clone(),
                run: self.run.clone(),
                conversations: self.conversations.clone(),
                conversation: c as usize,
                observed: self.observed.clone(),
                give_up,
            };
            tasks.push(tokio::spawn(async move {
                for (i, k) in share.into_iter().enumerate() {
                    if let Some(over) = over {
                        let at = started + over.mul_f64(k as f64 / total.max(1) as f64);
                        tokio::time::sleep_until(at).await;
                    }
                    sender.send_one(first_seq + i as u64).await;
                }
            }));
        }
        tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    /// Sends one message in `conversation` outside the counted load and
    /// returns its id once accepted (for warming up the SSE path).
    pub(crate) async fn probe(&self, conversation: &Conversation) -> Result<String, String> {
        let url = format!(
            "{}/v1/conversations/{}/messages",
            self.bases[0], conversation.id
        );
        let r = self
            .client
            .post(url)
            .bearer_auth(&conversation.token)
            .json(&serde_json::json!({"text": "warm up"}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("POST warm-up: {e}"))?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or_default();
        if status.as_u16() != 202 {
            return Err(format!("warm-up answered {status}: {body}"));
        }
        body["message_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("warm-up answer without message_id: {body}"))
    }

    /// Ends the SSE streams.
    pub(crate) async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in self.listeners.drain(..) {
            l.abort();
            let _ = l.await;
        }
    }
}

struct Sender {
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    run: String,
    conversations: Arc<Vec<Conversation>>,
    conversation: usize,
    observed: Arc<Mutex<Observed>>,
    give_up: Duration,
}

/// What one POST to one gateway came to.
enum Attempt {
    /// `202` with a message id: recorded.
    Accepted,
    /// Anything else, by status or transport error.
    Failed(String),
}

impl Sender {
    /// Sends message `seq` until accepted or `give_up` passed: first to its
    /// gateway, and after a failure there at once to the next one (a
    /// failover when that one accepts).
    async fn send_one(&self, seq: u64) {
        let key = format!("{}-{}-{seq}", self.run, self.conversation);
        let n = self.bases.len();
        let first = (self.conversation + seq as usize) % n;
        let deadline = Instant::now() + self.give_up;
        let mut first_id: Option<String> = None;
        loop {
            let error = match self.attempt(first, seq, &key, &mut first_id).await {
                Attempt::Accepted => return,
                Attempt::Failed(e) => e,
            };
            if n > 1 {
                match self
                    .attempt((first + 1) % n, seq, &key, &mut first_id)
                    .await
                {
                    Attempt::Accepted => {
                        self.observed.lock().await.failovers += 1;
                        return;
                    }
                    Attempt::Failed(e) => self.count_error(e).await,
                }
            }
            self.count_error(error).await;
            if Instant::now() > deadline {
                self.observed.lock().await.gave_up += 1;
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn count_error(&self, error: String) {
        *self.observed.lock().await.errors.entry(error).or_default() += 1;
    }

    /// One POST of message `seq` to gateway `gateway`; a `202` is recorded.
    async fn attempt(
        &self,
        gateway: usize,
        seq: u64,
        key: &str,
        first_id: &mut Option<String>,
    ) -> Attempt {
        let conv = &self.conversations[self.conversation];
        let url = format!(
            "{}/v1/conversations/{}/messages",
            self.bases[gateway], conv.id
        );
        let body = serde_json::json!({ "text": format!("chaos message {seq} of {}", conv.id) });
        let outcome = self
            .client
            .post(&url)
            .bearer_auth(&conv.token)
            .header("idempotency-key", key)
            .json(&body)
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        let r = match outcome {
            Ok(r) if r.status().as_u16() == 202 => r,
            Ok(r) => return Attempt::Failed(r.status().as_u16().to_string()),
            Err(e) if e.is_timeout() => return Attempt::Failed("timeout".to_owned()),
            Err(e) if e.is_connect() => return Attempt::Failed("connect".to_owned()),
            Err(_) => return Attempt::Failed("transport".to_owned()),
        };
        let v: Value = r.json().await.unwrap_or_default();
        let (Some(id), Some(delivery)) = (v["message_id"].as_str(), v["delivery"].as_str()) else {
            // A 202 whose body we could not read: ask again (the
            // idempotency key returns the same answer).
            *first_id = v["message_id"].as_str().map(str::to_owned);
            return Attempt::Failed("202-unreadable".to_owned());
        };
        let mut o = self.observed.lock().await;
        if first_id.as_deref().is_some_and(|f| f != id) {
            o.double_accepts += 1;
        }
        if !o.accepted.contains_key(id) {
            o.accepted.insert(
                id.to_owned(),
                Sent {
                    seq,
                    delivery: delivery.to_owned(),
                },
            );
            o.send_order[self.conversation].push(id.to_owned());
        }
        Attempt::Accepted
    }
}

struct Listener {
    client: reqwest::Client,
    /// The stream's URL on each gateway.
    urls: Vec<String>,
    /// The gateway it reads from now; a reopened stream moves to the next.
    at: usize,
    token: String,
    conversation: usize,
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    opened: Option<tokio::sync::mpsc::Sender<usize>>,
    /// The id of the last event seen, sent as `Last-Event-ID` on reconnect.
    last_event_id: Option<String>,
}

impl Listener {
    async fn run(mut self) {
        let mut first = true;
        while !self.stop.load(Ordering::Relaxed) {
            if !first {
                self.observed.lock().await.sse_reconnects += 1;
                self.at = (self.at + 1) % self.urls.len();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            first = false;
            let mut req = self
                .client
                .get(&self.urls[self.at])
                .bearer_auth(&self.token)
                .header("accept", "text/event-stream");
            if let Some(id) = &self.last_event_id {
                req = req.header("last-event-id", id.as_str());
            }
            let resp = req.send().await;
            let resp = match resp {
                Ok(r) if r.status().is_success() => r,
                _ => continue,
            };
            if let Some(tx) = self.opened.take() {
                let _ = tx.send(self.conversation).await;
            }
            self.read(resp).await;
        }
    }

    async fn read(&mut self, resp: reqwest::Response) {
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { return };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) =
                    ("message".to_owned(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !id.is_empty() {
                    self.last_event_id = Some(id.clone());
                }
                if data.is_empty() {
                    continue; // heartbeat comment
                }
                let data: Value = serde_json::from_str(&data).unwrap_or_default();
                let mut o = self.observed.lock().await;
                o.record_event(self.conversation, &event, &id, &data);
                if event == "lagged" {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(seq: u64) -> Sent {
        Sent {
            seq,
            delivery: "kafka".into(),
        }
    }

    #[test]
    fn completions_out_of_send_order_are_counted_once_each() {
        let accepted: HashMap<String, Sent> = [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
            .map(|(k, s)| (k.to_owned(), sent(s)))
            .into();
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(order_violations(&ids(&["a", "b", "c", "d"]), &accepted), 0);
        // `a` was overtaken by `b` and `c`: one late completion.
        assert_eq!(order_violations(&ids(&["b", "c", "a", "d"]), &accepted), 1);
        assert_eq!(order_violations(&ids(&["d", "c", "b", "a"]), &accepted), 3);
        assert_eq!(order_violations(&ids(&["warm", "a", "b"]), &accepted), 0);
    }

    #[test]
    fn a_reply_seen_twice_or_twice_answered_is_a_duplicate() {
        let mut o = Observed {
            send_order: vec![Vec::new()],
            completion_order: vec![Vec::new()],
            ..Observed::default()
        };
        o.accepted.insert("m1".into(), sent(0));
        o.accepted.insert("m2".into(), sent(1));
        o.accepted.insert("m3".into(), sent(2));
        let done = |m: &str| serde_json::json!({"message_id": m});
        o.record_event(0, "assistant.started", "e0", &done("m1"));
        o.record_event(0, "assistant.completed", "e1", &done("m1"));
        o.record_event(0, "assistant.completed", "e1", &done("m1")); // same event again
        o.record_event(0, "assistant.completed", "e2", &done("m2"));
        o.record_event(0, "assistant.completed", "e3", &done("m2")); // a second reply
        let t = o.tally();
        assert_eq!(t.accepted, 3);
        assert_eq!(t.delivered, 2);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.missing, vec!["m3".to_owned()]);
        assert_eq!(t.order_violations, 0);
        assert!(!o.all_delivered());
    }
}
