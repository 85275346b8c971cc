//! API keys: in-memory and PostgreSQL stores behave the same.
#![allow(clippy::field_reassign_with_default)] // tests tweak one setting of a default config

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use soma_policy::{
    ApiKeyStore, AuthError, AuthKind, Authenticator, InMemoryApiKeyStore, PgApiKeyStore,
    PolicyConfig, StoreError, generate_key,
};

fn authenticator(store: Arc<dyn ApiKeyStore>) -> Authenticator {
    Authenticator::builder(&PolicyConfig::default())
        .api_key_store(store)
        .build()
        .unwrap()
}

async fn exercise(store: Arc<dyn ApiKeyStore>) {
    let auth = authenticator(store.clone());
    let printed = format!("{auth:?}");
    assert!(
        printed.starts_with("Authenticator")
            && printed.contains("api_keys: true")
            && printed.contains("api_key_prefix"),
        "what an operator reads: {printed}"
    );
    let issued = generate_key(
        "soma",
        "svc-1",
        "t1",
        vec!["agent".into()],
        vec!["tool:execute".into()],
    );
    let key = issued.key.expose_secret().to_owned();
    assert!(key.starts_with("soma_"));
    assert_eq!(format!("{:?}", issued.key), "[REDACTED]");
    let id = issued.record.lookup_id.clone();
    store.insert(issued.record.clone()).await.unwrap();
    assert!(matches!(
        store.insert(issued.record.clone()).await,
        Err(StoreError::Duplicate)
    ));

    let p = auth.verify_api_key(&key).await.unwrap();
    assert_eq!(p.subject, "svc-1");
    assert_eq!(p.tenant, "t1");
    assert_eq!(p.roles, vec!["agent"]);
    assert_eq!(p.scopes, vec!["tool:execute"]);
    assert_eq!(p.auth_kind, AuthKind::ApiKey { key_id: id.clone() });

    // Same lookup id, different secret tail.
    let mut forged = key.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        auth.verify_api_key(&forged).await.unwrap_err(),
        AuthError::InvalidApiKey
    );
    // Unknown id, wrong prefix, garbage.
    let other = generate_key("soma", "x", "t1", vec![], vec![]);
    for bad in [
        other.key.expose_secret(),
        "other_abcdefghijklmnopqrstuvwxyz0123456789",
        "soma_short",
        "soma_",
        "soma_Ω",
    ] {
        assert_eq!(
            auth.verify_api_key(bad).await.unwrap_err(),
            AuthError::InvalidApiKey,
            "{bad}"
        );
    }
    // Revocation.
    assert!(store.revoke(&id).await.unwrap());
    assert_eq!(
        auth.verify_api_key(&key).await.unwrap_err(),
        AuthError::InvalidApiKey
    );
    assert!(!store.revoke("nonexistent_").await.unwrap());

    // Expiry.
    let mut expired = generate_key("soma", "svc-2", "t1", vec![], vec![]);
    expired.record.expires_at = Some(SystemTime::now() - Duration::from_secs(5));
    store.insert(expired.record.clone()).await.unwrap();
    assert_eq!(
        auth.verify_api_key(expired.key.expose_secret())
            .await
            .unwrap_err(),
        AuthError::InvalidApiKey
    );
    let mut future = generate_key("soma", "svc-3", "t1", vec![], vec![]);
    future.record.expires_at = Some(SystemTime::now() + Duration::from_secs(3600));
    store.insert(future.record.clone()).await.unwrap();
    assert_eq!(
        auth.verify_api_key(future.key.expose_secret())
            .await
            .unwrap()
            .subject,
        "svc-3"
    );
}

#[tokio::test]
async fn in_memory_store() {
    exercise(Arc::new(InMemoryApiKeyStore::new())).await;
}

/// A migrated key store in a fresh schema of the test PostgreSQL, its pool
/// and schema name (drop it with [`drop_schema`]).
async fn pg_store(prefix: &str) -> (PgApiKeyStore, sqlx::PgPool, String) {
    let url = soma_testkit::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let schema = soma_testkit::unique_name(prefix);
    let store = PgApiKeyStore::new(pool.clone(), &schema).unwrap();
    store.migrate().await.unwrap();
    (store, pool, schema)
}

async fn drop_schema(pool: &sqlx::PgPool, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn postgres_store() {
    let (store, pool, schema) = pg_store("policy_keys").await;
    store.migrate().await.unwrap(); // idempotent
    exercise(Arc::new(store)).await;
    // Only hashes are stored: no row contains the plaintext key.
    let issued = generate_key("soma", "svc-9", "t1", vec![], vec![]);
    let store = PgApiKeyStore::new(pool.clone(), &schema).unwrap();
    store.insert(issued.record).await.unwrap();
    let dump: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT row_to_json(k)::text FROM \"{schema}\".soma_api_keys k"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(dump.len() >= 4);
    let secret = issued.key.expose_secret();
    assert!(
        dump.iter().all(|row| !row.contains(&secret[5..])),
        "plaintext key found in the table"
    );
    // The same record again is a duplicate; any other failure is not.
    let again = generate_key("soma", "svc-10", "t1", vec![], vec![]);
    store.insert(again.record.clone()).await.unwrap();
    assert!(matches!(
        store.insert(again.record.clone()).await,
        Err(StoreError::Duplicate)
    ));
    sqlx::query(&format!("DROP TABLE \"{schema}\".soma_api_keys"))
        .execute(&pool)
        .await
        .unwrap();
    let e = store.insert(again.record).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    drop_schema(&pool, &schema).await;
}

/// Replicas starting together migrate the same fresh schema at once: every
/// one succeeds (the chaos harness's two gateways once lost this race on
/// `CREATE SCHEMA IF NOT EXISTS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_one_fresh_schema_all_succeed() {
    let url = soma_testkit::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    for round in 0..5 {
        let schema = soma_testkit::unique_name("policy_keys_race");
        let migrations: Vec<_> = (0..6)
            .map(|_| {
                let store = PgApiKeyStore::new(pool.clone(), &schema).unwrap();
                tokio::spawn(async move { store.migrate().await })
            })
            .collect();
        for m in migrations {
            m.await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: a concurrent migrate failed: {e}"));
        }
        drop_schema(&pool, &schema).await;
    }
}

#[tokio::test]
async fn schema_names_are_validated() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://x@127.0.0.1/x")
        .unwrap();
    for bad in ["", "a-b", "x\"; DROP TABLE y; --", "1abc"] {
        assert!(PgApiKeyStore::new(pool.clone(), bad).is_err(), "{bad}");
    }
}

/// `PgApiKeyStore::from_config` opens the store `policy.api_keys` names
/// (its own pool, its schema), and refuses invalid settings before
/// connecting.
#[tokio::test]
async fn from_config_uses_the_api_keys_settings_and_validates_them() {
    let url = soma_testkit::require_postgres();
    let mut config = PolicyConfig::default().api_keys;
    config.schema = soma_testkit::unique_name("policy_keys_cfg");
    config.max_connections = 3;
    let store = PgApiKeyStore::from_config(&url, &config).await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.pool().options().get_max_connections(), 3);
    let found: Option<String> = sqlx::query_scalar(
        "SELECT table_schema::text FROM information_schema.tables \
         WHERE table_schema = $1 AND table_name = 'soma_api_keys'",
    )
    .bind(&config.schema)
    .fetch_optional(store.pool())
    .await
    .unwrap();
    assert_eq!(found.as_deref(), Some(config.schema.as_str()));
    drop_schema(store.pool(), &config.schema).await;

    // Invalid settings are a config error, found before any connection (a
    // closed port would otherwise be `Unavailable`).
    let closed = format!(
        "postgres://postgres@127.0.0.1:{}/test",
        soma_testkit::free_port()
    );
    let mut bad = config.clone();
    bad.schema = "a-b".into();
    let e = PgApiKeyStore::from_config(&closed, &bad).await.unwrap_err();
    assert!(e.is_config() && !e.is_unavailable(), "{e:?}");
    let mut bad = config.clone();
    bad.max_connections = 0;
    let e = PgApiKeyStore::from_config(&closed, &bad).await.unwrap_err();
    assert!(e.is_config(), "{e:?}");
}

#[tokio::test]
async fn store_outage_is_unavailable() {
    // A pool pointed at a closed port: verification is 503-unavailable, not 401.
    let port = soma_testkit::free_port();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/test"))
        .unwrap();
    let store = PgApiKeyStore::new(pool, "nope").unwrap();
    let auth = authenticator(Arc::new(store));
    let issued = generate_key("soma", "s", "t1", vec![], vec![]);
    let e = auth
        .verify_api_key(issued.key.expose_secret())
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
}

#[tokio::test]
async fn postgres_infinite_expiry_does_not_panic() {
    let (store, pool, schema) = pg_store("policy_keys_inf").await;
    let auth = authenticator(Arc::new(store.clone()));
    for (expires_at, valid) in [("infinity", true), ("-infinity", false)] {
        let issued = generate_key("soma", "svc-inf", "t1", vec![], vec![]);
        store.insert(issued.record.clone()).await.unwrap();
        sqlx::query(&format!(
            "UPDATE \"{schema}\".soma_api_keys SET expires_at = '{expires_at}' WHERE lookup_id = $1"
        ))
        .bind(&issued.record.lookup_id)
        .execute(&pool)
        .await
        .unwrap();
        let r = auth.verify_api_key(issued.key.expose_secret()).await;
        assert_eq!(r.is_ok(), valid, "{expires_at}: {r:?}");
    }
    drop_schema(&pool, &schema).await;
}

/// Counts the lookups that reach the store.
struct Counting(InMemoryApiKeyStore, std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl ApiKeyStore for Counting {
    async fn find(&self, id: &str) -> Result<Option<soma_policy::ApiKeyRecord>, StoreError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.find(id).await
    }
    async fn insert(&self, r: soma_policy::ApiKeyRecord) -> Result<(), StoreError> {
        self.0.insert(r).await
    }
    async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        self.0.revoke(id).await
    }
}

#[tokio::test]
async fn key_guessing_is_bounded_before_the_store() {
    let store = Arc::new(Counting(InMemoryApiKeyStore::new(), Default::default()));
    let good = generate_key("soma", "svc", "t1", vec![], vec![]);
    store.insert(good.record.clone()).await.unwrap();
    let mut config = PolicyConfig::default();
    config.api_keys.client_failure_burst = 5;
    let auth = Authenticator::builder(&config)
        .api_key_store(store.clone())
        .build()
        .unwrap();
    let lookups = || store.1.load(std::sync::atomic::Ordering::SeqCst);
    let attacker = Some("192.0.2.66".parse().unwrap());
    let other = Some("198.51.100.7".parse().unwrap());

    // The same unknown id again: answered from the negative cache.
    let guess = generate_key("soma", "x", "t1", vec![], vec![]);
    let guess = guess.key.expose_secret();
    for _ in 0..3 {
        assert_eq!(
            auth.verify_api_key_from(guess, other).await.unwrap_err(),
            AuthError::InvalidApiKey
        );
    }
    assert_eq!(lookups(), 1, "an unknown id is looked up once");

    // Fresh guesses from one client: `burst` reach the store, then 429.
    for i in 0..50 {
        let g = generate_key("soma", "x", "t1", vec![], vec![]);
        let e = auth
            .verify_api_key_from(g.key.expose_secret(), attacker)
            .await
            .unwrap_err();
        if i >= 5 {
            assert_eq!(e, AuthError::RateLimited, "attempt {i}");
            assert_eq!(e.status(), 429);
        }
    }
    assert_eq!(lookups(), 1 + 5);
    // Another client, and the good key, are unaffected.
    let p = auth
        .verify_api_key_from(good.key.expose_secret(), other)
        .await
        .unwrap();
    assert_eq!(p.subject, "svc");
}

/// Through the authentication layer, failed attempts are charged to the
/// client's address taken from the request (axum's `ConnectInfo`, or a bare
/// `SocketAddr` in the extensions): one client out of attempts is answered
/// 429 while another still gets its 401. The layer passes its inner
/// service's readiness on and its future prints without the request.
#[tokio::test]
async fn the_layer_charges_failures_to_the_request_s_peer_and_passes_readiness_on() {
    use std::net::SocketAddr;
    use tower::{Layer, Service, ServiceExt};

    let mut config = PolicyConfig::default();
    config.api_keys.client_failure_burst = 2;
    let auth = Arc::new(
        Authenticator::builder(&config)
            .api_key_store(Arc::new(InMemoryApiKeyStore::new()))
            .build()
            .unwrap(),
    );
    let inner = tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from("handled")))
    });
    let svc = soma_policy::AuthnLayer::new(auth.clone()).layer(inner);
    let from = |peer: &str| {
        let guess = generate_key("soma", "x", "t1", vec![], vec![]);
        let mut req = http::Request::builder()
            .uri("/v1/things")
            .header("x-api-key", guess.key.expose_secret())
            .body(axum::body::Body::empty())
            .unwrap();
        let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(addr));
        req
    };
    let status = |svc: &mut soma_policy::AuthnService<_>, req| {
        let fut = svc.call(req);
        async move { fut.await.unwrap().status().as_u16() }
    };
    let mut svc = svc;
    for _ in 0..2 {
        svc.ready().await.unwrap();
        assert_eq!(status(&mut svc, from("192.0.2.66")).await, 401);
    }
    svc.ready().await.unwrap();
    assert_eq!(
        status(&mut svc, from("192.0.2.66")).await,
        429,
        "out of attempts"
    );
    svc.ready().await.unwrap();
    assert_eq!(
        status(&mut svc, from("198.51.100.7")).await,
        401,
        "another client"
    );
    // The future says what it is, never the request or its credential.
    let req = from("198.51.100.7");
    let fut = svc.call(req);
    assert!(
        format!("{fut:?}").starts_with("AuthnResponseFuture"),
        "{fut:?}"
    );
    drop(fut);

    // Readiness is the inner service's: one that is never ready keeps the
    // layer's service pending.
    let pending = tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
    });
    let pending = tower::limit::ConcurrencyLimit::new(pending, 0);
    let mut svc = soma_policy::AuthnLayer::new(auth).layer(pending);
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(svc.poll_ready(&mut cx).is_pending());
}
