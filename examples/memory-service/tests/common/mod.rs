//! Starts the memory service in-process on a loopback port, over a fresh
//! PostgreSQL schema.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;

use soma_memory_service::{MemoryConfig, MemoryService, Ranking, Settings};
use soma_observability::health::HealthRegistry;
use soma_observability::metrics::MetricsRegistry;
use soma_somabrain::{SomabrainClient, SomabrainConfig};
use sqlx::PgPool;

pub const TOKEN: &str = "memory-test-token-4e1b";

pub struct TestService {
    pub addr: SocketAddr,
    pub db_url: String,
    pub schema: String,
    pub pool: PgPool,
    pub metrics: MetricsRegistry,
    pub health: HealthRegistry,
    task: tokio::task::JoinHandle<()>,
}

impl TestService {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn with_ranking(ranking: Ranking) -> Self {
        Self::start_with(|c| c.ranking = ranking).await
    }

    pub async fn start_with(f: impl FnOnce(&mut MemoryConfig)) -> Self {
        let url = soma_testkit::require_postgres();
        let pool = PgPool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
        let schema = soma_testkit::unique_name("memsvc");
        let mut config = MemoryConfig {
            token: TOKEN.into(),
            ..MemoryConfig::default()
        };
        f(&mut config);
        let metrics = MetricsRegistry::default();
        let health = HealthRegistry::new();
        let settings = Settings {
            memory: config.clone(),
            ..Settings::default()
        };
        let service = MemoryService::builder(pool.clone(), config)
            .schema(&schema)
            .metrics(&metrics)
            .health(&health)
            .build()
            .await
            .expect("memory service starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        // The binary's own composition (contract + admin routes + layers).
        let app = soma_memory_service::app(&service, &settings, &metrics, &health);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let this = TestService {
            addr,
            db_url: url,
            schema,
            pool,
            metrics,
            health,
            task,
        };
        this.wait_ready().await;
        this
    }

    /// Waits until the background PostgreSQL check has reported (readyz 200).
    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{}/readyz", self.url())).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("memory service never became ready");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client config pointing here (no retries: tests see each answer).
    pub fn client_config(&self) -> SomabrainConfig {
        let mut c = SomabrainConfig::new(self.url()).with_token(TOKEN);
        c.default_tenant = "acme".into();
        c.default_namespace = "agent".into();
        c.retry.max_retries = 0;
        c.breaker.enabled = false;
        c
    }

    pub fn client(&self) -> SomabrainClient {
        SomabrainClient::new(self.client_config()).unwrap()
    }

    /// Stops the server and drops the schema (over a fresh connection: a
    /// test may have closed the service's pool).
    pub async fn stop(self) {
        self.task.abort();
        self.pool.close().await;
        let pool = PgPool::connect(&self.db_url).await.expect("PostgreSQL");
        sqlx::raw_sql(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&pool)
        .await
        .expect("drop test schema");
        pool.close().await;
    }
}
