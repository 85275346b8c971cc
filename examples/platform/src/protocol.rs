//! What travels on the bus between the gateway and the workers.
//!
//! Every message is a soma-bus [`Envelope`](soma_bus::Envelope) keyed by the
//! conversation id, so one conversation's messages, replies and memory
//! writes stay in order on their partitions. Off the bus, live previews of
//! replies travel as [`LiveEvent`]s on Redis pub/sub (best effort; the
//! client contract is on that type).

use serde::{Deserialize, Serialize};
use soma_policy::Principal;
use uuid::Uuid;

/// Envelope type of an accepted user message.
pub const MESSAGE_RECEIVED: &str = "chat.message.received";
/// Envelope type of reply events (see [`EventKind`]).
pub const REPLY_EVENT: &str = "chat.reply.event";
/// Envelope type of a memory write request.
pub const MEMORY_WRITE: &str = "memory.write.requested";
/// Envelope type of a tool call.
pub const TOOL_CALL: &str = "tool.call.requested";
/// Envelope type of a tool's result (on `chat.tool_results_topic`).
pub const TOOL_RESULT: &str = "tool.result";

/// A user message accepted by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub conversation_id: String,
    /// The text the user sent.
    pub text: String,
    /// Who sent it, as verified by the gateway's authentication layer (never
    /// a credential: subject, tenant, roles, scopes and how they
    /// authenticated).
    pub principal: Principal,
    /// The gateway request id, for logs.
    pub request_id: String,
}

/// What a reply event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The worker started answering `message_id`.
    Started,
    /// The next piece of the reply text.
    Delta,
    /// The reply is complete; `text` is the whole reply.
    Completed,
    /// The message got no reply; `text` says why (e.g. the policy denied
    /// the turn, or the model failed). Ends the answer like `completed`.
    Error,
    /// A tool ran (or was refused); `text` is its output (see
    /// [`ToolResult`]). The reply events follow.
    ToolResult,
    /// A **live preview** of a reply still being generated: `text` is the
    /// reply so far (not a piece of it), `seq` numbers the previews of one
    /// generation from 0. Best effort and never stored: it has no
    /// `event_id` (so no SSE `id:`), is never replayed on `Last-Event-ID`,
    /// and may be lost; the stored `started` / `delta` / `completed` (or
    /// `error`) events of the same `message_id` follow and are
    /// authoritative. See [`LiveEvent`].
    Preview,
}

impl EventKind {
    /// The SSE event name: `assistant.started`, `assistant.delta`,
    /// `assistant.completed`, `error`, `tool.result`, `assistant.preview`.
    pub fn sse_name(self) -> &'static str {
        match self {
            EventKind::Started => "assistant.started",
            EventKind::Delta => "assistant.delta",
            EventKind::Completed => "assistant.completed",
            EventKind::Error => "error",
            EventKind::ToolResult => "tool.result",
            EventKind::Preview => "assistant.preview",
        }
    }

    /// Whether this event ends the answer to its message (`completed` or
    /// `error`).
    pub fn is_final(self) -> bool {
        matches!(self, EventKind::Completed | EventKind::Error)
    }
}

/// One reply event, streamed to the conversation's SSE clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatEvent {
    /// The conversation.
    pub conversation_id: String,
    /// The user message being answered (its envelope id).
    pub message_id: Uuid,
    /// Position of this event within the reply, from 0.
    pub seq: u32,
    /// What this event is.
    pub kind: EventKind,
    /// Delta text, or the full reply on `completed`.
    pub text: String,
    /// Whether the reply used SomaBrain memory: `recalled`, `none` or
    /// `unavailable` (SomaBrain down: answered without memory).
    pub memory: MemoryStatus,
    /// The event's number in its conversation's session event stream
    /// (dense from 1 per tenant and conversation, given by the session
    /// event store in the transaction that produced it): the SSE `id`, and
    /// what `Last-Event-ID` resumes from. 0 on an event that was not stored.
    #[serde(default)]
    pub event_id: u64,
    /// On `completed`: the keys of the memories the reply used (the ids of
    /// the messages that created them). Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memories: Vec<String>,
}

/// A live preview on its way from the conversation worker to the gateways
/// (Redis pub/sub, channel `chat.live_channel`; see [`crate::live`]).
///
/// **The client contract.** While a reply is generated, SSE clients
/// connected at that moment receive `event: assistant.preview` events
/// ([`EventKind::Preview`]) with no `id:` line. Each carries the reply *so
/// far* for its `message_id`: render it as provisional text, replacing the
/// previous preview of that message. The stored events follow as before
/// (`assistant.started`, one `assistant.delta` with the reply,
/// `assistant.completed` or `error`, each with an `id:`): when they arrive
/// for that `message_id`, they replace the preview — `completed.text` is
/// the reply, `error` means there is none (a preview of a reply that then
/// failed is withdrawn). Previews are **at most once and may be lost**
/// (no subscriber at that moment, a gateway restart, Redis down, a slow
/// client): nothing depends on them. A message handled twice (a worker
/// crash before its commit) may preview twice, with `seq` from 0 again;
/// its stored events still come once. A client that ignores
/// `assistant.preview` sees exactly the stored stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveEvent {
    /// The conversation's tenant (the gateway's fan-out key, with the
    /// event's conversation).
    pub tenant: String,
    /// The preview (`kind` [`EventKind::Preview`], `event_id` 0).
    pub event: ChatEvent,
}

/// The preview number `seq` of the reply to `message_id`, with the reply
/// so far.
pub fn preview_event(
    message_id: Uuid,
    conversation_id: &str,
    seq: u32,
    so_far: &str,
    memory: MemoryStatus,
) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation_id.to_owned(),
        message_id,
        seq,
        kind: EventKind::Preview,
        text: so_far.to_owned(),
        memory,
        event_id: 0,
        memories: Vec::new(),
    }
}

/// How the worker's memory recall went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryStatus {
    /// Memories were recalled and used.
    Recalled,
    /// SomaBrain answered, with nothing relevant.
    None,
    /// SomaBrain was unavailable; the reply was made without memory.
    Unavailable,
}

/// A request to remember a conversation turn in SomaBrain, carried out by
/// the memory replicator after its own `memory.write` authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryWrite {
    /// The conversation.
    pub conversation_id: String,
    /// The user message (its envelope id); also the memory key, so a
    /// redelivery writes the same memory again rather than a second one.
    pub message_id: Uuid,
    /// On whose behalf the memory is written.
    pub principal: Principal,
    /// What the user said.
    pub user_text: String,
    /// What the assistant answered.
    pub reply_text: String,
    /// The memories the reply used (their keys): the replicator sends
    /// SomaBrain reward feedback for the turn with them.
    #[serde(default)]
    pub used_memories: Vec<String>,
}

/// The SomaBrain namespace of `subject`'s conversation memories:
/// `<base>.<first 16 hex digits of SHA-256(subject)>`, so recall without
/// a tenant-wide grant sees only the subject's own memories (the namespace
/// is a header value; a hash keeps any subject a valid one).
pub fn memory_namespace(base: &str, subject: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(subject.as_bytes());
    format!("{base}.{}", hex::encode(&digest[..8]))
}

/// A tool call the conversation worker hands to the tool executor: a user
/// message of the form `/<tool> <input>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The conversation.
    pub conversation_id: String,
    /// The user message (its envelope id); the tool's reply answers it.
    pub message_id: Uuid,
    /// On whose behalf the tool runs (authorized again by the executor).
    pub principal: Principal,
    /// The tool's name.
    pub tool: String,
    /// Everything after the tool name.
    pub input: String,
    /// The gateway request id of the message: the result carries it back.
    #[serde(default)]
    pub request_id: String,
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolStatus {
    /// It ran; `output` is what it returned.
    Ok,
    /// The policy refused it; `output` says why.
    Denied,
    /// No tool has that name.
    Unknown,
    /// It ran longer than its timeout and was stopped.
    TimedOut,
    /// It failed.
    Failed,
}

/// A tool's result, published on `chat.tool_results_topic` (keyed by the
/// conversation) and relayed to the session stream as a `tool.result`
/// event, correlated with the call by `request_id` and `message_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolResult {
    /// The conversation.
    pub conversation_id: String,
    /// The user message that called the tool.
    pub message_id: Uuid,
    /// The gateway request id of that message.
    pub request_id: String,
    /// The tool's name.
    pub tool: String,
    /// How it ended.
    pub status: ToolStatus,
    /// Its output (at most the tool's output limit, in bytes).
    pub output: String,
    /// Whether `output` was cut at the tool's output limit.
    pub truncated: bool,
    /// How long it ran, in milliseconds.
    pub elapsed_ms: u64,
}

/// `Some((tool, input))` when `text` is a tool call: `/` then a name of
/// ASCII letters, digits, `_` or `-`, then optional input.
pub fn parse_tool_call(text: &str) -> Option<(String, String)> {
    let rest = text.trim().strip_prefix('/')?;
    let (name, input) = match rest.split_once(char::is_whitespace) {
        Some((n, i)) => (n, i.trim()),
        None => (rest, ""),
    };
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then(|| (name.to_owned(), input.to_owned()))
}

/// Whether `id` is an acceptable conversation id: 1–128 ASCII letters,
/// digits, `-` or `_` (it becomes a Kafka key and a SomaBrain key).
pub fn valid_conversation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The events answering the user message `message_id`: `started`, one
/// `delta` with the whole reply (none for an empty one), `completed` with
/// it — at most [`STORED_EVENTS`] however long the reply is; not yet
/// numbered (`event_id` 0; the session event store numbers them, see
/// [`commit_reply`](crate::session_events::commit_reply)).
pub fn reply_events(
    message_id: Uuid,
    conversation_id: &str,
    reply: &str,
    memory: MemoryStatus,
    memories: &[String],
) -> Vec<ChatEvent> {
    let mut kinds = vec![(EventKind::Started, String::new())];
    if !reply.is_empty() {
        kinds.push((EventKind::Delta, reply.to_owned()));
    }
    kinds.push((EventKind::Completed, reply.to_owned()));
    kinds
        .into_iter()
        .enumerate()
        .map(|(seq, (kind, text))| ChatEvent {
            conversation_id: conversation_id.to_owned(),
            message_id,
            seq: seq as u32,
            memories: if kind == EventKind::Completed {
                memories.to_vec()
            } else {
                Vec::new()
            },
            kind,
            text,
            memory,
            event_id: 0,
        })
        .collect()
}

/// The one event answering `message_id` with an error: `text` says why.
pub fn error_event(
    message_id: Uuid,
    conversation_id: &str,
    text: &str,
    memory: MemoryStatus,
) -> ChatEvent {
    ChatEvent {
        conversation_id: conversation_id.to_owned(),
        message_id,
        seq: 0,
        kind: EventKind::Error,
        text: text.to_owned(),
        memory,
        event_id: 0,
        memories: Vec::new(),
    }
}

/// The envelope carrying `event`: keyed by its conversation (so one
/// conversation's events stay in order on one partition), caused by
/// `cause` (the message itself, or the tool call made from it).
pub fn event_envelope(
    cause: &soma_bus::Envelope,
    event: &ChatEvent,
) -> Result<soma_bus::Envelope, soma_bus::EnvelopeError> {
    soma_bus::Envelope::builder(
        REPLY_EVENT,
        cause.tenant.as_str(),
        event.conversation_id.as_str(),
    )
    .json(event)?
    .caused_by(cause)
    .build()
}

/// Most stored events one reply is answered with (`started`, one `delta`,
/// `completed`). Each is a row in the session event store and the outbox
/// and a record through the relay and the broker, and they are all written
/// in one transaction once the whole reply is generated — so splitting the
/// text over several stored deltas would show nothing sooner (the live
/// previews, [`crate::live`], are what shows the reply while it is being
/// written) and only multiplies the work. One event per word, and later
/// four deltas per reply, made the broker and the platform's PostgreSQL
/// the bottleneck under load (root README, *Load*).
pub const STORED_EVENTS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_three_stored_events_however_long() {
        let reply = "Hello alice, you said 2 words: \"hi  there\". My memory is unavailable.";
        let events = reply_events(Uuid::nil(), "c1", reply, MemoryStatus::None, &["k".into()]);
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::Started, EventKind::Delta, EventKind::Completed]
        );
        assert_eq!(events[1].text, reply, "the delta is the reply");
        let done = events.last().unwrap();
        assert!(done.kind.is_final() && done.text == reply);
        assert_eq!(done.memories, vec!["k".to_owned()], "only on completed");
        assert!(
            events[..events.len() - 1]
                .iter()
                .all(|e| e.memories.is_empty())
        );
        let seqs: Vec<u32> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        let long = "word ".repeat(500);
        let events = reply_events(Uuid::nil(), "c1", &long, MemoryStatus::None, &[]);
        assert_eq!(
            events.len(),
            STORED_EVENTS,
            "bounded however long the reply"
        );
        let empty = reply_events(Uuid::nil(), "c1", "", MemoryStatus::None, &[]);
        let kinds: Vec<EventKind> = empty.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::Started, EventKind::Completed],
            "no empty delta"
        );
    }

    #[test]
    fn memory_namespaces_are_per_subject_and_header_safe() {
        let a = memory_namespace("conversation", "alice");
        assert_eq!(a, memory_namespace("conversation", "alice"));
        assert_ne!(a, memory_namespace("conversation", "bob"));
        assert!(a.starts_with("conversation.") && a.len() == "conversation.".len() + 16);
        let odd = memory_namespace("conversation", "ünïcode|subject\n");
        assert!(odd.bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn tool_calls_are_recognised() {
        assert_eq!(
            parse_tool_call(" /wordcount a b "),
            Some(("wordcount".into(), "a b".into()))
        );
        assert_eq!(
            parse_tool_call("/time"),
            Some(("time".into(), String::new()))
        );
        assert_eq!(parse_tool_call("time"), None);
        assert_eq!(parse_tool_call("/"), None);
        assert_eq!(
            parse_tool_call("/rm -rf"),
            Some(("rm".into(), "-rf".into()))
        );
        assert_eq!(parse_tool_call("/a:b"), None);
    }

    #[test]
    fn conversation_ids_are_restricted() {
        assert!(valid_conversation_id("conv_1-a"));
        assert!(!valid_conversation_id(""));
        assert!(!valid_conversation_id("a b"));
        assert!(!valid_conversation_id("a:b"));
        assert!(!valid_conversation_id(&"x".repeat(129)));
    }
}
