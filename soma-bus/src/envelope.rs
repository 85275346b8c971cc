//! The message envelope and its mapping to and from Kafka headers.
//!
//! Every message on the bus is an [`Envelope`]: metadata travels in Kafka
//! headers named `soma-*` (plus the W3C `traceparent` / `tracestate`), the
//! ordering key is the Kafka message key and the payload is the message value.
//! [`Envelope::from_kafka`] is strict: a required header that is missing or
//! malformed is reported by name, so a consumer can dead-letter the message
//! instead of guessing.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Header carrying the envelope id (UUID, normally v7).
pub const HEADER_ID: &str = "soma-id";
/// Header carrying the message type, e.g. `session.message.created`.
pub const HEADER_TYPE: &str = "soma-type";
/// Header carrying the tenant id.
pub const HEADER_TENANT: &str = "soma-tenant";
/// Header carrying the occurred-at instant (RFC 3339, UTC).
pub const HEADER_OCCURRED_AT: &str = "soma-occurred-at";
/// Header carrying the payload schema version (unsigned integer).
pub const HEADER_SCHEMA_VERSION: &str = "soma-schema-version";
/// Header carrying the correlation id (optional).
pub const HEADER_CORRELATION_ID: &str = "soma-correlation-id";
/// Header carrying the causation id (optional).
pub const HEADER_CAUSATION_ID: &str = "soma-causation-id";
/// Header carrying the payload content type (optional, e.g. `application/json`).
pub const HEADER_CONTENT_TYPE: &str = "soma-content-type";
/// Header saying the message was published deliberately without a key.
pub const HEADER_UNKEYED: &str = "soma-unkeyed";
/// Header counting how many times a message was replayed from a DLQ.
pub const HEADER_REPLAY_COUNT: &str = "soma-replay-count";
/// W3C trace context header: the one constant of
/// [`soma_observability::propagation`], named like this crate's other headers.
pub use soma_observability::propagation::TRACEPARENT as HEADER_TRACEPARENT;
/// W3C trace state header: the one constant of
/// [`soma_observability::propagation`], named like this crate's other headers.
pub use soma_observability::propagation::TRACESTATE as HEADER_TRACESTATE;

/// Prefix of the headers this crate owns; [`Envelope::attributes`] may not use it.
pub const SOMA_HEADER_PREFIX: &str = "soma-";

/// JSON content type.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Why a Kafka record (or an envelope under construction) is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A required header is absent.
    #[error("required header `{0}` is missing")]
    MissingHeader(&'static str),
    /// A header is present but its value cannot be parsed.
    #[error("header `{name}` is malformed: {reason}")]
    MalformedHeader {
        /// Header name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The record has no key but was not published as deliberately unkeyed.
    #[error("record has no key and no `{HEADER_UNKEYED}` header")]
    MissingKey,
    /// The record key is not UTF-8.
    #[error("record key is not valid UTF-8")]
    KeyNotUtf8,
    /// A field given to the builder is invalid (empty type, tenant or key).
    #[error("invalid envelope field `{field}`: {reason}")]
    InvalidField {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The payload could not be (de)serialized as JSON.
    #[error("payload is not valid JSON for the requested type: {0}")]
    Payload(String),
}

impl EnvelopeError {
    /// True when a header was missing or malformed.
    pub fn is_header(&self) -> bool {
        matches!(self, Self::MissingHeader(_) | Self::MalformedHeader { .. })
    }

    /// True when the payload could not be decoded.
    pub fn is_payload(&self) -> bool {
        matches!(self, Self::Payload(_))
    }
}

/// W3C trace context carried by an envelope.
///
/// It implements soma-observability's
/// [`HeaderCarrier`](soma_observability::propagation::HeaderCarrier) (see
/// [trace context](crate#trace-context)). [`TraceContext::parse`] is the strict decoder used for
/// received records: whatever it accepts, the W3C propagator accepts too, and
/// what it rejects is reported by reason so the record can be dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TraceContext {
    /// `traceparent` header value (`00-<trace-id>-<span-id>-<flags>`).
    pub traceparent: String,
    /// `tracestate` header value, if any.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Validates the `traceparent` syntax (version 00, 32+16 hex digits, non-zero ids).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, EnvelopeError> {
        let bad = |reason: &str| EnvelopeError::MalformedHeader {
            name: HEADER_TRACEPARENT.to_owned(),
            reason: reason.to_owned(),
        };
        let parts: Vec<&str> = traceparent.split('-').collect();
        if parts.len() != 4 {
            return Err(bad("expected four dash-separated fields"));
        }
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(parts[0], 2) || parts[0] == "ff" {
            return Err(bad("invalid version"));
        }
        if !hex(parts[1], 32) || parts[1].bytes().all(|b| b == b'0') {
            return Err(bad("invalid trace id"));
        }
        if !hex(parts[2], 16) || parts[2].bytes().all(|b| b == b'0') {
            return Err(bad("invalid parent id"));
        }
        if !hex(parts[3], 2) {
            return Err(bad("invalid flags"));
        }
        Ok(Self {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate.filter(|s| !s.is_empty()).map(str::to_owned),
        })
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        self.traceparent.split('-').nth(1).unwrap_or_default()
    }

    /// The 16-hex-digit id of the span that sent the message (the parent of
    /// the receiver's span).
    pub fn span_id(&self) -> &str {
        self.traceparent.split('-').nth(2).unwrap_or_default()
    }
}

/// A message on the bus: metadata, ordering key and payload bytes.
///
/// Build one with [`Envelope::builder`] (keyed) — the key decides the
/// partition and therefore the order in which consumers see messages of the
/// same key. [`EnvelopeBuilder::unkeyed`] opts out explicitly.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique message id (UUIDv7: time-ordered). Duplicates of a message carry the same id.
    pub id: Uuid,
    /// Message type, e.g. `session.message.created`.
    pub message_type: String,
    /// Tenant the message belongs to.
    pub tenant: String,
    /// Ordering key (`None` only when built with [`EnvelopeBuilder::unkeyed`]).
    pub key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Payload content type (`application/json` for the JSON helpers).
    pub content_type: Option<String>,
    /// When the event occurred.
    pub occurred_at: DateTime<Utc>,
    /// Payload schema version.
    pub schema_version: u32,
    /// Correlation id (ties together all messages of one conversation / request).
    pub correlation_id: Option<String>,
    /// Causation id (the id of the message that caused this one).
    pub causation_id: Option<String>,
    /// W3C trace context. `None` on a new envelope: the publisher then sends
    /// the context of its `soma.publish` span. Set on received envelopes when
    /// the record carried a `traceparent`.
    pub trace: Option<TraceContext>,
    /// Application headers (names must not start with `soma-`).
    pub attributes: BTreeMap<String, String>,
    /// How many times this message was replayed from a DLQ (0 for fresh messages).
    pub replay_count: u32,
}

/// Builder for [`Envelope`].
#[derive(Debug, Clone)]
pub struct EnvelopeBuilder {
    env: Envelope,
    keyed: bool,
}

impl Envelope {
    /// Starts an envelope of `message_type` for `tenant`, ordered by `key`.
    pub fn builder(
        message_type: impl Into<String>,
        tenant: impl Into<String>,
        key: impl Into<String>,
    ) -> EnvelopeBuilder {
        EnvelopeBuilder {
            env: Envelope {
                id: Uuid::now_v7(),
                message_type: message_type.into(),
                tenant: tenant.into(),
                key: Some(key.into()),
                payload: Vec::new(),
                content_type: None,
                occurred_at: Utc::now().trunc_subsecs(6),
                schema_version: 1,
                correlation_id: None,
                causation_id: None,
                trace: None,
                attributes: BTreeMap::new(),
                replay_count: 0,
            },
            keyed: true,
        }
    }

    /// Deserializes the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        serde_json::from_slice(&self.payload).map_err(|e| EnvelopeError::Payload(e.to_string()))
    }

    /// The key as bytes for Kafka (`None` when unkeyed).
    pub fn kafka_key(&self) -> Option<&[u8]> {
        self.key.as_deref().map(str::as_bytes)
    }

    /// Encodes the metadata as header name/value pairs, in a stable order.
    pub fn to_headers(&self) -> Vec<(&'static str, String)> {
        let mut h: Vec<(&'static str, String)> = Vec::with_capacity(10);
        h.push((HEADER_ID, self.id.to_string()));
        h.push((HEADER_TYPE, self.message_type.clone()));
        h.push((HEADER_TENANT, self.tenant.clone()));
        h.push((
            HEADER_OCCURRED_AT,
            self.occurred_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ));
        h.push((HEADER_SCHEMA_VERSION, self.schema_version.to_string()));
        if let Some(v) = &self.correlation_id {
            h.push((HEADER_CORRELATION_ID, v.clone()));
        }
        if let Some(v) = &self.causation_id {
            h.push((HEADER_CAUSATION_ID, v.clone()));
        }
        if let Some(v) = &self.content_type {
            h.push((HEADER_CONTENT_TYPE, v.clone()));
        }
        if self.key.is_none() {
            h.push((HEADER_UNKEYED, "true".to_owned()));
        }
        if self.replay_count > 0 {
            h.push((HEADER_REPLAY_COUNT, self.replay_count.to_string()));
        }
        if let Some(t) = &self.trace {
            h.push((HEADER_TRACEPARENT, t.traceparent.clone()));
            if let Some(s) = &t.tracestate {
                h.push((HEADER_TRACESTATE, s.clone()));
            }
        }
        h
    }

    /// All headers (envelope metadata and attributes) as an ordered map, the
    /// form soma-outbox stores.
    pub fn header_map(&self) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = self.attributes.clone();
        for (k, v) in self.to_headers() {
            m.insert(k.to_owned(), v);
        }
        m
    }

    /// Strictly decodes a Kafka record into an envelope.
    ///
    /// `headers` yields `(name, value bytes)`; values must be UTF-8. Unknown
    /// `soma-*` headers are ignored (forward compatibility); other headers
    /// become [`Envelope::attributes`].
    pub fn from_kafka<'a>(
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Self, EnvelopeError> {
        let (soma, attributes) = SomaHeaders::split(headers)?;
        // Checked in this order, so a record with several faults is
        // reported by the first.
        let id = Uuid::parse_str(soma.required(HEADER_ID)?)
            .map_err(|e| malformed(HEADER_ID, e.to_string()))?;
        let message_type = soma.non_empty(HEADER_TYPE)?;
        let tenant = soma.non_empty(HEADER_TENANT)?;
        let occurred_at = soma.occurred_at()?;
        let schema_version = soma
            .number(HEADER_SCHEMA_VERSION)?
            .ok_or(EnvelopeError::MissingHeader(HEADER_SCHEMA_VERSION))?;
        let replay_count = soma.number(HEADER_REPLAY_COUNT)?.unwrap_or(0);
        let key = record_key(key, soma.unkeyed()?)?;
        Ok(Envelope {
            id,
            message_type: message_type.to_owned(),
            tenant: tenant.to_owned(),
            key,
            payload: payload.unwrap_or_default().to_vec(),
            content_type: soma.owned(HEADER_CONTENT_TYPE),
            occurred_at,
            schema_version,
            correlation_id: soma.owned(HEADER_CORRELATION_ID),
            causation_id: soma.owned(HEADER_CAUSATION_ID),
            trace: soma.trace()?,
            attributes,
            replay_count,
        })
    }
}

fn malformed(name: &str, reason: String) -> EnvelopeError {
    EnvelopeError::MalformedHeader {
        name: name.to_owned(),
        reason,
    }
}

/// The key of a record: UTF-8, present unless the record is marked
/// unkeyed (and then absent).
fn record_key(key: Option<&[u8]>, unkeyed: bool) -> Result<Option<String>, EnvelopeError> {
    match key {
        Some(k) if !unkeyed => Ok(Some(
            std::str::from_utf8(k)
                .map_err(|_| EnvelopeError::KeyNotUtf8)?
                .to_owned(),
        )),
        None if unkeyed => Ok(None),
        None => Err(EnvelopeError::MissingKey),
        Some(_) => Err(malformed(
            HEADER_UNKEYED,
            "record has a key but is marked unkeyed".to_owned(),
        )),
    }
}

/// A record's `soma-*` and W3C trace headers, by name (the rest are the
/// envelope's attributes).
struct SomaHeaders<'a>(BTreeMap<&'a str, &'a str>);

impl<'a> SomaHeaders<'a> {
    /// Splits a record's headers into ours and the attributes; every value
    /// must be UTF-8.
    fn split(
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<(Self, BTreeMap<String, String>), EnvelopeError> {
        let mut soma = BTreeMap::new();
        let mut attributes = BTreeMap::new();
        for (name, value) in headers {
            let value = std::str::from_utf8(value.unwrap_or_default())
                .map_err(|_| malformed(name, "value is not UTF-8".to_owned()))?;
            if name.starts_with(SOMA_HEADER_PREFIX)
                || name == HEADER_TRACEPARENT
                || name == HEADER_TRACESTATE
            {
                soma.insert(name, value);
            } else {
                attributes.insert(name.to_owned(), value.to_owned());
            }
        }
        Ok((Self(soma), attributes))
    }

    fn required(&self, name: &'static str) -> Result<&'a str, EnvelopeError> {
        self.0
            .get(name)
            .copied()
            .ok_or(EnvelopeError::MissingHeader(name))
    }

    fn non_empty(&self, name: &'static str) -> Result<&'a str, EnvelopeError> {
        match self.required(name)? {
            "" => Err(malformed(name, "empty".to_owned())),
            v => Ok(v),
        }
    }

    fn owned(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|s| (*s).to_owned())
    }

    /// A decimal `u32` header, `None` when absent.
    fn number(&self, name: &str) -> Result<Option<u32>, EnvelopeError> {
        self.0
            .get(name)
            .map(|v| {
                v.parse()
                    .map_err(|e: std::num::ParseIntError| malformed(name, e.to_string()))
            })
            .transpose()
    }

    /// Headers carry microseconds; finer digits from a foreign producer are
    /// cut, so a decoded envelope re-encodes to itself (a relayed or
    /// replayed message keeps its time exactly).
    fn occurred_at(&self) -> Result<DateTime<Utc>, EnvelopeError> {
        Ok(
            DateTime::parse_from_rfc3339(self.required(HEADER_OCCURRED_AT)?)
                .map_err(|e| malformed(HEADER_OCCURRED_AT, e.to_string()))?
                .with_timezone(&Utc)
                .trunc_subsecs(6),
        )
    }

    fn unkeyed(&self) -> Result<bool, EnvelopeError> {
        match self.0.get(HEADER_UNKEYED) {
            Some(&"true") => Ok(true),
            Some(other) => Err(malformed(
                HEADER_UNKEYED,
                format!("expected `true`, got `{other}`"),
            )),
            None => Ok(false),
        }
    }

    fn trace(&self) -> Result<Option<TraceContext>, EnvelopeError> {
        self.0
            .get(HEADER_TRACEPARENT)
            .map(|tp| TraceContext::parse(tp, self.0.get(HEADER_TRACESTATE).copied()))
            .transpose()
    }
}

impl EnvelopeBuilder {
    /// Publishes without a key: no ordering relative to any other message.
    pub fn unkeyed(mut self) -> Self {
        self.env.key = None;
        self.keyed = false;
        self
    }

    /// Sets raw payload bytes.
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.env.payload = bytes.into();
        self
    }

    /// Serializes `value` as the JSON payload and sets the content type.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, EnvelopeError> {
        self.env.payload =
            serde_json::to_vec(value).map_err(|e| EnvelopeError::Payload(e.to_string()))?;
        self.env.content_type = Some(CONTENT_TYPE_JSON.to_owned());
        Ok(self)
    }

    /// Overrides the generated UUIDv7 id (e.g. to derive it from an idempotency key).
    pub fn id(mut self, id: Uuid) -> Self {
        self.env.id = id;
        self
    }

    /// Sets the payload schema version (default 1).
    pub fn schema_version(mut self, v: u32) -> Self {
        self.env.schema_version = v;
        self
    }

    /// Sets when the event occurred (default: now), to the microsecond (what
    /// the `soma-occurred-at` header carries).
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.env.occurred_at = at.trunc_subsecs(6);
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.env.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.env.causation_id = Some(id.into());
        self
    }

    /// Makes this message caused by `cause`: causation id = its id, and its
    /// correlation id (or its id) and trace are carried over.
    ///
    /// The trace: when the current span already belongs to the cause's trace
    /// (inside the handler's `soma.consume` span), the envelope is left
    /// without an explicit context and the publisher sends its `soma.publish`
    /// span's, a real descendant of the consume span. Otherwise the cause's
    /// context is copied as it is, so the message joins the cause's trace as
    /// a sibling of the cause's consumers.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.env.causation_id = Some(cause.id.to_string());
        self.env.correlation_id = Some(
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.id.to_string()),
        );
        if let Some(t) = &cause.trace {
            let in_trace = soma_observability::propagation::current_trace_id()
                .is_some_and(|id| id == t.trace_id());
            if !in_trace {
                self.env.trace = Some(t.clone());
            }
        }
        self
    }

    /// Sets the W3C trace context explicitly; the message is sent with exactly
    /// this context (the publisher otherwise injects its `soma.publish` span's).
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.env.trace = Some(trace);
        self
    }

    /// Adds an application header (name must not start with `soma-`).
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.attributes.insert(name.into(), value.into());
        self
    }

    /// Validates and returns the envelope.
    pub fn build(self) -> Result<Envelope, EnvelopeError> {
        let e = self.env;
        if e.message_type.is_empty() {
            return Err(EnvelopeError::InvalidField {
                field: "message_type",
                reason: "empty",
            });
        }
        if e.tenant.is_empty() {
            return Err(EnvelopeError::InvalidField {
                field: "tenant",
                reason: "empty",
            });
        }
        if self.keyed && e.key.as_deref().is_none_or(str::is_empty) {
            return Err(EnvelopeError::InvalidField {
                field: "key",
                reason: "empty; use `unkeyed()` to publish without ordering",
            });
        }
        if e.attributes.keys().any(|k| {
            k.starts_with(SOMA_HEADER_PREFIX) || k == HEADER_TRACEPARENT || k == HEADER_TRACESTATE
        }) {
            return Err(EnvelopeError::InvalidField {
                field: "attributes",
                reason: "names starting with `soma-` and trace headers are reserved",
            });
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a record of `key`, `payload` and the headers of `map`.
    fn decode(
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        map: &BTreeMap<String, String>,
    ) -> Result<Envelope, EnvelopeError> {
        Envelope::from_kafka(
            key,
            payload,
            map.iter().map(|(k, v)| (k.as_str(), Some(v.as_bytes()))),
        )
    }

    fn round_trip(e: &Envelope) -> Result<Envelope, EnvelopeError> {
        decode(e.kafka_key(), Some(&e.payload), &e.header_map())
    }

    #[test]
    fn headers_round_trip() {
        let e = Envelope::builder("chat.turn", "t1", "session-1")
            .json(&serde_json::json!({"a": 1}))
            .unwrap()
            .correlation_id("c")
            .causation_id("d")
            .attribute("x-app", "v")
            .trace(
                TraceContext::parse(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some("k=v"),
                )
                .unwrap(),
            )
            .build()
            .unwrap();
        let d = round_trip(&e).unwrap();
        assert_eq!(d, e, "an envelope decodes to itself, time included");
        assert_eq!(d.json::<serde_json::Value>().unwrap()["a"], 1);
    }

    /// Found by the `envelope` fuzz target: a foreign producer's
    /// nanosecond timestamp was kept on decode but cut to microseconds on
    /// encode, so a relayed or replayed message changed its time.
    #[test]
    fn a_finer_than_microsecond_time_is_cut_so_the_envelope_round_trips() {
        let e = Envelope::builder("t", "t1", "k").build().unwrap();
        let mut map = e.header_map();
        map.insert(
            HEADER_OCCURRED_AT.to_owned(),
            "2026-12-06T04:00:00.123645600Z".to_owned(),
        );
        let d = decode(e.kafka_key(), Some(&e.payload), &map).unwrap();
        assert_eq!(d.occurred_at.timestamp_subsec_nanos(), 123_645_000);
        assert_eq!(round_trip(&d).unwrap(), d);
    }

    #[test]
    fn unkeyed_is_explicit() {
        let e = Envelope::builder("t", "t1", "").build();
        assert!(matches!(
            e,
            Err(EnvelopeError::InvalidField { field: "key", .. })
        ));
        let e = Envelope::builder("t", "t1", "").unkeyed().build().unwrap();
        let d = round_trip(&e).unwrap();
        assert_eq!(d.key, None);
        // A keyless record without the unkeyed marker is rejected.
        let mut map = e.header_map();
        map.remove(HEADER_UNKEYED);
        let err = decode(None, None, &map).unwrap_err();
        assert_eq!(err, EnvelopeError::MissingKey);
        // A keyed record that says it is unkeyed is malformed, not rekeyed.
        let map = e.header_map();
        let err = decode(Some(b"k"), None, &map).unwrap_err();
        assert!(
            matches!(err, EnvelopeError::MalformedHeader { ref name, .. } if name == HEADER_UNKEYED),
            "{err:?}"
        );
    }

    #[test]
    fn strict_decoder_names_the_header() {
        let e = Envelope::builder("t", "t1", "k").build().unwrap();
        for name in [
            HEADER_ID,
            HEADER_TYPE,
            HEADER_TENANT,
            HEADER_OCCURRED_AT,
            HEADER_SCHEMA_VERSION,
        ] {
            let mut map = e.header_map();
            map.remove(name);
            let err = decode(Some(b"k"), None, &map).unwrap_err();
            assert_eq!(err, EnvelopeError::MissingHeader(name));
            assert!(err.is_header());
        }
        let mut map = e.header_map();
        map.insert(HEADER_SCHEMA_VERSION.into(), "v2".into());
        let err = decode(Some(b"k"), None, &map).unwrap_err();
        assert!(
            matches!(err, EnvelopeError::MalformedHeader { ref name, .. } if name == HEADER_SCHEMA_VERSION)
        );
        let mut map = e.header_map();
        map.insert(HEADER_TRACEPARENT.into(), "00-zz-00-01".into());
        let err = decode(Some(b"k"), None, &map).unwrap_err();
        assert!(
            matches!(err, EnvelopeError::MalformedHeader { ref name, .. } if name == HEADER_TRACEPARENT)
        );
    }

    #[test]
    fn reserved_attribute_names_rejected() {
        let e = Envelope::builder("t", "t1", "k")
            .attribute("soma-id", "x")
            .build();
        assert!(matches!(
            e,
            Err(EnvelopeError::InvalidField {
                field: "attributes",
                ..
            })
        ));
    }
}
