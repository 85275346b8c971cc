//! A PostgreSQL transactional outbox with an ordered, sharded relay, dead letters and an inbox
