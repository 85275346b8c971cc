//! A private `redis-server` is killed (SIGKILL) and restarted under load:
//! typed errors while it is down, automatic recovery, no panic, the rate
//! limiter never admits more than its limit across the restart (even though
//! the restarted server lost every key), pub/sub resubscribes, health goes
//! down and comes back.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{PrivateRedis, eventually};
use soma_observability::health::{ComponentStatus, HealthRegistry};
use soma_observability::metrics::MetricsRegistry;
use soma_redis::{
    Cache, CacheOptions, PubSub, PubSubEvent, RateLimit, RateLimiter, RedisClient, RedisConfig, Ttl,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_server_restart_under_load() {
    let mut server = PrivateRedis::start().await;
    let metrics = MetricsRegistry::default();
    let health = HealthRegistry::new();
    let mut cfg = RedisConfig::default();
    cfg.url = server.url();
    cfg.key_prefix = format!("{}:", soma_testkit::unique_name("restart"));
    cfg.pool_size = 2;
    cfg.connect_timeout_ms = 500;
    cfg.command_timeout_ms = 1_000;
    cfg.health_interval_ms = 100;
    cfg.health_timeout_ms = 500;
    cfg.reconnect.max_attempts = 0;
    cfg.reconnect.initial_ms = 20;
    cfg.reconnect.max_ms = 200;
    cfg.reconnect.base = 2;
    cfg.reconnect.jitter_ms = 20;
    let client = RedisClient::builder(cfg)
        .metrics(&metrics)
        .health(&health)
        .connect()
        .await
        .unwrap();
    let pubsub = PubSub::connect(&client).await.unwrap();
    let mut sub = pubsub.subscribe("acme", "flags").await.unwrap();

    const LIMIT: u32 = 50;
    let limiter =
        RateLimiter::new(&client, RateLimit::per(LIMIT, Duration::from_secs(3600))).unwrap();
    let cache: Cache<u64> =
        Cache::new(&client, "n", CacheOptions::new(Duration::from_secs(60))).unwrap();

    // Load: 4 workers hammer the limiter, the cache and plain commands.
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicUsize::new(0));
    let ok_calls = Arc::new(AtomicUsize::new(0));
    let conn_errors = Arc::new(AtomicUsize::new(0));
    let other_errors = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (stop, admitted, ok_calls, conn_errors, other_errors) = (
            stop.clone(),
            admitted.clone(),
            ok_calls.clone(),
            conn_errors.clone(),
            other_errors.clone(),
        );
        let (limiter, cache, client) = (limiter.clone(), cache.clone(), client.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = client
                    .keys()
                    .key("acme", "load", &format!("{w}-{}", i % 16))
                    .unwrap();
                let results = [
                    limiter.check("acme", "POST /v1/orders").await.map(|d| {
                        if d.allowed {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }),
                    client.set(&key, i, Ttl::secs(30)).await,
                    client.get::<u64>(&key).await.map(|_| ()),
                    cache.get("acme", &format!("{}", i % 8)).await.map(|_| ()),
                ];
                for r in results {
                    match r {
                        Ok(()) => {
                            ok_calls.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.is_connection() || e.is_timeout() => {
                            assert!(e.is_retryable());
                            conn_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => other_errors.lock().push(format!("{e:?}")),
                    }
                }
                // a cache read-through keeps answering while Redis is down
                let v = cache
                    .get_or_load("acme", "through", || async {
                        Ok::<_, std::io::Error>(Some(7))
                    })
                    .await;
                assert_eq!(v.unwrap(), Some(7));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }

    // Phase 1: healthy; let some requests through (but not the whole limit).
    assert!(
        eventually(Duration::from_secs(20), || {
            let a = admitted.clone();
            async move { a.load(Ordering::SeqCst) >= 20 }
        })
        .await
    );
    // Phase 2: crash the server under load.
    server.kill().await;
    let errors_at_kill = conn_errors.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || {
            let e = conn_errors.clone();
            async move { e.load(Ordering::Relaxed) > errors_at_kill + 50 }
        })
        .await,
        "no connection errors while down"
    );
    // While down: direct calls fail with a typed connection error (fail fast, no queueing).
    let e = client.get::<String>("soma:_:x:y").await.unwrap_err();
    assert!(e.is_connection() || e.is_timeout(), "{e:?}");
    assert!(
        eventually(Duration::from_secs(10), || {
            let h = health.clone();
            async move {
                h.component("redis")
                    .is_some_and(|r| r.status != ComponentStatus::Up)
            }
        })
        .await,
        "health never left up"
    );

    // Phase 3: restart (empty: no persistence) and recover without intervention.
    server.restart().await;
    assert!(
        eventually(Duration::from_secs(20), || {
            let c = client.clone();
            async move { c.ping().await.is_ok() }
        })
        .await,
        "client did not recover"
    );
    // keep the load running after recovery until the limiter has seen many rejections
    let ok_at_recovery = ok_calls.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(20), || {
            let ok = ok_calls.clone();
            async move { ok.load(Ordering::Relaxed) > ok_at_recovery + 200 }
        })
        .await
    );
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker panicked");
    }

    let total = admitted.load(Ordering::SeqCst);
    assert_eq!(
        total, LIMIT as usize,
        "admitted {total} across the restart, limit {LIMIT}"
    );
    assert!(
        other_errors.lock().is_empty(),
        "untyped errors: {:?}",
        other_errors.lock()
    );

    // pub/sub: the subscription is re-established and says so
    let resubscribed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match sub.recv().await {
                Some(PubSubEvent::Resubscribed) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(resubscribed, "no Resubscribed event");
    assert!(
        eventually(Duration::from_secs(10), || {
            let ps = &pubsub;
            async move {
                ps.publish("acme", "flags", "after-restart")
                    .await
                    .unwrap_or(0)
                    == 1
            }
        })
        .await
    );
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(PubSubEvent::Message(m)) = sub.recv().await {
                return m;
            }
        }
    })
    .await
    .expect("message after restart");
    assert_eq!(got, "after-restart");

    assert!(
        eventually(Duration::from_secs(10), || {
            let h = health.clone();
            async move {
                h.component("redis")
                    .is_some_and(|r| r.status == ComponentStatus::Up)
            }
        })
        .await,
        "health did not recover"
    );
    let text = metrics.encode();
    assert!(text.contains("soma_redis_reconnects_total"), "{text}");
    assert!(text.contains(r#"outcome="connection""#), "{text}");
}

/// Health follows connection events at once, not only every
/// `health_interval_ms` (set to 10 minutes here, so only the connection
/// events can move the component after its first check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_connection_events_without_waiting_for_the_interval() {
    let mut server = PrivateRedis::start().await;
    let health = HealthRegistry::new();
    let mut cfg = RedisConfig::default();
    cfg.url = server.url();
    cfg.key_prefix = format!("{}:", soma_testkit::unique_name("health_events"));
    cfg.pool_size = 2;
    cfg.connect_timeout_ms = 500;
    cfg.health_interval_ms = 600_000;
    cfg.reconnect.initial_ms = 50;
    cfg.reconnect.max_ms = 200;
    let client = RedisClient::builder(cfg)
        .health(&health)
        .connect_lazy()
        .await
        .expect("client");
    let status = |h: &HealthRegistry| h.component("redis").map(|c| c.status);
    assert!(
        eventually(Duration::from_secs(5), || {
            let h = health.clone();
            async move { status(&h) == Some(ComponentStatus::Up) }
        })
        .await,
        "redis not up after the first connection: {:?}",
        health.component("redis")
    );

    server.kill().await;
    assert!(
        eventually(Duration::from_secs(5), || {
            let h = health.clone();
            async move { status(&h) == Some(ComponentStatus::Down) }
        })
        .await,
        "redis not down after the server died: {:?}",
        health.component("redis")
    );

    server.restart().await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let h = health.clone();
            async move { status(&h) == Some(ComponentStatus::Up) }
        })
        .await,
        "redis not up again after the restart: {:?}",
        health.component("redis")
    );
    let _ = client.quit().await;
}
