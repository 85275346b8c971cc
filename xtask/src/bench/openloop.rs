//! The open-loop chat load: messages sent at a fixed rate whatever the
//! answers take (a slow answer does not slow the sender, so queueing shows
//! as latency instead of hiding as a lower rate), to conversations drawn
//! from a Zipf distribution, each followed on its conversation's SSE stream
//! to its first reply event and its `assistant.completed`.
//!
//! Latency is measured from the moment a message was *due*, not from when
//! the sender got to it: if the generator itself falls behind, that counts
//! against the figures (no coordinated omission).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::stats::{Rng, Zipf, nearest_rank, percentile};

/// One conversation: its id and its token (`None`: the bare path, no auth).
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    pub(crate) id: String,
    pub(crate) token: Option<String>,
}

/// The shape of one load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Messages per second offered.
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
    pub(crate) zipf_s: f64,
    /// Requests in flight beyond which a due message is not sent but
    /// counted as `client-overload` (protects the generator, not the server).
    pub(crate) max_in_flight: usize,
    pub(crate) seed: u64,
}

/// One message sent.
#[derive(Debug, Clone)]
struct Sent {
    /// When it was due, from the start of the load.
    due: Duration,
    post_ms: f64,
    /// `202`, or the status / transport error.
    outcome: String,
    message_id: Option<String>,
    deferred: bool,
}

/// When reply events for a message arrived.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    first: Option<Instant>,
    completed: Option<Instant>,
}

/// What the SSE streams saw, by message id.
#[derive(Default)]
struct Replies {
    seen: HashMap<String, Seen>,
    opened: usize,
    reconnects: u64,
}

/// The generator, bound to one base URL.
pub(crate) struct OpenLoop {
    client: reqwest::Client,
    base: String,
    convs: Arc<Vec<Conv>>,
    replies: Arc<std::sync::Mutex<Replies>>,
    stop: Arc<AtomicBool>,
    listeners: Vec<JoinHandle<()>>,
    run: String,
}

/// The figures of one load.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    pub(crate) offered: u64,
    pub(crate) accepted: u64,
    pub(crate) accepted_per_sec: f64,
    pub(crate) post_p50_ms: Option<f64>,
    pub(crate) post_p99_ms: Option<f64>,
    pub(crate) post_max_ms: Option<f64>,
    /// POST p99 over the first and the last third of the load (decay).
    pub(crate) post_p99_first_ms: Option<f64>,
    pub(crate) post_p99_last_ms: Option<f64>,
    pub(crate) deferred: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Followed messages (SSE): send→first reply event and send→completed,
    /// infinite for a message with no such event by the end of the drain.
    pub(crate) first_p50_ms: Option<f64>,
    pub(crate) first_p99_ms: Option<f64>,
    pub(crate) completed_p50_ms: Option<f64>,
    pub(crate) completed_p99_ms: Option<f64>,
    pub(crate) completed_p99_first_ms: Option<f64>,
    pub(crate) completed_p99_last_ms: Option<f64>,
    pub(crate) completed: u64,
    pub(crate) sse_reconnects: u64,
}

impl Report {
    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

impl OpenLoop {
    pub(crate) fn new(base: &str, run: &str, convs: Vec<Conv>) -> Self {
        Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(1_024)
                .tcp_nodelay(true)
                .build()
                .expect("an HTTP client without TLS settings builds"),
            base: base.trim_end_matches('/').to_owned(),
            convs: Arc::new(convs),
            replies: Arc::new(std::sync::Mutex::new(Replies::default())),
            stop: Arc::new(AtomicBool::new(false)),
            listeners: Vec::new(),
            run: run.to_owned(),
        }
    }

    /// Opens one SSE stream per conversation; waits until all answered.
    /// Streams open at most 32 at a time (a ramp, not a thundering herd).
    pub(crate) async fn follow(&mut self, within: Duration) -> Result<(), String> {
        let ramp = Arc::new(tokio::sync::Semaphore::new(32));
        for i in 0..self.convs.len() {
            let l = Follower {
                ramp: Some(ramp.clone()),
                client: self.client.clone(),
                url: format!("{}/v1/conversations/{}/events", self.base, self.convs[i].id),
                token: self.convs[i].token.clone().unwrap_or_default(),
                replies: self.replies.clone(),
                stop: self.stop.clone(),
            };
            self.listeners.push(tokio::spawn(l.run()));
        }
        let deadline = Instant::now() + within;
        loop {
            let opened = self.lock().opened;
            if opened >= self.convs.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {opened} of {} SSE streams opened within {within:?}",
                    self.convs.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Replies> {
        self.replies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SSE streams reopened so far (after they ended or failed).
    pub(crate) fn reconnects(&self) -> u64 {
        self.lock().reconnects
    }

    /// Sends at `shape.rate` for `shape.duration`, then (when following)
    /// waits up to `drain` for the replies of every accepted message.
    pub(crate) async fn run(&self, shape: Shape, drain: Duration) -> Report {
        let zipf = Zipf::new(self.convs.len(), shape.zipf_s);
        let mut rng = Rng::new(shape.seed);
        let sent: Arc<Mutex<Vec<Sent>>> = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let total = (shape.rate * shape.duration.as_secs_f64()).round() as u64;
        let mut tasks = Vec::with_capacity(total as usize);
        for k in 0..total {
            let due = Duration::from_secs_f64(k as f64 / shape.rate);
            tokio::time::sleep_until(start + due).await;
            let conv = zipf.sample(&mut rng);
            if in_flight.load(Ordering::Relaxed) >= shape.max_in_flight {
                sent.lock().await.push(Sent {
                    due,
                    post_ms: f64::INFINITY,
                    outcome: "client-overload".to_owned(),
                    message_id: None,
                    deferred: false,
                });
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let post = Post {
                client: self.client.clone(),
                url: format!(
                    "{}/v1/conversations/{}/messages",
                    self.base, self.convs[conv].id
                ),
                token: self.convs[conv].token.clone(),
                key: format!("{}-{k}", self.run),
            };
            let (sent, in_flight) = (sent.clone(), in_flight.clone());
            tasks.push(tokio::spawn(async move {
                let s = post.send(start, due).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                sent.lock().await.push(s);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let send_secs = start.elapsed().as_secs_f64();
        let sent = std::mem::take(&mut *sent.lock().await);
        if !self.listeners.is_empty() {
            self.drain(&sent, drain).await;
        }
        let seen = self.lock().seen.clone();
        let reconnects = self.lock().reconnects;
        let mut r = summarize(
            &sent,
            &seen,
            start,
            shape.duration,
            send_secs,
            !self.listeners.is_empty(),
        );
        r.sse_reconnects = reconnects;
        r
    }

    async fn drain(&self, sent: &[Sent], within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let done = {
                let r = self.lock();
                sent.iter()
                    .filter_map(|s| s.message_id.as_ref())
                    .all(|id| r.seen.get(id).is_some_and(|s| s.completed.is_some()))
            };
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends messages to conversation 0 until one comes back completed
    /// on its stream (the whole path is warm), or `within` passed.
    pub(crate) async fn warm_up(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut k = 0;
        while Instant::now() < deadline {
            k += 1;
            let post = Post {
                client: self.client.clone(),
                url: format!(
                    "{}/v1/conversations/{}/messages",
                    self.base, self.convs[0].id
                ),
                token: self.convs[0].token.clone(),
                key: format!("{}-warm-{k}", self.run),
            };
            let s = post.send(Instant::now(), Duration::ZERO).await;
            let Some(id) = s.message_id else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            if self.listeners.is_empty() {
                return Ok(());
            }
            let wait = Instant::now() + Duration::from_secs(10);
            while Instant::now() < wait {
                if self
                    .lock()
                    .seen
                    .get(&id)
                    .is_some_and(|s| s.completed.is_some())
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(format!(
            "no warm-up message was answered on its stream within {within:?}"
        ))
    }

    /// Closed loop: `workers` clients each POSTing back to back for
    /// `duration`; returns the accepted messages per second (the ceiling).
    pub(crate) async fn ceiling(
        &self,
        workers: usize,
        duration: Duration,
        seed: u64,
    ) -> (f64, u64) {
        let zipf = Arc::new(Zipf::new(self.convs.len(), 1.0));
        let start = Instant::now();
        let end = start + duration;
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (zipf, convs, client, base, run) = (
                zipf.clone(),
                self.convs.clone(),
                self.client.clone(),
                self.base.clone(),
                self.run.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9));
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut k = 0u64;
                while Instant::now() < end {
                    let c = zipf.sample(&mut rng);
                    let post = Post {
                        client: client.clone(),
                        url: format!("{base}/v1/conversations/{}/messages", convs[c].id),
                        token: convs[c].token.clone(),
                        key: format!("{run}-ceiling-{w}-{k}"),
                    };
                    k += 1;
                    let s = post.send(Instant::now(), Duration::ZERO).await;
                    if s.outcome == "202" {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            }));
        }
        let (mut ok, mut failed) = (0, 0);
        for t in tasks {
            if let Ok((o, f)) = t.await {
                ok += o;
                failed += f;
            }
        }
        (ok as f64 / start.elapsed().as_secs_f64(), failed)
    }

    pub(crate) async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in self.listeners.drain(..) {
            l.abort();
            let _ = l.await;
        }
    }
}

struct Post {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    key: String,
}

impl Post {
    async fn send(&self, start: Instant, due: Duration) -> Sent {
        let mut req = self
            .client
            .post(&self.url)
            .header("idempotency-key", &self.key)
            .json(&serde_json::json!({ "text": "how is the weather on the benchmark today" }))
            .timeout(Duration::from_secs(15));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let outcome = req.send().await;
        let mut s = Sent {
            due,
            post_ms: 0.0,
            outcome: String::new(),
            message_id: None,
            deferred: false,
        };
        match outcome {
            Ok(r) => {
                s.outcome = r.status().as_u16().to_string();
                if s.outcome == "202" {
                    let v: Value = r.json().await.unwrap_or_default();
                    s.message_id = v["message_id"].as_str().map(str::to_owned);
                    s.deferred = v["delivery"] == "deferred";
                } else {
                    let _ = r.bytes().await;
                }
            }
            Err(e) if e.is_timeout() => s.outcome = "timeout".to_owned(),
            Err(e) if e.is_connect() => s.outcome = "connect".to_owned(),
            Err(_) => s.outcome = "transport".to_owned(),
        }
        s.post_ms = (Instant::now() - (start + due)).as_secs_f64() * 1e3;
        s
    }
}

/// The figures from what was sent and what the streams saw. `followed`:
/// whether replies were followed (else reply figures stay `None`).
fn summarize(
    sent: &[Sent],
    seen: &HashMap<String, Seen>,
    start: Instant,
    duration: Duration,
    send_secs: f64,
    followed: bool,
) -> Report {
    let accepted: Vec<&Sent> = sent.iter().filter(|s| s.outcome == "202").collect();
    let mut r = Report {
        offered: sent.len() as u64,
        accepted: accepted.len() as u64,
        accepted_per_sec: accepted.len() as f64 / send_secs.max(duration.as_secs_f64()),
        deferred: accepted.iter().filter(|s| s.deferred).count() as u64,
        ..Report::default()
    };
    for s in sent.iter().filter(|s| s.outcome != "202") {
        *r.errors.entry(s.outcome.clone()).or_default() += 1;
    }
    let third = duration / 3;
    let first = |s: &&&Sent| s.due < third;
    let last = |s: &&&Sent| s.due >= duration - third;
    let post: Vec<f64> = accepted.iter().map(|s| s.post_ms).collect();
    let mut sorted = post.clone();
    sorted.sort_by(f64::total_cmp);
    if !sorted.is_empty() {
        r.post_p50_ms = Some(nearest_rank(&sorted, 0.5));
        r.post_p99_ms = Some(nearest_rank(&sorted, 0.99));
        r.post_max_ms = sorted.last().copied();
    }
    let p99 = |v: Vec<f64>| percentile(&v, 0.99);
    r.post_p99_first_ms = p99(accepted.iter().filter(first).map(|s| s.post_ms).collect());
    r.post_p99_last_ms = p99(accepted.iter().filter(last).map(|s| s.post_ms).collect());
    if !followed {
        return r;
    }
    let since_due = |s: &Sent, at: Option<Instant>| match at {
        Some(t) => (t - (start + s.due)).as_secs_f64() * 1e3,
        None => f64::INFINITY,
    };
    let seen_of = |s: &Sent| {
        s.message_id
            .as_ref()
            .and_then(|id| seen.get(id))
            .copied()
            .unwrap_or_default()
    };
    let firsts: Vec<f64> = accepted
        .iter()
        .map(|s| since_due(s, seen_of(s).first))
        .collect();
    let dones: Vec<f64> = accepted
        .iter()
        .map(|s| since_due(s, seen_of(s).completed))
        .collect();
    r.completed = dones.iter().filter(|d| d.is_finite()).count() as u64;
    r.first_p50_ms = percentile(&firsts, 0.5);
    r.first_p99_ms = percentile(&firsts, 0.99);
    r.completed_p50_ms = percentile(&dones, 0.5);
    r.completed_p99_ms = percentile(&dones, 0.99);
    r.completed_p99_first_ms = p99(accepted
        .iter()
        .filter(first)
        .map(|s| since_due(s, seen_of(s).completed))
        .collect());
    r.completed_p99_last_ms = p99(accepted
        .iter()
        .filter(last)
        .map(|s| since_due(s, seen_of(s).completed))
        .collect());
    r
}

struct Follower {
    /// Held while the first connection opens.
    ramp: Option<Arc<tokio::sync::Semaphore>>,
    client: reqwest::Client,
    url: String,
    token: String,
    replies: Arc<std::sync::Mutex<Replies>>,
    stop: Arc<AtomicBool>,
}

impl Follower {
    fn lock(&self) -> std::sync::MutexGuard<'_, Replies> {
        self.replies.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(mut self) {
        let ramp = self.ramp.take();
        let mut permit = match &ramp {
            Some(r) => r.acquire().await.ok(),
            None => None,
        };
        let (mut attempts, mut opened) = (0u64, false);
        while !self.stop.load(Ordering::Relaxed) {
            if attempts > 0 {
                self.lock().reconnects += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            attempts += 1;
            let resp = self
                .client
                .get(&self.url)
                .bearer_auth(&self.token)
                .header("accept", "text/event-stream")
                .send()
                .await;
            let Ok(resp) = resp else { continue };
            if !resp.status().is_success() {
                continue;
            }
            if !opened {
                self.lock().opened += 1;
                opened = true;
            }
            permit.take();
            self.read(resp).await;
        }
    }

    async fn read(&self, resp: reqwest::Response) {
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if let Some((event, message_id)) = reply_event(&block) {
                    let now = Instant::now();
                    let mut r = self.lock();
                    let s = r.seen.entry(message_id).or_default();
                    s.first.get_or_insert(now);
                    if event == REPLY_COMPLETED {
                        s.completed.get_or_insert(now);
                    }
                }
            }
        }
    }
}

/// The platform's reply events (`examples/platform/src/protocol.rs`,
/// `EventKind::sse_name`): a live `assistant.preview`, the stored
/// `assistant.started` / `assistant.delta` / `assistant.completed`, or an
/// `error` answer. The first of any is the reply's first event.
const REPLY_EVENTS: [&str; 5] = [
    "assistant.preview",
    "assistant.started",
    "assistant.delta",
    "assistant.completed",
    "error",
];

/// The event that ends a reply.
const REPLY_COMPLETED: &str = "assistant.completed";

/// `(event name, message id)` of an SSE block carrying a reply event.
fn reply_event(block: &str) -> Option<(String, String)> {
    let mut event = "";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    if !REPLY_EVENTS.contains(&event) {
        return None;
    }
    let v: Value = serde_json::from_str(&data).ok()?;
    Some((event.to_owned(), v["message_id"].as_str()?.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(due_ms: u64, post_ms: f64, outcome: &str, id: Option<&str>) -> Sent {
        Sent {
            due: Duration::from_millis(due_ms),
            post_ms,
            outcome: outcome.to_owned(),
            message_id: id.map(str::to_owned),
            deferred: false,
        }
    }

    #[test]
    fn reply_events_are_read_from_sse_blocks() {
        let b = "event: assistant.delta\nid: 7\ndata: {\"message_id\":\"m1\",\"text\":\"hi\"}\n\n";
        assert_eq!(
            reply_event(b),
            Some(("assistant.delta".to_owned(), "m1".to_owned()))
        );
        let p = "event: assistant.preview\ndata: {\"message_id\":\"m2\",\"seq\":0}\n\n";
        assert_eq!(reply_event(p).map(|(_, id)| id), Some("m2".to_owned()));
        assert_eq!(
            reply_event("event: tool.result\ndata: {\"message_id\":\"m3\"}\n\n"),
            None
        );
        assert_eq!(reply_event(": heartbeat\n\n"), None);
        assert_eq!(reply_event("event: reset\ndata: {}\n\n"), None);
    }

    #[test]
    fn the_summary_counts_errors_and_unanswered_messages() {
        let start = Instant::now();
        let at = |ms: u64| Some(start + Duration::from_millis(ms));
        let sent = vec![
            sent(0, 5.0, "202", Some("a")),
            sent(400, 7.0, "202", Some("b")),
            sent(800, 9.0, "202", Some("c")),
            sent(900, 30.0, "503", None),
            sent(950, 15_000.0, "timeout", None),
        ];
        let mut seen = HashMap::new();
        seen.insert(
            "a".to_owned(),
            Seen {
                first: at(20),
                completed: at(100),
            },
        );
        seen.insert(
            "b".to_owned(),
            Seen {
                first: at(450),
                completed: None,
            },
        );
        let r = summarize(&sent, &seen, start, Duration::from_secs(1), 1.0, true);
        assert_eq!(r.offered, 5);
        assert_eq!(r.accepted, 3);
        assert_eq!(r.accepted_per_sec, 3.0);
        assert_eq!(r.error_count(), 2);
        assert_eq!(r.errors["503"], 1);
        assert_eq!(r.post_p50_ms, Some(7.0));
        assert_eq!(r.post_max_ms, Some(9.0));
        assert_eq!(r.completed, 1);
        assert_eq!(r.completed_p50_ms, Some(f64::INFINITY));
        assert_eq!(r.first_p50_ms, Some(50.0));
        assert_eq!(r.first_p99_ms, Some(f64::INFINITY));
        // First third: only `a` (due 0 ms), completed 100 ms after it was due.
        assert_eq!(r.completed_p99_first_ms, Some(100.0));
        // Not followed: no reply figures at all.
        let bare = summarize(
            &sent,
            &HashMap::new(),
            start,
            Duration::from_secs(1),
            1.0,
            false,
        );
        assert_eq!(bare.completed_p99_ms, None);
        assert_eq!(bare.post_p99_ms, Some(9.0));
    }
}
