//! The bulk path (`Bulk` + `RedisClient::run_bulk`) against real Redis:
//! values and TTLs round-trip, per-command server errors, typed batch errors
//! on a killed connection / a paused or dead server, reconnects, AUTH and
//! SELECT, and replies never cross between batches.

mod common;

use std::time::{Duration, Instant};

use common::{PrivateRedis, config, eventually};
use fred::interfaces::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};
use soma_observability::metrics::MetricsRegistry;
use soma_redis::{Bulk, Cache, CacheOptions, Lookup, RedisClient, RedisConfig, RedisError, Ttl};

/// The value of `soma_redis_commands_total{command,outcome}` (0 when absent).
fn commands_total(metrics: &MetricsRegistry, command: &str, outcome: &str) -> f64 {
    let labels = format!(r#"command="{command}",outcome="{outcome}""#);
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with("soma_redis_commands_total{") && l.contains(&labels))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0)
}

/// Sends a raw command on the client's fred pool (test setup only).
/// `CLIENT KILL TYPE normal SKIPME yes`: closes every other normal
/// connection (the bulk ones included), not the one sending it.
async fn kill_normal_clients(client: &RedisClient) {
    raw(
        client,
        "CLIENT",
        vec![
            "KILL".into(),
            "TYPE".into(),
            "normal".into(),
            "SKIPME".into(),
            "yes".into(),
        ],
    )
    .await;
}

async fn raw(client: &RedisClient, cmd: &'static str, args: Vec<Value>) -> Value {
    client
        .fred_pool()
        .next()
        .custom::<Value, Value>(
            CustomCommand::new_static(cmd, ClusterHash::Random, false),
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e:?}"))
}

fn bytes(reply: &Result<Value, RedisError>) -> Option<Vec<u8>> {
    match reply {
        Ok(Value::Bytes(b)) => Some(b.to_vec()),
        Ok(Value::Null) => None,
        other => panic!("expected bytes or nil, got {other:?}"),
    }
}

/// A client connected with `cfg`, with its metrics.
async fn connect_with_metrics(cfg: RedisConfig) -> (RedisClient, MetricsRegistry) {
    let metrics = MetricsRegistry::default();
    let client = RedisClient::builder(cfg)
        .metrics(&metrics)
        .connect()
        .await
        .unwrap();
    (client, metrics)
}

/// A client on the shared server (`config()`), with its metrics.
async fn client_with_metrics() -> (RedisClient, MetricsRegistry) {
    connect_with_metrics(config()).await
}

/// A client for a private server: one bulk connection (so every batch uses
/// the same one), fast reconnect backoff.
async fn private_client(url: String, command_timeout_ms: u64) -> (RedisClient, MetricsRegistry) {
    let mut cfg = RedisConfig::default();
    cfg.url = url;
    cfg.key_prefix = format!("{}:", soma_testkit::unique_name("bulk"));
    cfg.pool_size = 1;
    cfg.bulk_connections = 1;
    cfg.connect_timeout_ms = 500;
    cfg.command_timeout_ms = command_timeout_ms;
    cfg.reconnect.max_attempts = 0;
    cfg.reconnect.initial_ms = 20;
    cfg.reconnect.max_ms = 200;
    cfg.reconnect.base = 2;
    cfg.reconnect.jitter_ms = 10;
    connect_with_metrics(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_and_ttls_round_trip_in_order() {
    let (client, metrics) = client_with_metrics().await;
    let ks = client.keys();
    // 2,500 commands: three round trips of at most 1,024.
    const N: usize = 2_500;
    let keys: Vec<String> = (0..N)
        .map(|i| ks.key("acme", "bulk", &i.to_string()).unwrap())
        .collect();
    let value = |i: usize| format!("v{i}\r\n\0{}", "x".repeat(i % 50)).into_bytes();
    let mut warm = Bulk::with_capacity(N);
    for (i, k) in keys.iter().enumerate() {
        warm.set(k, value(i), Ttl::secs(60)).unwrap();
    }
    let forever = ks.key("acme", "bulk", "forever").unwrap();
    warm.set(&forever, "kept", Ttl::NoExpiry).unwrap(); // explicit opt-out, deleted below
    let replies = client.run_bulk(&warm).await.unwrap();
    assert_eq!(replies.len(), N + 1);
    for r in &replies {
        assert!(matches!(r, Ok(Value::String(s)) if &**s == "OK"), "{r:?}");
    }

    // every SET carried its TTL; the NoExpiry one has none
    for k in [&keys[0], &keys[N / 2], &keys[N - 1]] {
        let ttl = client.pttl(k).await.unwrap().expect("a TTL");
        assert!(ttl > 50_000 && ttl <= 60_000, "ttl {ttl}");
    }
    assert_eq!(client.pttl(&forever).await.unwrap(), Some(-1)); // exists, no TTL
    assert_eq!(
        client.get::<String>(&forever).await.unwrap().as_deref(),
        Some("kept")
    );

    // read back in order, with a missing key in the middle
    let mut read = Bulk::new();
    for k in &keys {
        read.get(k);
    }
    read.get(&ks.key("acme", "bulk", "missing").unwrap());
    let replies = client.run_bulk(&read).await.unwrap();
    assert_eq!(replies.len(), N + 1);
    for (i, r) in replies[..N].iter().enumerate() {
        assert_eq!(bytes(r).as_deref(), Some(value(i).as_slice()), "key {i}");
    }
    assert_eq!(bytes(&replies[N]), None);

    // a value larger than one round trip's byte budget
    let big_key = ks.key("acme", "bulk", "big").unwrap();
    let big = vec![7u8; 3 << 20];
    let mut b = Bulk::new();
    b.set(&big_key, &big, Ttl::secs(60)).unwrap().get(&big_key);
    let replies = client.run_bulk(&b).await.unwrap();
    assert_eq!(bytes(&replies[1]).map(|v| v.len()), Some(big.len()));

    // PEXPIRE / PERSIST / DEL
    let mut b = Bulk::new();
    b.expire(&keys[0], Ttl::secs(5)).unwrap();
    b.expire(&forever, Ttl::millis(1_500)).unwrap();
    b.del(&keys[1]).del(&keys[1]);
    let replies = client.run_bulk(&b).await.unwrap();
    assert!(matches!(replies[0], Ok(Value::Integer(1))));
    assert!(matches!(replies[1], Ok(Value::Integer(1))));
    assert!(matches!(replies[2], Ok(Value::Integer(1))));
    assert!(matches!(replies[3], Ok(Value::Integer(0))));
    let ttl = client.pttl(&keys[0]).await.unwrap().unwrap();
    assert!(ttl > 0 && ttl <= 5_000, "ttl {ttl}");
    let ttl = client.pttl(&forever).await.unwrap().unwrap();
    assert!(ttl > 0 && ttl <= 1_500, "ttl {ttl}");

    // an empty batch is answered without a round trip; a zero TTL is refused
    assert!(client.run_bulk(&Bulk::new()).await.unwrap().is_empty());
    assert!(
        Bulk::new()
            .set(&keys[0], "v", Ttl::After(Duration::ZERO))
            .unwrap_err()
            .is_invalid()
    );

    // metrics: one count per command, by command and outcome
    assert_eq!(commands_total(&metrics, "bulk_set", "ok"), (N + 2) as f64);
    assert_eq!(commands_total(&metrics, "bulk_get", "ok"), (N + 2) as f64);
    assert_eq!(commands_total(&metrics, "bulk_expire", "ok"), 2.0);
    assert_eq!(commands_total(&metrics, "bulk_del", "ok"), 2.0);
    // one latency observation per batch (the empty one makes no round trip)
    let batches = metrics
        .encode()
        .lines()
        .find(|l| {
            l.starts_with("soma_redis_command_duration_seconds_count{")
                && l.contains(r#"command="bulk""#)
        })
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok());
    assert_eq!(batches, Some(4));

    let mut cleanup = Bulk::new();
    for k in keys.iter().chain([&forever, &big_key]) {
        cleanup.del(k);
    }
    client.run_bulk(&cleanup).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_is_reported_for_its_command_only() {
    let (client, metrics) = client_with_metrics().await;
    let ks = client.keys();
    let list = ks.key("acme", "bulk", "a-list").unwrap();
    let (a, b) = (
        ks.key("acme", "bulk", "a").unwrap(),
        ks.key("acme", "bulk", "b").unwrap(),
    );
    raw(&client, "RPUSH", vec![list.as_str().into(), "x".into()]).await;
    client.expire(&list, Duration::from_secs(30)).await.unwrap();

    let mut batch = Bulk::new();
    batch
        .set(&a, "1", Ttl::secs(30))
        .unwrap()
        .get(&list) // WRONGTYPE
        .get(&a);
    batch.set(&list, "over", Ttl::secs(30)).unwrap(); // SET replaces any type
    batch.get(&b);
    let replies = client.run_bulk(&batch).await.unwrap();
    assert_eq!(replies.len(), 5);
    assert!(replies[0].is_ok());
    let err = replies[1].as_ref().unwrap_err();
    assert!(
        matches!(err, RedisError::Server(m) if m.starts_with("WRONGTYPE")),
        "{err:?}"
    );
    assert!(!err.is_connection() && !err.is_timeout() && !err.is_retryable());
    assert_eq!(bytes(&replies[2]).as_deref(), Some(&b"1"[..]));
    assert!(replies[3].is_ok());
    assert_eq!(bytes(&replies[4]), None);
    // the connection is still in step: the next batch reads its own replies
    let mut again = Bulk::new();
    again.get(&list).get(&a);
    let replies = client.run_bulk(&again).await.unwrap();
    assert_eq!(bytes(&replies[0]).as_deref(), Some(&b"over"[..]));
    assert_eq!(bytes(&replies[1]).as_deref(), Some(&b"1"[..]));

    assert_eq!(commands_total(&metrics, "bulk_get", "server"), 1.0);
    assert_eq!(commands_total(&metrics, "bulk_get", "ok"), 4.0);
    client.del(&[&list, &a]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_get_their_own_replies() {
    let mut cfg = config();
    cfg.bulk_connections = 3;
    let client = RedisClient::connect(cfg).await.unwrap();
    // 24 tasks on 3 connections: batches wait for a free connection, and
    // every reply must belong to the batch that sent the command.
    let mut tasks = Vec::new();
    for t in 0..24 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let ks = client.keys();
            for round in 0..40 {
                let keys: Vec<String> = (0..16)
                    .map(|i| ks.key("acme", "bulkc", &format!("{t}-{i}")).unwrap())
                    .collect();
                let mut b = Bulk::with_capacity(32);
                for (i, k) in keys.iter().enumerate() {
                    b.set(k, format!("{t}/{round}/{i}"), Ttl::secs(30)).unwrap();
                }
                for k in keys.iter().rev() {
                    b.get(k);
                }
                let replies = client.run_bulk(&b).await.unwrap();
                for (j, r) in replies[16..].iter().enumerate() {
                    let i = 15 - j;
                    assert_eq!(
                        bytes(r).as_deref(),
                        Some(format!("{t}/{round}/{i}").as_bytes())
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task panicked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_fails_its_batch_and_the_next_batch_reconnects() {
    let mut server = PrivateRedis::start().await;
    let (client, metrics) = private_client(server.url(), 10_000).await;
    let key = client.keys().key("acme", "bulk", "k").unwrap();
    let mut set = Bulk::new();
    set.set(&key, "v1", Ttl::secs(60)).unwrap();
    let mut get = Bulk::new();
    get.get(&key);
    client.run_bulk(&set).await.unwrap();

    // 1. The server closes the (idle) bulk connection; the batch right after
    //    finds it broken: a typed connection error, and the next one reconnects.
    kill_normal_clients(&client).await;
    let err = client.run_bulk(&get).await.unwrap_err();
    assert!(err.is_connection() && err.is_retryable(), "{err:?}");
    let replies = client.run_bulk(&get).await.unwrap();
    assert_eq!(bytes(&replies[0]).as_deref(), Some(&b"v1"[..]));

    // 2. Killed while idle for longer than the idle check: the next batch
    //    notices before sending and reconnects without an error.
    kill_normal_clients(&client).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let replies = client.run_bulk(&get).await.unwrap();
    assert_eq!(bytes(&replies[0]).as_deref(), Some(&b"v1"[..]));

    // 3. The server dies while a batch is in flight (held by CLIENT PAUSE):
    //    the batch fails with a connection error long before the 10 s
    //    command timeout, it does not hang.
    raw(
        &client,
        "CLIENT",
        vec!["PAUSE".into(), "5000".into(), "ALL".into()],
    )
    .await;
    let in_flight = {
        let client = client.clone();
        let set = set.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            (client.run_bulk(&set).await, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !in_flight.is_finished(),
        "the batch should wait for the paused server"
    );
    server.kill().await;
    let (result, took) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight batch hung")
        .unwrap();
    let err = result.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // 4. While the server is down: typed connection errors, fast.
    for _ in 0..20 {
        let start = Instant::now();
        let err = client.run_bulk(&get).await.unwrap_err();
        assert!(err.is_connection(), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_millis(600),
            "{:?}",
            start.elapsed()
        );
    }
    assert!(commands_total(&metrics, "bulk_get", "connection") >= 21.0);

    // 5. Back up (empty: no persistence): batches work again by themselves.
    server.restart().await;
    let recovered = eventually(Duration::from_secs(10), || {
        let (client, get) = (client.clone(), get.clone());
        async move { client.run_bulk(&get).await.is_ok() }
    })
    .await;
    assert!(recovered, "bulk path did not reconnect");
    client.run_bulk(&set).await.unwrap();
    let replies = client.run_bulk(&get).await.unwrap();
    assert_eq!(bytes(&replies[0]).as_deref(), Some(&b"v1"[..]));
    let text = metrics.encode();
    assert!(text.contains("soma_redis_reconnects_total"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_batch_closes_its_connection_so_replies_never_cross() {
    let server = PrivateRedis::start().await;
    let (client, metrics) = private_client(server.url(), 300).await;
    let ks = client.keys();
    let (a, b) = (
        ks.key("acme", "bulk", "a").unwrap(),
        ks.key("acme", "bulk", "b").unwrap(),
    );
    let mut set = Bulk::new();
    set.set(&a, "A", Ttl::secs(60))
        .unwrap()
        .set(&b, "B", Ttl::secs(60))
        .unwrap();
    client.run_bulk(&set).await.unwrap();

    raw(
        &client,
        "CLIENT",
        vec!["PAUSE".into(), "1200".into(), "ALL".into()],
    )
    .await;
    let mut get_a = Bulk::new();
    get_a.get(&a);
    let start = Instant::now();
    let err = client.run_bulk(&get_a).await.unwrap_err();
    assert!(err.is_timeout() && err.is_retryable(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        start.elapsed()
    );
    // a caller giving up on its own (dropping the future) is handled the same way
    let mut get_a2 = Bulk::new();
    get_a2.get(&a);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), client.run_bulk(&get_a2))
            .await
            .is_err()
    );

    // After the pause the server answers the abandoned GETs ("A"); had the
    // connection been reused, this GET of b would read one of them.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let mut get_b = Bulk::new();
    get_b.get(&b).get(&a);
    let replies = client.run_bulk(&get_b).await.unwrap();
    assert_eq!(bytes(&replies[0]).as_deref(), Some(&b"B"[..]));
    assert_eq!(bytes(&replies[1]).as_deref(), Some(&b"A"[..]));
    assert_eq!(commands_total(&metrics, "bulk_get", "timeout"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_selects_the_database_and_honours_tls() {
    let server = PrivateRedis::start_with(&[
        "--requirepass",
        "default-secret",
        // one argv element per token: redis-server quotes each one
        "--user",
        "bulkuser",
        "on",
        ">bulk-secret",
        "~*",
        "&*",
        "+@all",
    ])
    .await;
    let cfg = |user: &str, password: &str, db: u8| {
        let mut cfg = RedisConfig::default();
        cfg.url = format!("redis://127.0.0.1:{}/{db}", server.port);
        cfg.username = Some(user.to_owned());
        cfg.password = Some(password.into());
        cfg.key_prefix = format!("{}:", soma_testkit::unique_name("bulkauth"));
        cfg.bulk_connections = 1;
        cfg.connect_timeout_ms = 1_000;
        cfg
    };
    let db3 = RedisClient::connect(cfg("bulkuser", "bulk-secret", 3))
        .await
        .unwrap();
    let key = db3.keys().key("acme", "bulk", "k").unwrap();
    let mut set = Bulk::new();
    set.set(&key, "in-db-3", Ttl::secs(60)).unwrap();
    db3.run_bulk(&set).await.unwrap();
    // fred (which also AUTHs and SELECTs 3) sees the bulk write ...
    assert_eq!(
        db3.get::<String>(&key).await.unwrap().as_deref(),
        Some("in-db-3")
    );
    // ... and database 0 does not: the bulk connection did SELECT 3.
    let db0 = RedisClient::connect(cfg("bulkuser", "bulk-secret", 0))
        .await
        .unwrap();
    assert_eq!(db0.get::<String>(&key).await.unwrap(), None);
    let mut get = Bulk::new();
    get.get(&key);
    assert_eq!(bytes(&db0.run_bulk(&get).await.unwrap()[0]), None);
    assert_eq!(
        bytes(&db3.run_bulk(&get).await.unwrap()[0]).as_deref(),
        Some(&b"in-db-3"[..])
    );

    // A wrong password: a typed auth error, not retryable.
    let bad = RedisClient::builder(cfg("bulkuser", "wrong", 0))
        .connect_lazy()
        .await
        .unwrap();
    let err = bad.run_bulk(&get).await.unwrap_err();
    assert!(matches!(err, RedisError::Auth(_)), "{err:?}");
    assert!(!err.is_retryable());

    // rediss://: the bulk connection speaks TLS and never falls back to plain
    // text. The far side here is a bare listener that records the first bytes
    // of every connection (fred's pooled ones too) and hangs up: only TLS
    // handshake records (0x16 0x03), never a RESP command (`*`), and the batch
    // gets a typed connection error as soon as the handshake is cut.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<[u8; 2]>::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 2];
                    if sock.read_exact(&mut buf).await.is_ok() {
                        seen.lock().push(buf);
                    }
                });
            }
        })
    };
    let mut tls_config = cfg("bulkuser", "bulk-secret", 0);
    tls_config.url = format!("rediss://127.0.0.1:{port}");
    let tls = RedisClient::builder(tls_config)
        .connect_lazy()
        .await
        .unwrap();
    let start = Instant::now();
    let err = tls.run_bulk(&get).await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    recorder.abort();
    let seen = seen.lock().clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|b| *b == [0x16, 0x03]), "{seen:?}");
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Price {
    sku: String,
    cents: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_warm_up_and_bulk_lookup_go_through_the_bulk_path() {
    let (client, metrics) = client_with_metrics().await;
    let prices: Cache<Price> = Cache::new(
        &client,
        "price",
        CacheOptions::new(Duration::from_secs(90)).with_negative_ttl(Duration::from_secs(5)),
    )
    .unwrap();
    let items: Vec<(String, Price)> = (0..300)
        .map(|i| {
            (
                format!("sku-{i}"),
                Price {
                    sku: format!("sku-{i}"),
                    cents: i * 7,
                },
            )
        })
        .collect();
    let written = prices
        .set_many("acme", items.iter().map(|(id, p)| (id.as_str(), p)))
        .await
        .unwrap();
    assert_eq!(written, 300);
    assert_eq!(commands_total(&metrics, "bulk_set", "ok"), 300.0);
    // the cache's TTL on every entry, under the cache's key layout
    let ttl = client
        .pttl(&prices.key("acme", "sku-299").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(ttl > 80_000 && ttl <= 90_000, "ttl {ttl}");
    // single-key reads see the warm-up
    assert_eq!(
        prices.get("acme", "sku-5").await.unwrap(),
        Lookup::Hit(items[5].1.clone())
    );

    prices.set_absent("acme", "gone").await.unwrap();
    let other_tenant = prices.key("globex", "sku-1").unwrap();
    client
        .set(&other_tenant, "not json", Ttl::secs(30))
        .await
        .unwrap();
    let found = prices
        .get_many("acme", &["sku-0", "missing", "sku-299", "gone"])
        .await
        .unwrap();
    assert_eq!(found.len(), 4);
    assert_eq!(found[0].as_ref().unwrap(), &Lookup::Hit(items[0].1.clone()));
    assert_eq!(found[1].as_ref().unwrap(), &Lookup::Miss);
    assert_eq!(
        found[2].as_ref().unwrap(),
        &Lookup::Hit(items[299].1.clone())
    );
    assert_eq!(found[3].as_ref().unwrap(), &Lookup::Absent);
    // a value that does not decode is that entry's error only
    let mixed = prices
        .get_many("globex", &["sku-1", "sku-2"])
        .await
        .unwrap();
    assert!(matches!(mixed[0], Err(RedisError::Decode(_))), "{mixed:?}");
    assert_eq!(mixed[1].as_ref().unwrap(), &Lookup::Miss);
    // tenant isolation: an invalid tenant is refused before anything is sent
    assert!(
        prices
            .get_many("ac:me", &["x"])
            .await
            .unwrap_err()
            .is_invalid()
    );

    let text = metrics.encode();
    let hits = text
        .lines()
        .find(|l| {
            l.starts_with("soma_redis_cache_requests_total{")
                && l.contains(r#"cache="price",result="hit""#)
        })
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok());
    assert_eq!(hits, Some(3.0), "{text}");

    let mut cleanup = Bulk::new();
    for (id, _) in &items {
        cleanup.del(&prices.key("acme", id).unwrap());
    }
    cleanup.del(&prices.key("acme", "gone").unwrap());
    cleanup.del(&other_tenant);
    client.run_bulk(&cleanup).await.unwrap();
}
