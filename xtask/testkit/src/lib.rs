//! Dev-only helpers shared by the Soma SDK's integration tests.
//!
//! Integration tests talk to real services: PostgreSQL, Redis and a
//! Kafka-protocol broker (tansu). This crate tells a test where they are and
//! gives every test unique names so tests run in parallel and re-run cleanly
//! on a dirty machine.
//!
//! A test whose service is unreachable must fail, naming the service and how
//! to start it; [`require_postgres`], [`require_redis`] and [`require_kafka`]
//! do exactly that. The addresses default to the loopback ports the test
//! command (`cargo xtask test`) starts, and may be overridden with
//! `SOMA_TEST_POSTGRES_URL`, `SOMA_TEST_REDIS_URL` and
//! `SOMA_TEST_KAFKA_BOOTSTRAP` (loopback only).
//!
//! Helpers behind features, so a crate's tests pull in only what they use:
//!
//! | feature | items |
//! |---|---|
//! | `tokio` | `wait_for`, `wait_until`, `eventually`: poll a condition |
//! | `axum` | `serve`, `serve_url`: a router on a free loopback port |
//! | `problem` | `assert_problem`: an `application/problem+json` answer |
//! | `reqwest` | `expect_problem`: the same for a `reqwest::Response` |
//! | `otlp` | `otlp`: an in-process OTLP trace receiver |
//! | `opa` | `OpaServer`: OPA's real evaluator behind a minimal Data API |
//! | `tansu` | `OwnBroker`: a private tansu broker, killed and restarted at will |
//! | `fault-proxy` | `FaultProxy`: a TCP forwarder that cuts or slows the link |
//! | `kafka` | `kafka`: read a topic back with a plain rdkafka consumer |
//!
//! Without a feature: service discovery ([`require_postgres`], …), unique
//! names ([`unique_name`]), free ports ([`free_port`]), a log sink to read
//! back ([`LogCapture`]) and the benchmarks' [`median`].

#[cfg(feature = "kafka")]
pub mod kafka;
mod log_capture;
#[cfg(feature = "opa")]
mod opa;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "tokio")]
mod poll;
#[cfg(feature = "problem")]
mod problem;
#[cfg(feature = "fault-proxy")]
mod proxy;
#[cfg(feature = "axum")]
mod serve;
#[cfg(feature = "tansu")]
mod tansu;

pub use log_capture::LogCapture;
#[cfg(feature = "opa")]
pub use opa::OpaServer;
#[cfg(feature = "tokio")]
pub use poll::{eventually, wait_for, wait_until};
#[cfg(feature = "reqwest")]
pub use problem::expect_problem;
#[cfg(feature = "problem")]
pub use problem::{PROBLEM_CONTENT_TYPE, assert_problem, assert_problem_parts};
#[cfg(feature = "fault-proxy")]
pub use proxy::FaultProxy;
#[cfg(feature = "axum")]
pub use serve::{serve, serve_url};
#[cfg(feature = "tansu")]
pub use tansu::OwnBroker;

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a developer starts the local services the tests need.
pub const HOW_TO_START: &str = "start the local stack with `cargo xtask stack up` (the test command `cargo xtask test` does this itself)";

#[allow(clippy::disallowed_methods)] // testkit is on the lint-env allowlist
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// PostgreSQL connection URL for tests (database `test`, trust auth).
pub fn postgres_url() -> String {
    env_or(
        "SOMA_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    env_or("SOMA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

/// Kafka bootstrap servers for tests (tansu).
pub fn kafka_bootstrap() -> String {
    env_or("SOMA_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
}

/// Host and port from a URL such as `postgres://u@127.0.0.1:5432/db` or a
/// bare `host:port`.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?', ',']).next().unwrap_or(rest);
    if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    }
}

/// Panics with a clear message unless `addr` accepts TCP connections.
///
/// `service` names the service in the message, e.g. `"PostgreSQL"`.
pub fn require_tcp(service: &str, addr: &str) {
    let resolved: Vec<_> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => panic!("{service} address {addr:?} does not resolve: {e}; {HOW_TO_START}"),
    };
    let ok = resolved
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok());
    assert!(ok, "{service} is not reachable at {addr}; {HOW_TO_START}");
}

/// Returns the PostgreSQL URL after checking the server is reachable.
pub fn require_postgres() -> String {
    let url = postgres_url();
    require_tcp("PostgreSQL", &host_port(&url, 5432));
    url
}

/// Returns the Redis URL after checking the server is reachable.
pub fn require_redis() -> String {
    let url = redis_url();
    require_tcp("Redis", &host_port(&url, 6379));
    url
}

/// Returns the Kafka bootstrap list after checking the broker is reachable.
pub fn require_kafka() -> String {
    let servers = kafka_bootstrap();
    let first = servers.split(',').next().unwrap_or(&servers).to_owned();
    require_tcp("Kafka-protocol broker (tansu)", &host_port(&first, 9092));
    servers
}

/// A name unique to this process and call: `<prefix>_<pid>_<n>_<random>`,
/// lowercase ASCII, digits and `_`, valid as a Postgres schema, Kafka topic
/// or Redis key prefix.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{clean}_{}_{n}_{r:08x}", std::process::id())
}

/// A free loopback TCP port (bound then released; racy but adequate for tests
/// that start their own helper servers).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// The median of `v` (the upper one of an even count; NaN when empty), for
/// benchmarks that summarise paired rounds.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_urls() {
        assert_eq!(
            host_port("postgres://u@127.0.0.1:5432/test", 1),
            "127.0.0.1:5432"
        );
        assert_eq!(host_port("redis://127.0.0.1", 6379), "127.0.0.1:6379");
        assert_eq!(host_port("127.0.0.1:9092", 1), "127.0.0.1:9092");
    }

    #[test]
    fn unique_names_differ_and_are_identifier_safe() {
        let a = unique_name("My-Test");
        let b = unique_name("My-Test");
        assert_ne!(a, b);
        assert!(a.starts_with("my_test_"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    #[test]
    fn median_takes_the_middle_of_the_sorted_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    #[should_panic(expected = "is not reachable")]
    fn unreachable_service_fails_loudly() {
        require_tcp("Nothing", &format!("127.0.0.1:{}", free_port()));
    }
}
