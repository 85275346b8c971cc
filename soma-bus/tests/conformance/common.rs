//! The helpers the scenarios share with soma-bus's other integration tests:
//! the crate's `testkit` and soma-testkit's private brokers, fault proxy and
//! Kafka readers.

pub(crate) use soma_bus::testkit::{config, outbox};
pub(crate) use soma_testkit::kafka::{header, read_all};
pub(crate) use soma_testkit::{FaultProxy, OwnBroker, require_postgres, wait_for};
