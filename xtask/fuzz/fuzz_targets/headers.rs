//! The gateway's request headers from outside: `Last-Event-ID` (resume
//! point of an SSE stream) and `Idempotency-Key` (and the message id it
//! derives). Never panics; an accepted event id fits PostgreSQL's BIGINT;
//! an accepted key derives the same id twice, and another subject's same
//! key a different one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soma_example_platform::gateway;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("last-event-id", value.clone());
    headers.insert(gateway::IDEMPOTENCY_KEY, value);
    if let Ok(Some(id)) = gateway::last_event_id(&headers) {
        assert!(id <= i64::MAX as u64);
    }
    if let Ok(Some(key)) = gateway::idempotency_key(&headers) {
        let a = gateway::message_id_for("acme", "alice", key);
        assert_eq!(a, gateway::message_id_for("acme", "alice", key));
        assert_ne!(a, gateway::message_id_for("acme", "bob", key));
    }
});
