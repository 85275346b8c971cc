//! Shared helpers for soma-bus integration tests (real tansu, real Postgres):
//! the crate's `testkit` (test config, envelopes, fresh topics and outboxes),
//! soma-testkit's private brokers, fault proxy and Kafka readers, and what
//! the tests alone use.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::HashMap;

use soma_bus::{BusProducer, KafkaSink};
use soma_outbox::{Outbox, Relay, RelayConfig, RelayHandle};

pub use soma_bus::testkit::{config, envelope, new_topic, outbox, outbox_with, topic};
pub use soma_testkit::kafka::{BOUNDED_FETCH_BYTES, header, read_all, read_partitionwise};
pub use soma_testkit::{FaultProxy, OwnBroker, require_postgres, wait_for};

/// Counts occurrences of each value.
pub fn counts<T: std::hash::Hash + Eq + Clone>(
    items: impl IntoIterator<Item = T>,
) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// A relay from `ob` to Kafka through `producer`, polling every 100 ms
/// (the tests' pace; the rest of its settings are the defaults).
pub fn spawn_relay(ob: &Outbox, producer: BusProducer) -> RelayHandle {
    let mut config = RelayConfig::default();
    config.poll_interval_ms = 100;
    Relay::new(ob.clone(), KafkaSink::new(producer), config).spawn()
}
