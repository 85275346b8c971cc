//! Who writes the assistant's answer: a [`ReplyGenerator`].
//!
//! Two are built in, chosen by the `llm` settings section:
//!
//! - [`OpenAiChat`] when `llm.base_url` is set: an OpenAI-compatible
//!   `POST {base_url}/chat/completions` with `"stream": true`, reading the
//!   server-sent `choices[0].delta.content` pieces as they arrive (so the
//!   worker measures time to first token), with the recalled memories in
//!   the system message. A non-2xx answer, a body that is not an event
//!   stream, a stream that ends before `data: [DONE]` or a request past
//!   `llm.request_timeout_ms` is a [`GenerateError`]: the turn is answered
//!   with an `error` event instead of a reply, and nothing is remembered.
//! - [`BuiltinResponder`] otherwise: answers from the recalled memories and
//!   says plainly that no language model is configured.
//!
//! The API key (`llm.api_key`) is a secret: sent as a bearer token, never
//! logged, never in an error.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use soma_config::Secret;

use crate::protocol::MemoryStatus;

/// One memory a reply may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecalledMemory {
    /// The memory's key (the id of the message that created it).
    pub key: String,
    /// What the user said then.
    pub text: String,
}

/// What a generator answers.
#[derive(Debug, Clone)]
pub struct Turn {
    /// Who is talking (their subject).
    pub subject: String,
    /// What they said.
    pub text: String,
    /// How recall went.
    pub memory: MemoryStatus,
    /// What was recalled (empty unless `memory` is `Recalled`).
    pub memories: Vec<RecalledMemory>,
}

/// Why a generator produced no (complete) reply.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model endpoint could not be reached or timed out.
    #[error("model endpoint unavailable: {0}")]
    Unavailable(String),
    /// The model endpoint answered with an error status.
    #[error("model endpoint answered {status}")]
    Status {
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not the streaming format, or broke off.
    #[error("model stream malformed: {0}")]
    Malformed(String),
}

impl GenerateError {
    /// Whether the endpoint was unreachable, timed out, or answered 429/5xx
    /// (a later turn may succeed).
    pub fn is_unavailable(&self) -> bool {
        match self {
            GenerateError::Unavailable(_) => true,
            GenerateError::Status { status } => *status == 429 || *status >= 500,
            GenerateError::Malformed(_) => false,
        }
    }
}

/// Reply text, in pieces as the generator produces them.
pub type TokenStream<'a> = BoxStream<'a, Result<String, GenerateError>>;

/// Writes the assistant's answer to one turn, as a stream of text pieces
/// (tokens, or whatever unit the model streams): their concatenation is the
/// reply.
pub trait ReplyGenerator: Send + Sync + 'static {
    /// `builtin` or `openai` (a metric label).
    fn name(&self) -> &'static str;
    /// The answer to `turn`.
    fn generate<'a>(&'a self, turn: &'a Turn) -> TokenStream<'a>;
}

/// The model-less responder: a deterministic answer naming the sender, what
/// they said, and the memories it recalled, and saying that no language
/// model is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinResponder;

/// What the built-in responder says about itself.
pub const NO_MODEL_NOTE: &str =
    "No language model is configured (set llm.base_url); this answer is built from your memories.";

impl BuiltinResponder {
    /// The whole reply to `turn`.
    pub fn reply(turn: &Turn) -> String {
        let words = turn.text.split_whitespace().count();
        let memory_note = match turn.memory {
            MemoryStatus::Recalled => format!(
                "I remember: {}.",
                turn.memories
                    .iter()
                    .map(|m| m.text.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            MemoryStatus::None => "I have no memories of this yet.".to_owned(),
            MemoryStatus::Unavailable => "My memory is unavailable right now.".to_owned(),
        };
        format!(
            "Hello {}, you said {} word{}: \"{}\". {} {}",
            turn.subject,
            words,
            if words == 1 { "" } else { "s" },
            turn.text.trim(),
            memory_note,
            NO_MODEL_NOTE
        )
    }
}

impl ReplyGenerator for BuiltinResponder {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn generate<'a>(&'a self, turn: &'a Turn) -> TokenStream<'a> {
        // One piece per word (with its trailing space), like a model.
        let reply = Self::reply(turn);
        let mut pieces = Vec::new();
        let mut current = String::new();
        for ch in reply.chars() {
            current.push(ch);
            if ch == ' ' {
                pieces.push(Ok(std::mem::take(&mut current)));
            }
        }
        if !current.is_empty() {
            pieces.push(Ok(current));
        }
        futures::stream::iter(pieces).boxed()
    }
}

/// The `llm` settings section: an OpenAI-compatible chat-completions
/// endpoint. Empty `base_url`: no model, the built-in responder answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LlmSettings {
    /// E.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`
    /// (`/chat/completions` is appended). Empty: no model.
    pub base_url: String,
    /// The model name sent in each request.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when not empty. A secret.
    pub api_key: Secret,
    /// Longest a whole streamed answer may take.
    pub request_timeout_ms: u64,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            model: "gpt-4o-mini".into(),
            api_key: Secret::default(),
            request_timeout_ms: 30_000,
            max_tokens: 512,
        }
    }
}

/// The generator the settings ask for: [`OpenAiChat`] when
/// `llm.base_url` is set, else [`BuiltinResponder`].
pub fn from_settings(llm: &LlmSettings) -> Result<Box<dyn ReplyGenerator>, GenerateError> {
    if llm.base_url.trim().is_empty() {
        Ok(Box::new(BuiltinResponder))
    } else {
        Ok(Box::new(OpenAiChat::new(llm)?))
    }
}

/// An OpenAI-compatible chat-completions client that streams (see the
/// module docs).
#[derive(Clone)]
pub struct OpenAiChat {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: Secret,
    max_tokens: u32,
}

impl std::fmt::Debug for OpenAiChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiChat")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl OpenAiChat {
    /// A client for `llm.base_url`.
    pub fn new(llm: &LlmSettings) -> Result<Self, GenerateError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(llm.request_timeout_ms))
            .build()
            .map_err(|e| GenerateError::Unavailable(e.to_string()))?;
        Ok(Self {
            http,
            url: format!("{}/chat/completions", llm.base_url.trim_end_matches('/')),
            model: llm.model.clone(),
            api_key: llm.api_key.clone(),
            max_tokens: llm.max_tokens,
        })
    }

    fn body(&self, turn: &Turn) -> serde_json::Value {
        let mut system = String::from(
            "You are the Soma example platform's assistant. Answer briefly. \
             Memories of earlier turns with this user:\n",
        );
        if turn.memories.is_empty() {
            system.push_str("(none)\n");
        }
        for m in &turn.memories {
            system.push_str("- ");
            system.push_str(&m.text);
            system.push('\n');
        }
        serde_json::json!({
            "model": self.model,
            "stream": true,
            "max_tokens": self.max_tokens,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": turn.text},
            ],
        })
    }

    async fn open(
        &self,
        turn: &Turn,
    ) -> Result<BoxStream<'static, reqwest::Result<bytes::Bytes>>, GenerateError> {
        let mut req = self.http.post(&self.url).json(&self.body(turn));
        if !self.api_key.is_empty() {
            req = req.bearer_auth(self.api_key.expose_secret());
        }
        // reqwest's errors name the URL, never the headers.
        let resp = req
            .send()
            .await
            .map_err(|e| GenerateError::Unavailable(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(GenerateError::Status {
                status: resp.status().as_u16(),
            });
        }
        Ok(resp.bytes_stream().boxed())
    }
}

/// Reads `data:` lines of a chat-completions event stream.
struct SseTokens {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    ready: VecDeque<String>,
    done: bool,
}

impl SseTokens {
    /// Parses the complete lines in the buffer; `Ok(true)` at `[DONE]`.
    fn drain_lines(&mut self) -> Result<bool, GenerateError> {
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(true);
            }
            let v: serde_json::Value = serde_json::from_str(data)
                .map_err(|e| GenerateError::Malformed(format!("event data: {e}")))?;
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                if !piece.is_empty() {
                    self.ready.push_back(piece.to_owned());
                }
            }
        }
        Ok(false)
    }

    async fn next(&mut self) -> Option<Result<String, GenerateError>> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Some(Ok(p));
            }
            if self.done {
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    self.buf.extend_from_slice(&chunk);
                    match self.drain_lines() {
                        Ok(true) => self.done = true,
                        Ok(false) => {}
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(GenerateError::Unavailable(e.without_url().to_string())));
                }
                None => {
                    self.done = true;
                    return Some(Err(GenerateError::Malformed(
                        "the stream ended before [DONE]".into(),
                    )));
                }
            }
        }
    }
}

impl ReplyGenerator for OpenAiChat {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn generate<'a>(&'a self, turn: &'a Turn) -> TokenStream<'a> {
        let opened = futures::stream::once(self.open(turn));
        opened
            .flat_map(|r| match r {
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
                Ok(body) => futures::stream::unfold(
                    SseTokens {
                        body,
                        buf: Vec::new(),
                        ready: VecDeque::new(),
                        done: false,
                    },
                    |mut s| async move { s.next().await.map(|item| (item, s)) },
                )
                .boxed(),
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(memory: MemoryStatus, memories: Vec<RecalledMemory>) -> Turn {
        Turn {
            subject: "alice".into(),
            text: "hi  there".into(),
            memory,
            memories,
        }
    }

    #[tokio::test]
    async fn the_builtin_responder_streams_its_reply_word_by_word() {
        let t = turn(
            MemoryStatus::Recalled,
            vec![RecalledMemory {
                key: "k1".into(),
                text: "I like teal".into(),
            }],
        );
        let pieces: Vec<String> = BuiltinResponder
            .generate(&t)
            .map(|p| p.unwrap())
            .collect()
            .await;
        assert!(pieces.len() > 5);
        let reply = pieces.concat();
        assert_eq!(reply, BuiltinResponder::reply(&t));
        assert!(reply.starts_with("Hello alice, you said 2 words: \"hi  there\"."));
        assert!(reply.contains("I remember: I like teal."), "{reply}");
        assert!(reply.ends_with(NO_MODEL_NOTE), "{reply}");
    }

    fn tokens_of(chunks: &[&str]) -> SseTokens {
        let chunks: Vec<reqwest::Result<bytes::Bytes>> = chunks
            .iter()
            .map(|c| Ok(bytes::Bytes::from(c.to_string())))
            .collect();
        SseTokens {
            body: futures::stream::iter(chunks).boxed(),
            buf: Vec::new(),
            ready: VecDeque::new(),
            done: false,
        }
    }

    async fn drain(mut t: SseTokens) -> Vec<Result<String, String>> {
        let mut out = Vec::new();
        while let Some(r) = t.next().await {
            out.push(r.map_err(|e| e.to_string()));
        }
        out
    }

    #[tokio::test]
    async fn stream_pieces_are_read_across_chunk_boundaries() {
        let ok = drain(tokens_of(&[
            ": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\nda",
            "ta: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\ndata:{\"choices\":[{\"delta\":",
            "{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n",
        ]))
        .await;
        assert_eq!(ok, vec![Ok("Hel".to_owned()), Ok("lo".to_owned())]);
        let cut = drain(tokens_of(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ]))
        .await;
        assert_eq!(cut.len(), 2);
        assert!(
            cut[1].as_ref().unwrap_err().contains("before [DONE]"),
            "{cut:?}"
        );
        let bad = drain(tokens_of(&["data: {not json\n\n"])).await;
        assert!(
            bad[0].as_ref().unwrap_err().contains("malformed"),
            "{bad:?}"
        );
    }

    #[test]
    fn only_a_base_url_selects_the_model_client() {
        let mut llm = LlmSettings::default();
        assert_eq!(from_settings(&llm).unwrap().name(), "builtin");
        llm.base_url = "http://127.0.0.1:1/v1/".into();
        let g = OpenAiChat::new(&llm).unwrap();
        assert_eq!(g.url, "http://127.0.0.1:1/v1/chat/completions");
        assert_eq!(from_settings(&llm).unwrap().name(), "openai");
    }

    #[test]
    fn unavailability_is_told_apart_from_a_broken_answer() {
        assert!(GenerateError::Status { status: 503 }.is_unavailable());
        assert!(GenerateError::Status { status: 429 }.is_unavailable());
        assert!(!GenerateError::Status { status: 400 }.is_unavailable());
        assert!(!GenerateError::Malformed("x".into()).is_unavailable());
    }
}
