//! A private `redis-server` stalls (`CLIENT PAUSE`, as a blocked or
//! overloaded server would) while a lease is held: a stall shorter than the
//! TTL costs failed renewals but not the lease (they are retried sooner than
//! the renewal interval), and a stall past the TTL ends the lease at its
//! deadline, not when the stalled renewal finally returns.

mod common;

use std::time::{Duration, Instant};

use common::PrivateRedis;
use soma_redis::{Lease, LeaseOptions, RedisClient, RedisConfig};

/// A client of `server` whose commands time out after `timeout`.
async fn client(server: &PrivateRedis, timeout: Duration) -> RedisClient {
    let mut cfg = RedisConfig::default();
    cfg.url = server.url();
    cfg.key_prefix = format!("{}:", soma_testkit::unique_name("lease_stall"));
    cfg.command_timeout_ms = u64::try_from(timeout.as_millis()).unwrap();
    cfg.max_retries = 0;
    RedisClient::connect(cfg)
        .await
        .expect("connect to the private redis-server")
}

/// `CLIENT PAUSE` for `how_long` (every client but the pausing one waits).
async fn pause(server: &PrivateRedis, how_long: Duration) {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "CLIENT", "PAUSE"])
        .arg(how_long.as_millis().to_string())
        .output()
        .await
        .expect("run redis-cli (installed with redis-server)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK",
        "CLIENT PAUSE: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shorter_than_the_ttl_keeps_the_lease() {
    let server = PrivateRedis::start().await;
    let c = client(&server, Duration::from_millis(200)).await;
    let mut options = LeaseOptions::new(Duration::from_secs(4));
    options.renew_every = Duration::from_secs(1);
    let lease = Lease::new(&c, options).unwrap();
    let g = lease.try_acquire("acme", "stall").await.unwrap().unwrap();
    // Longer than the renewal interval, so at least one renewal times out;
    // the last successful one was at most 1 s before, its deadline at least
    // 3 s after the pause began.
    let paused = Instant::now();
    pause(&server, Duration::from_millis(1_500)).await;
    // Past every deadline a renewal made before the pause could give.
    tokio::time::sleep_until((paused + Duration::from_secs(5)).into()).await;
    assert!(
        g.is_held(),
        "a 1.5 s stall lost a 4 s lease: renewals after a failure must be retried before the deadline"
    );
    assert!(g.release().await.unwrap(), "still ours in Redis too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_past_the_ttl_ends_the_lease_at_its_deadline() {
    let server = PrivateRedis::start().await;
    // A renewal stuck in the stall returns only after 3 s (its timeout).
    let c = client(&server, Duration::from_secs(3)).await;
    let lease = Lease::new(&c, LeaseOptions::new(Duration::from_millis(600))).unwrap();
    let g = lease.try_acquire("acme", "stall").await.unwrap().unwrap();
    let paused = Instant::now();
    pause(&server, Duration::from_secs(4)).await;
    // The last renewal before the pause was sent at most 200 ms (ttl / 3)
    // before it: the lease is no longer certain 600 ms after that.
    tokio::time::timeout(Duration::from_millis(1_500), g.lost())
        .await
        .expect("lost() resolves at the deadline, not when the stalled renewal returns");
    assert!(!g.is_held());
    assert!(
        paused.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        paused.elapsed()
    );
}
