//! Kafka envelope, durable publisher with outbox fallback, and consumers with retry, DLQ and replay
