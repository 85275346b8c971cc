//! The soma-bus + soma-outbox conformance suite (issue #22): the scenarios
//! the best peers' own test suites put their brokers and clients through,
//! run against soma-bus, each bounded in time.
//!
//! Every scenario ends with the same verdict ([`harness::Ledger::verify`]):
//! each accepted envelope id is handled **exactly once** by an
//! inbox-deduplicating handler (the inbox row and the effect row commit in
//! one transaction), **in per-key order**, and **nothing un-accepted
//! appears**. The soma-bus README ("Conformance") maps each scenario to the
//! peer test it answers.
//!
//! Real services: the shared tansu broker and PostgreSQL, private tansu
//! brokers for scenarios that kill or slow a broker
//! (`soma_testkit::OwnBroker`), TCP proxies for network faults
//! (`soma_testkit::FaultProxy`), and librdkafka's mock cluster where tansu
//! cannot express a fault (it does not enforce idempotent-producer
//! sequence numbers, so sequence errors run on the mock).
//!
//! Stress mode: `cargo xtask chaos --stress [N]` runs N copies of this
//! suite and soma-outbox's at once, `*_stress` variants included;
//! `cargo nextest run -p soma-bus --test conformance --run-ignored only`
//! runs just the `*_stress` variants, which run scenarios several times in
//! parallel.

mod common;
mod harness;

mod batch_one;
mod both_down;
mod broker_kill;
mod churn;
mod consumer_crash;
mod consumer_faults;
mod idempotence_mock;
mod order_at_scale;
mod rebalance;
mod slow_broker;
