//! Behaviour of the client and each helper against the real Redis on 127.0.0.1:6379.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{client, config, eventually};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use soma_observability::health::{ComponentStatus, HealthRegistry};
use soma_observability::metrics::MetricsRegistry;
use soma_redis::rate_limit::{FailMode, RateLimitKey, RateLimitLayer};
use soma_redis::{
    Cache, CacheOptions, Claim, IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER, Idempotency,
    IdempotencyKey, IdempotencyLayer, IdempotencyOptions, IdempotencyScope, Lease, LeaseOptions,
    Lookup, PubSub, PubSubEvent, RateLimit, RateLimiter, RedisClient, RedisConfig, Ttl,
};
use soma_testkit::assert_problem;
use tokio::io::{AsyncBufReadExt, BufReader};
use tower::{Layer, ServiceBuilder, ServiceExt};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    age: u32,
}

#[tokio::test]
async fn client_commands_set_ttl_and_report_metrics() {
    let metrics = MetricsRegistry::default();
    let health = HealthRegistry::new();
    let mut cfg = config();
    cfg.health_interval_ms = 100;
    let c = RedisClient::builder(cfg)
        .metrics(&metrics)
        .health(&health)
        .connect()
        .await
        .unwrap();
    let key = c.keys().key("acme", "demo", "k1").unwrap();
    c.set(&key, "v1", Ttl::secs(30)).await.unwrap();
    assert_eq!(c.get::<String>(&key).await.unwrap().as_deref(), Some("v1"));
    let ttl = c.pttl(&key).await.unwrap().unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "ttl {ttl}");
    assert!(!c.set_nx(&key, "v2", Ttl::secs(30)).await.unwrap());
    assert_eq!(c.del(&[&key]).await.unwrap(), 1);
    assert_eq!(c.get::<String>(&key).await.unwrap(), None);
    assert_eq!(c.pttl(&key).await.unwrap(), None);

    let zero = c
        .set(&key, "v", Ttl::After(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(zero.is_invalid());

    let text = metrics.encode();
    assert!(text.contains("soma_redis_commands_total"), "{text}");
    assert!(text.contains(r#"command="get",outcome="ok""#), "{text}");
    assert!(
        text.contains("soma_redis_command_duration_seconds_bucket"),
        "{text}"
    );
    let up = eventually(Duration::from_secs(10), || {
        let h = health.clone();
        async move {
            h.component("redis")
                .is_some_and(|r| r.status == ComponentStatus::Up)
        }
    })
    .await;
    assert!(
        up,
        "health component redis never up: {:?}",
        health.component("redis")
    );
    // pool gauge is published by the monitor task
    let gauged = eventually(Duration::from_secs(5), || {
        let m = metrics.clone();
        async move {
            m.encode().lines().any(|l| {
                l.starts_with("soma_redis_pool_connections{")
                    && l.ends_with(r#"state="connected"} 4"#)
            })
        }
    })
    .await;
    assert!(gauged, "{}", metrics.encode());
}

#[tokio::test]
async fn unreachable_server_fails_fast_with_connection_errors() {
    let port = soma_testkit::free_port();
    let mut cfg = RedisConfig::default();
    cfg.url = format!("redis://127.0.0.1:{port}");
    cfg.connect_timeout_ms = 300;
    // Eager connect reports the problem at startup.
    let err = RedisClient::connect(cfg.clone()).await.unwrap_err();
    assert!(err.is_connection() || err.is_timeout(), "{err:?}");
    // Lazy connect starts, and every command fails with a connection error.
    let c = RedisClient::builder(cfg).connect_lazy().await.unwrap();
    for _ in 0..100 {
        let e = c.get::<String>("soma:_:x:y").await.unwrap_err();
        assert!(e.is_connection() && e.is_retryable(), "{e:?}");
    }
    assert!(!c.is_connected());
}

#[tokio::test]
async fn wait_connected_waits_for_a_lazy_client_and_names_an_unreachable_server() {
    // Reachable: a lazy client is usable once `wait_connected` returns.
    let up = RedisClient::builder(config()).connect_lazy().await.unwrap();
    up.wait_connected(Duration::from_secs(5)).await.unwrap();
    assert!(up.is_connected());
    let key = up.keys().key("acme", "wait", "x").unwrap();
    up.set(&key, "v", Ttl::secs(5)).await.unwrap();

    // Unreachable: a connection error after the wait, naming the server
    // without its password.
    let port = soma_testkit::free_port();
    let mut cfg = RedisConfig::default();
    cfg.url = format!("redis://:hunter2@127.0.0.1:{port}");
    let down = RedisClient::builder(cfg).connect_lazy().await.unwrap();
    let started = std::time::Instant::now();
    let err = down
        .wait_connected(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "returned early"
    );
    assert!(err.is_connection(), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}

#[tokio::test]
async fn cache_roundtrip_ttl_tenants_and_negative_caching() {
    let c = client().await;
    let cache: Cache<Profile> = Cache::new(
        &c,
        "profile",
        CacheOptions::new(Duration::from_secs(60)).with_negative_ttl(Duration::from_secs(5)),
    )
    .unwrap();
    let ada = Profile {
        name: "Ada".into(),
        age: 36,
    };
    cache.set("acme", "u1", &ada).await.unwrap();
    assert_eq!(
        cache.get("acme", "u1").await.unwrap(),
        Lookup::Hit(ada.clone())
    );
    // another tenant does not see it
    assert_eq!(cache.get("globex", "u1").await.unwrap(), Lookup::Miss);
    let key = cache.key("acme", "u1").unwrap();
    assert!(key.ends_with("soma:acme:cache.profile:u1"), "{key}");
    let ttl = c.pttl(&key).await.unwrap().unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "ttl {ttl}");

    // negative caching: the loader runs once, "absent" is remembered with its own TTL
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let v = cache
            .get_or_load("acme", "missing", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(None)
            })
            .await
            .unwrap();
        assert_eq!(v, None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get("acme", "missing").await.unwrap(), Lookup::Absent);
    let nttl = c
        .pttl(&cache.key("acme", "missing").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(nttl > 0 && nttl <= 5_000, "negative ttl {nttl}");

    assert!(cache.invalidate("acme", "u1").await.unwrap());
    assert_eq!(cache.get("acme", "u1").await.unwrap(), Lookup::Miss);
    assert!(
        !cache.invalidate("acme", "u1").await.unwrap(),
        "nothing left to invalidate"
    );

    // a value that no longer decodes is a typed decode error
    c.set(&key, "{not json", Ttl::secs(5)).await.unwrap();
    assert!(matches!(
        cache.get("acme", "u1").await,
        Err(soma_redis::RedisError::Decode(_))
    ));
    // bad tenant
    assert!(cache.get("ac:me", "u1").await.unwrap_err().is_invalid());
}

#[tokio::test]
async fn concurrent_get_or_load_runs_the_loader_once() {
    let c = client().await;
    let cache: Cache<Profile> =
        Cache::new(&c, "sf", CacheOptions::new(Duration::from_secs(60))).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let cache = cache.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("acme", "hot", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, Infallible>(Some(Profile {
                        name: "Hot".into(),
                        age: 1,
                    }))
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().name, "Hot");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "loader ran more than once");
    assert!(matches!(
        cache.get("acme", "hot").await.unwrap(),
        Lookup::Hit(_)
    ));

    // a failing loader: waiters share the error, nothing is cached
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cache = cache.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("acme", "broken", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err::<Option<Profile>, _>(std::io::Error::other("db down"))
                })
                .await
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            Err(e) => assert_eq!(
                e.loader_error().map(ToString::to_string).as_deref(),
                Some("db down"),
                "{e:?}"
            ),
            other => panic!("expected loader error, got {other:?}"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A bad tenant is not the loader's failure.
    let invalid = cache
        .get_or_load("ac:me", "x", || async { Ok::<_, std::io::Error>(None) })
        .await
        .unwrap_err();
    assert!(invalid.loader_error().is_none(), "{invalid:?}");
    // What an operator reads when the cache is printed: its name and options.
    let printed = format!("{cache:?}");
    assert!(
        printed.starts_with("Cache") && printed.contains("\"sf\"") && printed.contains("ttl"),
        "{printed}"
    );
    assert_eq!(cache.get("acme", "broken").await.unwrap(), Lookup::Miss);
}

#[tokio::test]
async fn cancelling_every_waiter_releases_the_single_flight_slot() {
    let c = client().await;
    let cache: Cache<Profile> =
        Cache::new(&c, "cancel", CacheOptions::new(Duration::from_secs(60))).unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (cache, started) = (cache.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("acme", "stuck", || async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    // A source that never answers: every caller gives up.
                    std::future::pending::<Result<Option<Profile>, Infallible>>().await
                })
                .await
        }));
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            started.load(Ordering::SeqCst) == 1
        })
        .await,
        "one loader started"
    );
    // Let the other seven reach the slot and wait on it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cache.loads_in_flight(), 1);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        assert!(t.await.unwrap_err().is_cancelled());
    }
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "every waiter was cancelled: the slot must be released"
    );

    // A new caller does not hang on the abandoned load: it loads again.
    let v = tokio::time::timeout(
        Duration::from_secs(5),
        cache.get_or_load("acme", "stuck", || async {
            Ok::<_, Infallible>(Some(Profile {
                name: "Back".into(),
                age: 2,
            }))
        }),
    )
    .await
    .expect("a new caller after cancellation must not hang")
    .unwrap();
    assert_eq!(v.map(|p| p.name).as_deref(), Some("Back"));
    assert_eq!(cache.loads_in_flight(), 0);
}

#[tokio::test]
async fn rate_limiter_admits_the_limit_then_rejects_with_retry_after() {
    let c = client().await;
    let rl = RateLimiter::new(&c, RateLimit::per(5, Duration::from_secs(60))).unwrap();
    for i in 0..5u32 {
        let d = rl.check("acme", "POST /v1/orders").await.unwrap();
        assert!(d.allowed, "request {i} rejected: {d:?}");
        assert_eq!(d.remaining, 4 - i);
        assert_eq!(d.retry_after, None);
    }
    let d = rl.check("acme", "POST /v1/orders").await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    let retry = d.retry_after.unwrap();
    assert!(
        retry > Duration::from_secs(5) && retry <= Duration::from_secs(12),
        "{retry:?}"
    );
    assert!(d.reset_after > Duration::from_secs(50) && d.reset_after <= Duration::from_secs(60));
    // other tenants and routes have their own buckets
    assert!(rl.check("globex", "POST /v1/orders").await.unwrap().allowed);
    assert!(rl.check("acme", "GET /v1/orders").await.unwrap().allowed);
    // the bucket key carries a TTL
    let key = c.keys().key("acme", "rl", "POST /v1/orders").unwrap();
    let ttl = c.pttl(&key).await.unwrap().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    assert_eq!(
        format!("{rl:?}"),
        format!("RateLimiter {{ limit: {:?} }}", rl.limit())
    );

    // A cost is 1 ..= the limit: a request may take the whole bucket, never more.
    let per3 = RateLimit::per(3, Duration::from_secs(60));
    for bad in [0, 4] {
        let err = rl.check_with("acme", "cost", per3, bad).await.unwrap_err();
        assert!(err.is_invalid(), "cost {bad}: {err:?}");
    }
    let whole = rl.check_with("acme", "cost", per3, 3).await.unwrap();
    assert!(whole.allowed && whole.remaining == 0, "{whole:?}");

    // the bucket refills: 10 per 200 ms → one every 20 ms
    let fast = RateLimiter::new(&c, RateLimit::per(10, Duration::from_millis(200))).unwrap();
    for _ in 0..10 {
        assert!(fast.check("acme", "fast").await.unwrap().allowed);
    }
    let refilled = eventually(Duration::from_secs(5), || {
        let fast = fast.clone();
        async move { fast.check("acme", "fast").await.unwrap().allowed }
    })
    .await;
    assert!(refilled);
}

/// The limiter's memory of bucket states (what it sends when Redis forgot a
/// key) is pruned once it holds 10,000 keys: of stale states only, never of
/// a bucket that is still draining.
#[tokio::test]
async fn pruning_the_remembered_states_keeps_every_bucket_still_draining() {
    use futures_util::StreamExt;
    let c = client().await;
    let rl = RateLimiter::new(&c, RateLimit::per(2, Duration::from_secs(60))).unwrap();
    for _ in 0..2 {
        assert!(rl.check("acme", "busy").await.unwrap().allowed);
    }
    assert!(!rl.check("acme", "busy").await.unwrap().allowed);
    // 10,000 other keys: the memory reaches its pruning size.
    futures_util::stream::iter(0..10_000)
        .for_each_concurrent(64, |i| {
            let rl = rl.clone();
            async move {
                rl.check("acme", &format!("other-{i}")).await.unwrap();
            }
        })
        .await;
    // Redis forgets the busy key (a restart without persistence).
    let key = c.keys().key("acme", "rl", "busy").unwrap();
    assert_eq!(c.del(&[&key]).await.unwrap(), 1);
    let d = rl.check("acme", "busy").await.unwrap();
    assert!(!d.allowed, "the remembered state still limits it: {d:?}");
}

/// A rate-limit check is one round trip: MONITOR sees exactly one command
/// from our client per check (the script's inner GET/SET/TIME are marked `lua`).
#[tokio::test]
async fn rate_limit_check_is_one_round_trip() {
    let c = client().await;
    let rl = RateLimiter::new(&c, RateLimit::per(1000, Duration::from_secs(60))).unwrap();
    rl.check("acme", "warmup").await.unwrap(); // loads the script
    let prefix = c.keys().prefix().to_owned();

    let mut monitor = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "monitor"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli");
    let mut lines = BufReader::new(monitor.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.trim(), "OK");

    const N: usize = 20;
    for _ in 0..N {
        rl.check("acme", "POST /v1/x").await.unwrap();
    }
    let marker = c.keys().key("acme", "marker", "end").unwrap();
    let _ = c.get::<String>(&marker).await.unwrap();

    let mut from_client = 0;
    let mut inner = 0;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("monitor output")
            .unwrap()
            .expect("monitor line");
        if !line.contains(&prefix) {
            continue;
        }
        if line.contains(&marker) {
            break;
        }
        if line.contains(" lua]") {
            inner += 1;
        } else {
            assert!(
                line.to_ascii_lowercase().contains("\"evalsha\""),
                "unexpected command: {line}"
            );
            from_client += 1;
        }
    }
    assert_eq!(from_client, N, "round trips per check");
    assert!(inner >= N, "the script ran inside redis");
}

#[tokio::test]
async fn rate_limit_layer_sets_headers_and_rejects() {
    let c = client().await;
    let rl = RateLimiter::new(&c, RateLimit::per(2, Duration::from_secs(60))).unwrap();
    let layer = RateLimitLayer::new(rl, |req: &http::Request<Bytes>| {
        let tenant = req.headers().get("x-tenant")?.to_str().ok()?.to_owned();
        Some(RateLimitKey {
            tenant,
            route: format!("{} /v1/items", req.method()),
        })
    });
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|req: http::Request<Bytes>| async move {
                assert!(
                    req.extensions()
                        .get::<soma_redis::RateLimitDecision>()
                        .is_some()
                );
                Ok::<_, Infallible>(http::Response::new(Bytes::from_static(b"ok")))
            });
    let req = || {
        http::Request::builder()
            .uri("/v1/items")
            .header("x-tenant", "acme")
            .body(Bytes::new())
            .unwrap()
    };
    for remaining in ["1", "0"] {
        let res = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-limit"], "2");
        assert_eq!(res.headers()["x-ratelimit-remaining"], remaining);
        assert!(res.headers().contains_key("x-ratelimit-reset"));
        assert_eq!(res.body(), "ok");
    }
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=31).contains(&retry), "{retry}");
    assert_problem(&res, 429, "rate_limited");

    // no key → not limited
    let svc2 = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            RateLimiter::new(&c, RateLimit::per(1, Duration::from_secs(60))).unwrap(),
            |_: &http::Request<Bytes>| None,
        ))
        .service_fn(|_req: http::Request<Bytes>| async {
            Ok::<_, Infallible>(http::Response::new(Bytes::new()))
        });
    for _ in 0..3 {
        assert_eq!(svc2.clone().oneshot(req()).await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn rate_limit_layer_answers_400_for_a_tenant_it_cannot_key_and_passes_readiness_on() {
    let c = client().await;
    let rl = RateLimiter::new(&c, RateLimit::per(2, Duration::from_secs(60))).unwrap();
    // A tenant with `:` cannot be part of a key: the client's fault (400),
    // not the limiter's (503, fail closed).
    let layer = RateLimitLayer::new(rl, |_: &http::Request<Bytes>| {
        Some(RateLimitKey {
            tenant: "ac:me".into(),
            route: "GET /".into(),
        })
    });
    let printed = format!("{layer:?}");
    assert!(
        printed.starts_with("RateLimitLayer")
            && printed.contains("RateLimiter")
            && printed.contains("Closed"),
        "{printed}"
    );
    let svc =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_req: http::Request<Bytes>| async {
                Ok::<_, Infallible>(http::Response::new(Bytes::new()))
            });
    assert!(
        format!("{svc:?}").starts_with("RateLimitService"),
        "{svc:?}"
    );
    let mut ready = svc.clone();
    let future = tower::Service::call(
        tower::ServiceExt::ready(&mut ready).await.unwrap(),
        http::Request::new(Bytes::new()),
    );
    assert_eq!(format!("{future:?}"), "ResponseFuture { .. }");
    let res = future.await.unwrap();
    assert_problem(&res, 400, "invalid_rate_limit_key");

    // The inner service's readiness is the layer's: an inner service that
    // cannot take requests is not hidden behind a ready limiter.
    let mut refusing = tower::Layer::layer(&layer, Refusing);
    let err = tower::ServiceExt::ready(&mut refusing).await.unwrap_err();
    assert_eq!(err, "inner service overloaded");
}

/// A service that is never ready (its `poll_ready` fails).
#[derive(Clone)]
struct Refusing;

impl tower::Service<http::Request<Bytes>> for Refusing {
    type Response = http::Response<Bytes>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<http::Response<Bytes>, &'static str>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Err("inner service overloaded"))
    }

    fn call(&mut self, _: http::Request<Bytes>) -> Self::Future {
        std::future::ready(Err("called without being ready"))
    }
}

#[tokio::test]
async fn rate_limit_layer_failure_modes_when_redis_is_down() {
    let port = soma_testkit::free_port();
    let mut cfg = RedisConfig::default();
    cfg.url = format!("redis://127.0.0.1:{port}");
    let down = RedisClient::builder(cfg).connect_lazy().await.unwrap();
    let rl = RateLimiter::new(&down, RateLimit::per(2, Duration::from_secs(60))).unwrap();
    let err = rl.check("acme", "x").await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    let key = |_: &http::Request<Bytes>| {
        Some(RateLimitKey {
            tenant: "acme".into(),
            route: "GET /".into(),
        })
    };
    let ok = |_req: http::Request<Bytes>| async {
        Ok::<_, Infallible>(http::Response::new(Bytes::new()))
    };
    let closed = ServiceBuilder::new()
        .layer(RateLimitLayer::new(rl.clone(), key))
        .service_fn(ok);
    let res = closed
        .oneshot(http::Request::new(Bytes::new()))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_problem(&res, 503, "rate_limiter_unavailable");
    let open = ServiceBuilder::new()
        .layer(RateLimitLayer::new(rl, key).failure_mode(FailMode::Open))
        .service_fn(ok);
    assert_eq!(
        open.oneshot(http::Request::new(Bytes::new()))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn idempotency_claims_stores_and_replays() {
    let c = client().await;
    let idem = Idempotency::new(&c, IdempotencyOptions::default()).unwrap();
    let Claim::Acquired(guard) = idem.claim::<String>("acme", "req-1", "fp-a").await.unwrap()
    else {
        panic!("first claim must be acquired");
    };
    // The guard names the claim's Redis key: the tenant's, with a lifetime.
    assert!(
        guard.key().contains("acme") && guard.key().ends_with("req-1"),
        "{}",
        guard.key()
    );
    let claim_ttl = c.pttl(guard.key()).await.unwrap();
    assert!(claim_ttl.is_some_and(|ms| ms > 0), "{claim_ttl:?}");
    // concurrent retry while in progress
    match idem.claim::<String>("acme", "req-1", "fp-a").await.unwrap() {
        Claim::InProgress { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(30))
        }
        other => panic!("expected in progress, got {other:?}"),
    }
    assert!(matches!(
        idem.claim::<String>("acme", "req-1", "fp-b").await.unwrap(),
        Claim::Mismatch
    ));
    guard
        .complete(&"201 created order 7".to_owned())
        .await
        .unwrap();
    for _ in 0..3 {
        match idem.claim::<String>("acme", "req-1", "fp-a").await.unwrap() {
            Claim::Completed(r) => assert_eq!(r, "201 created order 7"),
            other => panic!("expected completed, got {other:?}"),
        }
    }
    let key = c.keys().key("acme", "idem", "req-1").unwrap();
    let ttl = c.pttl(&key).await.unwrap().unwrap();
    assert!(ttl > 86_000_000 && ttl <= 86_400_000, "{ttl}");
    // same key, other tenant: independent
    assert!(matches!(
        idem.claim::<String>("globex", "req-1", "fp-a")
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));

    // release lets a retry run
    let Claim::Acquired(g) = idem.claim::<String>("acme", "req-2", "fp").await.unwrap() else {
        panic!()
    };
    assert!(g.release().await.unwrap());
    assert!(matches!(
        idem.claim::<String>("acme", "req-2", "fp").await.unwrap(),
        Claim::Acquired(_)
    ));
}

/// A service behind [`IdempotencyLayer`] that counts its calls, waits
/// `delay`, and answers `status` with the call number.
fn counted_service(
    calls: Arc<AtomicUsize>,
    delay: Duration,
    status: u16,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut res = http::Response::new(Full::new(Bytes::from(format!(
                r#"{{"call":{n},"echo":{}}}"#,
                String::from_utf8_lossy(&body)
            ))));
            *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok::<_, Infallible>(res)
        }
    })
}

fn keyed(subject: &str, key: Option<&str>, body: &str) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/v1/orders")
        .header("x-tenant", "acme")
        .header("x-user", subject);
    if let Some(k) = key {
        req = req.header(IDEMPOTENCY_KEY_HEADER, k);
    }
    req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// Calls `svc` once and reads the whole answer.
async fn call<S>(svc: &S, req: http::Request<Full<Bytes>>) -> http::Response<Bytes>
where
    S: tower::Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = Infallible,
        > + Clone,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

fn idempotency_layer(idem: Idempotency) -> IdempotencyLayer<Full<Bytes>> {
    IdempotencyLayer::new(idem, |req: &http::Request<Full<Bytes>>| {
        Some(IdempotencyScope {
            tenant: req.headers().get("x-tenant")?.to_str().ok()?.to_owned(),
            subject: req.headers().get("x-user")?.to_str().ok()?.to_owned(),
        })
    })
    .max_body_bytes(1024)
}

#[tokio::test]
async fn idempotency_layer_replays_the_first_answer_and_refuses_what_it_cannot_replay() {
    let c = client().await;
    let idem = Idempotency::new(&c, IdempotencyOptions::default()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(idempotency_layer(idem.clone()))
        .service(counted_service(calls.clone(), Duration::ZERO, 201));

    let first = call(&svc, keyed("alice", Some("k1"), "{}")).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
    assert_eq!(first.body().as_ref(), br#"{"call":1,"echo":{}}"#);
    // The retry: the stored answer, status, type and body, not a second call.
    for _ in 0..3 {
        let retry = call(&svc, keyed("alice", Some("k1"), "{}")).await;
        assert_eq!(retry.status(), 201);
        assert_eq!(retry.headers()[IDEMPOTENT_REPLAYED_HEADER], "true");
        assert_eq!(
            retry.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        assert_eq!(retry.body(), first.body());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The same key from another subject is another key.
    let bob = call(&svc, keyed("bob", Some("k1"), "{}")).await;
    assert!(bob.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The key with another body: refused, not run.
    let reused = call(&svc, keyed("alice", Some("k1"), "[]")).await;
    assert_problem(&reused, 422, "idempotency_key_reused");
    // Without a key: every request runs.
    for _ in 0..2 {
        let r = call(&svc, keyed("alice", None, "{}")).await;
        assert!(r.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // A malformed key or an oversized body: refused before anything runs.
    let bad = call(&svc, keyed("alice", Some(&"k".repeat(129)), "{}")).await;
    assert_problem(&bad, 400, "invalid_idempotency_key");
    let big = call(&svc, keyed("alice", Some("k2"), &"x".repeat(2048))).await;
    assert_problem(&big, 413, "body_too_large");
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // A failed answer is not stored: the retry runs again.
    let failing = ServiceBuilder::new()
        .layer(idempotency_layer(idem))
        .service(counted_service(calls.clone(), Duration::ZERO, 500));
    for expected in [5, 6] {
        let r = call(&failing, keyed("alice", Some("k3"), "{}")).await;
        assert_eq!(r.status(), 500);
        assert!(r.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
        assert_eq!(calls.load(Ordering::SeqCst), expected);
    }
}

/// The handler reads the validated key from the extensions (with or
/// without a scope); a request without a key has none.
#[tokio::test]
async fn idempotency_layer_hands_the_validated_key_to_the_handler() {
    let c = client().await;
    let idem = Idempotency::new(&c, IdempotencyOptions::default()).unwrap();
    let echo_key = tower::service_fn(|req: http::Request<Full<Bytes>>| async move {
        let key = req
            .extensions()
            .get::<IdempotencyKey>()
            .map_or("none".to_owned(), |k| k.as_str().to_owned());
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(key))))
    });
    let svc = ServiceBuilder::new()
        .layer(idempotency_layer(idem))
        .service(echo_key);
    let key = soma_testkit::unique_name("k");
    let with = call(&svc, keyed("alice", Some(&key), "{}")).await;
    assert_eq!(with.body().as_ref(), key.as_bytes());
    let without = call(&svc, keyed("alice", None, "{}")).await;
    assert_eq!(without.body().as_ref(), b"none");
    // No scope (no tenant header): the layer does not claim, the key still
    // reaches the handler validated.
    let mut unscoped = keyed("alice", Some("k-unscoped"), "{}");
    unscoped.headers_mut().remove("x-tenant");
    let r = call(&svc, unscoped).await;
    assert_eq!(r.body().as_ref(), b"k-unscoped");
}

#[tokio::test]
async fn idempotency_layer_finishes_abandoned_work_and_answers_409_meanwhile() {
    let c = client().await;
    let idem = Idempotency::new(&c, IdempotencyOptions::default()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(idempotency_layer(idem))
        .service(counted_service(
            calls.clone(),
            Duration::from_millis(600),
            202,
        ));
    // The client gives up after 100 ms (disconnect, timeout): its future is dropped.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        call(&svc, keyed("alice", Some("slow"), "{}")),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the slow request should still be running"
    );
    // Meanwhile a retry is told to wait.
    let busy = call(&svc, keyed("alice", Some("slow"), "{}")).await;
    let problem = assert_problem(&busy, 409, "request_in_progress");
    assert!(
        busy.headers().contains_key(http::header::RETRY_AFTER),
        "{problem}"
    );
    // The abandoned work ran to its end and stored its answer.
    let stored = eventually(Duration::from_secs(5), || {
        let svc = svc.clone();
        async move {
            let r = call(&svc, keyed("alice", Some("slow"), "{}")).await;
            r.status() == 202 && r.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_some()
        }
    })
    .await;
    assert!(stored, "the abandoned request's answer was never stored");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "run exactly once");
}

#[tokio::test]
async fn idempotency_layer_fails_closed_or_open_when_redis_is_down() {
    let port = soma_testkit::free_port();
    let mut cfg = RedisConfig::default();
    cfg.url = format!("redis://127.0.0.1:{port}");
    let down = RedisClient::builder(cfg).connect_lazy().await.unwrap();
    let idem = Idempotency::new(&down, IdempotencyOptions::default()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let closed = ServiceBuilder::new()
        .layer(idempotency_layer(idem.clone()))
        .service(counted_service(calls.clone(), Duration::ZERO, 201));
    let r = call(&closed, keyed("alice", Some("k"), "{}")).await;
    assert_problem(&r, 503, "idempotency_unavailable");
    assert_eq!(r.headers()[http::header::RETRY_AFTER], "1");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let open = ServiceBuilder::new()
        .layer(idempotency_layer(idem).failure_mode(FailMode::Open))
        .service(counted_service(calls.clone(), Duration::ZERO, 201));
    let r = call(&open, keyed("alice", Some("k"), "{}")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A request body that is `Full` or fails on its first read.
enum TestBody {
    Full(Full<Bytes>),
    Failing,
}

impl From<Bytes> for TestBody {
    fn from(b: Bytes) -> Self {
        Self::Full(Full::new(b))
    }
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Full(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| match e {}))),
            Self::Failing => std::task::Poll::Ready(Some(Err(std::io::Error::other("reset")))),
        }
    }
}

#[tokio::test]
async fn idempotency_layer_edges_unreadable_bodies_bad_scopes_large_answers_readiness() {
    let c = client().await;
    let idem = Idempotency::new(&c, IdempotencyOptions::default()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));

    // A body that fails mid-read is a 400, not a 413; nothing runs.
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(idem.clone(), |req: &http::Request<TestBody>| {
                Some(IdempotencyScope {
                    tenant: req.headers().get("x-tenant")?.to_str().ok()?.to_owned(),
                    subject: "alice".into(),
                })
            })
            .max_body_bytes(1024),
        )
        .service(tower::service_fn(move |_req: http::Request<TestBody>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("{}")))) }
        }));
    let request = |tenant: &str, body: TestBody| {
        http::Request::builder()
            .method("POST")
            .uri("/v1/orders")
            .header("x-tenant", tenant)
            .header(IDEMPOTENCY_KEY_HEADER, "k")
            .body(body)
            .unwrap()
    };
    let read = |res: http::Response<Full<Bytes>>| async move {
        let (parts, body) = res.into_parts();
        http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    };
    let r = read(
        svc.clone()
            .oneshot(request("acme", TestBody::Failing))
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 400, "invalid_body");
    // A tenant that cannot be a key part: 400 naming the scope, not a 503.
    let r = read(
        svc.clone()
            .oneshot(request("ac:me", Bytes::from("{}").into()))
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 400, "invalid_idempotency_scope");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // An answer over max_stored_bytes is returned but not stored: the
    // retry runs again and is not marked replayed.
    let big = ServiceBuilder::new()
        .layer(idempotency_layer(idem.clone()).max_stored_bytes(8))
        .service(counted_service(calls.clone(), Duration::ZERO, 200));
    for expected in [1, 2] {
        let r = call(&big, keyed("alice", Some("big"), "{}")).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
        assert_eq!(calls.load(Ordering::SeqCst), expected);
    }

    // Readiness is the inner service's: not ready inside, not ready outside.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut gated = idempotency_layer(idem).layer(Gate(ready.clone()));
    let waiting = tokio::time::timeout(Duration::from_millis(100), gated.ready()).await;
    assert!(waiting.is_err(), "ready while the inner service is not");
    ready.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(1), gated.ready())
        .await
        .expect("ready once the inner service is")
        .unwrap();

    // Debug shows the layer's settings.
    let shown = format!("{:?}", idempotency_layer_for_debug(&c));
    assert!(
        shown.contains("IdempotencyLayer") && shown.contains("max_body_bytes: 1024"),
        "{shown}"
    );
    let shown = format!("{gated:?}");
    assert!(
        shown.contains("IdempotencyService") && shown.contains("max_stored_bytes"),
        "{shown}"
    );
}

fn idempotency_layer_for_debug(c: &RedisClient) -> IdempotencyLayer<Full<Bytes>> {
    idempotency_layer(Idempotency::new(c, IdempotencyOptions::default()).unwrap())
}

/// A service that is ready only while its flag is set; while it is not,
/// it asks to be polled again in 10 ms.
#[derive(Clone)]
struct Gate(Arc<std::sync::atomic::AtomicBool>);

impl tower::Service<http::Request<Full<Bytes>>> for Gate {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        if self.0.load(Ordering::SeqCst) {
            std::task::Poll::Ready(Ok(()))
        } else {
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                waker.wake();
            });
            std::task::Poll::Pending
        }
    }

    fn call(&mut self, _req: http::Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(Full::new(Bytes::new()))))
    }
}

#[tokio::test]
async fn idempotency_in_progress_claims_expire() {
    let c = client().await;
    let idem = Idempotency::new(
        &c,
        IdempotencyOptions {
            in_progress_ttl: Duration::from_millis(300),
            completed_ttl: Duration::from_secs(60),
        },
    )
    .unwrap();
    let Claim::Acquired(stale) = idem.claim::<u32>("acme", "req", "fp").await.unwrap() else {
        panic!()
    };
    // the "crashed" worker never completes; after the TTL a retry takes over
    let retaken = eventually(Duration::from_secs(5), || {
        let idem = idem.clone();
        async move {
            matches!(
                idem.claim::<u32>("acme", "req", "fp").await.unwrap(),
                Claim::Acquired(_)
            )
        }
    })
    .await;
    assert!(retaken);
    let err = stale.complete(&1u32).await.unwrap_err();
    assert!(err.is_not_owner(), "{err:?}");
}

#[tokio::test]
async fn lease_is_exclusive_renewed_and_fenced() {
    let c = client().await;
    let lease = Lease::new(&c, LeaseOptions::new(Duration::from_millis(600))).unwrap();
    let g1 = lease
        .try_acquire("acme", "scheduler")
        .await
        .unwrap()
        .expect("free lease");
    assert!(g1.is_held());
    assert!(
        lease
            .try_acquire("acme", "scheduler")
            .await
            .unwrap()
            .is_none()
    );
    // renewed well past its TTL
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(g1.is_held());
    assert!(
        lease
            .try_acquire("acme", "scheduler")
            .await
            .unwrap()
            .is_none()
    );
    let ttl = c.pttl(g1.key()).await.unwrap().unwrap();
    assert!(ttl > 0 && ttl <= 600, "{ttl}");
    let t1 = g1.token();
    assert!(g1.release().await.unwrap());
    let g2 = lease
        .acquire("acme", "scheduler", Duration::from_secs(2))
        .await
        .unwrap()
        .expect("released lease");
    assert!(
        g2.token() > t1,
        "fencing token must increase: {} <= {t1}",
        g2.token()
    );
    // other tenant, same name: independent
    assert!(
        lease
            .try_acquire("globex", "scheduler")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn lease_expires_when_the_holder_stops_renewing() {
    let holder_client = client().await;
    let mut other_config = config();
    other_config.key_prefix = holder_client.keys().prefix().to_owned();
    let other = RedisClient::connect(other_config).await.unwrap();
    let lease = Lease::new(
        &holder_client,
        LeaseOptions::new(Duration::from_millis(500)),
    )
    .unwrap();
    let g = lease.try_acquire("acme", "relay-0").await.unwrap().unwrap();
    let t1 = g.token();
    // The holder "crashes": its connections go away, renewals fail.
    holder_client.quit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), g.lost())
        .await
        .expect("holder notices the loss");
    assert!(!g.is_held());
    let lease2 = Lease::new(&other, LeaseOptions::new(Duration::from_millis(500))).unwrap();
    let g2 = lease2
        .acquire("acme", "relay-0", Duration::from_secs(5))
        .await
        .unwrap()
        .expect("lease expired");
    assert!(g2.token() > t1);
}

#[tokio::test]
async fn a_lease_taken_over_is_lost_at_the_next_renewal_and_not_released() {
    let c = client().await;
    // Renewed every second; lost at the first renewal after the takeover,
    // long before the 3 s TTL would end it.
    let lease = Lease::new(&c, LeaseOptions::new(Duration::from_secs(3))).unwrap();
    let g = lease.try_acquire("acme", "stolen").await.unwrap().unwrap();
    assert_eq!(
        format!("{g:?}"),
        format!("LeaseGuard {{ key: {:?}, token: {} }}", g.key(), g.token())
    );
    // The fencing counter outlives the lease by days (FENCE_TTL: a week).
    let fence = g.key().replace(":lease:", ":lease-fence:");
    let fence_ttl = c.pttl(&fence).await.unwrap().expect("the fence has a TTL");
    assert!(fence_ttl > 6 * 86_400_000, "{fence_ttl} ms");

    // Another owner takes the key (an operator, a holder after a partition).
    c.set(g.key(), "someone-else", Ttl::secs(30)).await.unwrap();
    tokio::time::timeout(Duration::from_millis(2_500), g.lost())
        .await
        .expect("lost at the next renewal, before the TTL passes");
    assert!(!g.is_held());
    let key = g.key().to_owned();
    assert!(!g.release().await.unwrap(), "a lost lease is not released");
    assert_eq!(
        c.get::<String>(&key).await.unwrap().as_deref(),
        Some("someone-else"),
        "nor is the new owner's key deleted"
    );
}

#[tokio::test]
async fn a_waiter_gets_the_lease_its_holder_releases_and_gives_up_at_its_deadline() {
    let c = client().await;
    let lease = Lease::new(&c, LeaseOptions::new(Duration::from_secs(2))).unwrap();
    let g = lease
        .try_acquire("acme", "handover")
        .await
        .unwrap()
        .unwrap();
    let t1 = g.token();
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let released = g.release().await.unwrap();
        (released, std::time::Instant::now())
    });
    let g2 = lease
        .acquire("acme", "handover", Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the released lease, within the wait");
    let acquired = std::time::Instant::now();
    let (released, released_at) = releaser.await.unwrap();
    assert!(released);
    assert!(g2.token() > t1);
    // The waiter polls every ttl / 10 (200 ms here), not every second.
    let after = acquired.saturating_duration_since(released_at);
    assert!(
        after < Duration::from_millis(500),
        "acquired {after:?} after the release"
    );
    // While it is held, a wait ends empty-handed, and not before its time.
    let started = std::time::Instant::now();
    let none = lease
        .acquire("acme", "handover", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(none.is_none());
    assert!(started.elapsed() >= Duration::from_millis(300));
    // A guard dropped without release() stops renewing and frees the
    // lease at once, not after its TTL.
    drop(g2);
    let freed = eventually(Duration::from_secs(1), || {
        let lease = lease.clone();
        async move {
            lease
                .try_acquire("acme", "handover")
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    assert!(freed, "a dropped guard released the lease");
}

#[tokio::test]
async fn pubsub_broadcasts_per_tenant_channel() {
    let c = client().await;
    let ps = PubSub::connect(&c).await.unwrap();
    let mut a1 = ps.subscribe("acme", "flags").await.unwrap();
    let mut a2 = ps.subscribe("acme", "flags").await.unwrap();
    let mut g = ps.subscribe("globex", "flags").await.unwrap();
    assert!(a1.channel().ends_with("soma:acme:ch:flags"));
    let n = ps.publish("acme", "flags", "beta=on").await.unwrap();
    assert_eq!(n, 1, "one subscriber connection");
    for s in [&mut a1, &mut a2] {
        let ev = tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev, PubSubEvent::Message("beta=on".into()));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), g.recv())
            .await
            .is_err(),
        "other tenant got it"
    );
}
