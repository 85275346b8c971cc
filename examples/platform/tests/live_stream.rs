//! Issue #18, live token streaming, end to end (gateway and conversation
//! worker in-process, the real PostgreSQL, Redis and Kafka-protocol broker,
//! the controllable streaming model of `support::model`):
//!
//! - the SSE client receives a live preview of the reply while the model
//!   is still writing it (ordered against the model's own progress: the
//!   model is held mid-reply until the preview has arrived), then the
//!   stored reply exactly once, with ids, and a reconnect with
//!   `Last-Event-ID` replays only the stored events;
//! - a live path that is down (the worker's Redis unreachable) loses the
//!   previews and nothing else;
//! - an answered message delivered again is skipped before the model;
//! - time to first event on a slow model, without and with previews
//!   (printed; run with `--no-capture` to see it).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soma_example_platform::{Gateway, conversation};
use support::model::{Mode, ModelServer, TOKENS};
use support::*;

/// Delay per token of the slow model in the time-to-first-event runs.
const SLOW: Duration = Duration::from_millis(150);

/// When the first event of a reply reached the client.
struct FirstEvent {
    /// From just before the `POST` to the first SSE event of the reply.
    after: Duration,
    /// The model's tokens for this reply written by then.
    tokens_written: usize,
    /// Every event of the reply, up to its final one.
    events: Vec<SseEvent>,
}

/// One client of one conversation, and the model behind the platform.
struct Chat {
    client: reqwest::Client,
    base: String,
    conv: String,
    token: String,
    sse: SseReader,
    model: ModelServer,
}

impl Chat {
    /// Sends `text`; its message id.
    async fn send(&self, text: &str) -> String {
        let body = json!({ "text": text });
        let r = send(
            &self.client,
            &self.base,
            &self.conv,
            &self.token,
            body,
            None,
        )
        .await;
        message_id_of(expect_status(r, 202).await).await
    }

    /// Waits until a reply reaches the stream (a new worker joined).
    async fn warm_up(&mut self) {
        let delay = self.model.delay();
        self.model.set_delay(Duration::from_millis(20));
        warm_up(
            &self.client,
            &self.base,
            &mut self.sse,
            &self.conv,
            &self.token,
        )
        .await;
        self.model.set_delay(delay);
    }

    /// Sends one message and times its first event against the clock and
    /// against the model's progress.
    async fn first_event(&mut self) -> FirstEvent {
        let written = self.model.tokens_written();
        let sent = Instant::now();
        let id = self.send("tell me about teal").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = None;
        let mut events = Vec::new();
        while let Some(ev) = self.sse.next(deadline).await {
            if ev.data["message_id"] != id.as_str() {
                continue;
            }
            first.get_or_insert((sent.elapsed(), self.model.tokens_written() - written));
            let done = ev.event == "assistant.completed" || ev.event == "error";
            events.push(ev);
            if done {
                let (after, tokens_written) = first.unwrap();
                return FirstEvent {
                    after,
                    tokens_written,
                    events,
                };
            }
        }
        panic!("no answer to {id} within 60 s: {events:?}");
    }

    /// The next event of the reply to `id`.
    async fn next_of(&mut self, id: &str) -> SseEvent {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ev = self
                .sse
                .next(deadline)
                .await
                .expect("an event of the reply");
            if ev.data["message_id"] == id {
                return ev;
            }
        }
    }
}

/// The stored events of one reply: `started`, deltas adding up to the
/// reply, `completed` with it, with dense ids; returns the ids.
fn assert_stored_reply(events: &[&SseEvent], reply: &str) -> Vec<u64> {
    assert_eq!(events.first().unwrap().event, "assistant.started");
    assert_eq!(events.last().unwrap().event, "assistant.completed");
    assert_eq!(events.last().unwrap().data["text"], reply);
    let deltas: String = events
        .iter()
        .filter(|e| e.event == "assistant.delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, reply);
    let ids: Vec<u64> = events.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "dense ids: {ids:?}"
    );
    ids
}

/// Previews of `reply`: no id, numbered in order, each a longer prefix of
/// the reply, at most the configured number.
fn assert_previews(previews: &[SseEvent], reply: &str) {
    let seqs: Vec<u64> = previews
        .iter()
        .map(|e| e.data["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    assert!(previews.len() <= 32, "bounded per reply");
    let mut grown = 0;
    for p in previews {
        assert!(p.id.is_empty(), "a preview has no SSE id: {p:?}");
        let t = p.data["text"].as_str().unwrap();
        assert!(
            reply.starts_with(t) && t.len() >= grown,
            "previews grow: {t:?}"
        );
        grown = t.len();
        assert_eq!(p.data["kind"], "preview");
        assert_eq!(p.data["event_id"], Value::from(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_reach_the_client_while_the_model_writes_and_the_stored_reply_follows_once() {
    let env = Env::new();
    let model = ModelServer::start(Mode::Stream).await;
    let llm = [("llm.base_url", json!(model.base_url()))];
    let gateway = Gateway::start(env.settings(&llm), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let (client, base) = (reqwest::Client::new(), format!("http://{}", gateway.addr()));
    let token = env.token("ava", "acme", &["user"], ALL_SCOPES);
    let conv = format!("l-{}", uuid::Uuid::new_v4().simple());
    let sse = SseReader::open(&client, &base, &conv, &token).await;
    let mut chat = Chat {
        client,
        base,
        conv,
        token,
        sse,
        model,
    };
    let before = without_a_live_path(&env, &mut chat).await;

    let worker = conversation::start(env.settings(&llm), listener().await)
        .await
        .expect("conversation worker starts");
    chat.warm_up().await;
    let after = chat.first_event().await;
    assert_eq!(
        after.events[0].event, "assistant.preview",
        "{:?}",
        after.events
    );
    assert!(
        after.tokens_written < TOKENS.len(),
        "first event before the last token"
    );
    println!(
        "time to first event, model writing {n} tokens {} ms apart: {} ms without live previews \
         (after {}/{n} tokens), {} ms with (after {}/{n} tokens)",
        SLOW.as_millis(),
        before.after.as_millis(),
        before.tokens_written,
        after.after.as_millis(),
        after.tokens_written,
        n = TOKENS.len(),
    );
    let last_seen = after.events.last().unwrap().id.clone();

    let (id, reply) = held_model_reply(&mut chat).await;
    // Exactly once: nothing more for that message (no second reply, no
    // late preview).
    let quiet = Instant::now() + Duration::from_secs(2);
    while let Some(ev) = chat.sse.next(quiet).await {
        assert_ne!(
            ev.data["message_id"],
            id.as_str(),
            "after completed: {ev:?}"
        );
    }
    // A reconnect from before the reply replays the stored events only,
    // with the ids the live stream gave them.
    let (client, base) = (&chat.client, &chat.base);
    let mut again =
        SseReader::resume(client, base, &chat.conv, &chat.token, Some(&last_seen)).await;
    let replayed = again
        .reply_to(&id, Duration::from_secs(30))
        .await
        .expect("replayed");
    let replayed_ids = assert_stored_reply(&replayed.iter().collect::<Vec<_>>(), &TOKENS.concat());
    assert_eq!(replayed_ids, reply, "same events, same ids");

    let previews = "soma_platform_live_previews_total";
    let published = metric(
        client,
        worker.admin_addr(),
        previews,
        "outcome=\"published\"",
    )
    .await;
    let received = metric(
        client,
        gateway.admin_addr(),
        previews,
        "outcome=\"received\"",
    )
    .await;
    assert!(
        published >= 2.0 && received >= 2.0,
        "{published} published, {received} received"
    );
    redelivery_is_skipped(&env, &mut chat, &gateway, &worker, &id).await;
    drop((chat, again));
    worker.shutdown().await;
    gateway.shutdown().await;
}

/// The answered message delivered again (what a crash before the offset
/// commit does): skipped before the model is asked, nothing on the stream.
async fn redelivery_is_skipped(
    env: &Env,
    chat: &mut Chat,
    gateway: &Gateway,
    worker: &soma_example_platform::Worker,
    id: &str,
) {
    let asked = chat.model.seen().len();
    let principal = soma_policy::Principal {
        subject: "ava".into(),
        tenant: "acme".into(),
        roles: vec!["user".into()],
        scopes: ALL_SCOPES.split(' ').map(str::to_owned).collect(),
        auth_kind: soma_policy::AuthKind::Jwt {
            issuer: ISSUER.into(),
        },
    };
    let request = soma_example_platform::protocol::ChatRequest {
        conversation_id: chat.conv.clone(),
        text: "and again".into(),
        principal,
        request_id: "redelivered".into(),
    };
    let again = soma_bus::Envelope::builder("chat.message.received", "acme", chat.conv.as_str())
        .id(id.parse().unwrap())
        .json(&request)
        .unwrap()
        .build()
        .unwrap();
    let topic = format!("{}.requests", env.prefix);
    gateway
        .runtime()
        .publisher
        .publish(&topic, &again)
        .await
        .unwrap();
    let (client, admin) = (&chat.client, worker.admin_addr());
    let turns = "soma_platform_assistant_turns_total";
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(client, admin, turns, "outcome=\"duplicate\"").await < 1.0 {
        assert!(Instant::now() < deadline, "the redelivery was not skipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        chat.model.seen().len(),
        asked,
        "the model was not asked again"
    );
    let quiet = Instant::now() + Duration::from_secs(1);
    while let Some(ev) = chat.sse.next(quiet).await {
        assert_ne!(ev.data["message_id"], id, "answered again: {ev:?}");
    }
}

/// With the worker's Redis unreachable every preview is lost: the reply
/// is whole and stored, and its first event comes after the model's last
/// token (what clients saw before live previews).
async fn without_a_live_path(env: &Env, chat: &mut Chat) -> FirstEvent {
    let dead_redis = format!("redis://127.0.0.1:{}", soma_testkit::free_port());
    let settings = env.settings(&[
        ("llm.base_url", json!(chat.model.base_url())),
        ("redis.url", json!(dead_redis)),
    ]);
    let blind = conversation::start(settings, listener().await)
        .await
        .expect("a worker starts without Redis");
    chat.warm_up().await;
    chat.model.set_delay(SLOW);
    let before = chat.first_event().await;
    let kinds: Vec<&str> = before.events.iter().map(|e| e.event.as_str()).collect();
    assert!(!kinds.contains(&"assistant.preview"), "{kinds:?}");
    let stored: Vec<&SseEvent> = before.events.iter().collect();
    assert_stored_reply(&stored, &TOKENS.concat());
    assert_eq!(
        before.tokens_written,
        TOKENS.len(),
        "first event after the last token"
    );
    let previews = "soma_platform_live_previews_total";
    let lost = metric(
        &chat.client,
        blind.admin_addr(),
        previews,
        "outcome=\"failed\"",
    )
    .await;
    assert!(lost >= 1.0, "the previews were tried and lost: {lost}");
    blind.shutdown().await;
    before
}

/// The model writes two tokens and is then held: the client must see a
/// preview of them before the model may go on. Returns the message id and
/// the ids of its stored events.
async fn held_model_reply(chat: &mut Chat) -> (String, Vec<u64>) {
    let model = chat.model.clone();
    model.set_mode(Mode::Gated);
    let finished = model.streams_finished();
    let written = model.tokens_written();
    let id = chat.send("and again").await;
    model.release(2);
    let preview = chat.next_of(&id).await;
    assert_eq!(
        preview.event, "assistant.preview",
        "nothing stored before the end"
    );
    // The model has not finished: it is held after two tokens.
    assert_eq!(model.streams_finished(), finished);
    assert!(model.tokens_written() - written <= 2);
    let reply = TOKENS.concat();
    let text = preview.data["text"].as_str().unwrap();
    assert!(!text.is_empty() && reply.starts_with(text), "{text:?}");

    model.release(TOKENS.len() - 2);
    let mut events = vec![preview];
    events.extend(answer_to(&mut chat.sse, &id).await);
    model.set_mode(Mode::Stream);
    let first_stored = events
        .iter()
        .position(|e| e.event != "assistant.preview")
        .unwrap();
    let (previews, stored) = events.split_at(first_stored);
    assert!(
        stored.iter().all(|e| e.event != "assistant.preview"),
        "{events:?}"
    );
    assert_previews(previews, &reply);
    let ids = assert_stored_reply(&stored.iter().collect::<Vec<_>>(), &reply);
    (id, ids)
}
