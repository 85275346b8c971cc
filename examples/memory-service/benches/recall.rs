//! What one recall costs as a conversation's memories grow.
//!
//! One scope holds 10,000 chat turns (25 words each from a 300-word
//! vocabulary, so a question shares words with some turns and not others).
//! The platform's recall (`top_k` 3, layer `both`) is timed through the real
//! `SomabrainClient` against the service in-process, in four
//! configurations over their own schemas, in the same run:
//!
//! - `recall_10k/trigram_unbounded`: the ranking and scope the service had
//!   before the recall window (`trigram`, every memory of the scope scored);
//! - `recall_10k/fts_window_1000`: full text over the newest 1,000;
//! - `recall_10k/hybrid_window_1000`: `hybrid` over the newest 1,000 (the
//!   default window until the platform load showed its cost);
//! - `recall_10k/hybrid_window_256`: the default (`hybrid`, newest 256).
//!
//! After criterion, an interleaved run prints the mean of each and the
//! ratio against the first.
//!
//! `cargo bench -p soma-memory-service --bench recall -- --warm-up-time 1 --measurement-time 3`
//! (needs PostgreSQL on 127.0.0.1:5432, as the tests do).
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::Criterion;
use soma_memory_service::{MemoryConfig, MemoryService, Ranking};
use soma_somabrain::{
    CallOptions, Memory, RecallRequest, RememberBatch, SomabrainClient, SomabrainConfig,
};
use sqlx::PgPool;

const TOKEN: &str = "recall-bench-token";
const MEMORIES: usize = 10_000;
const WORDS: usize = 300;

/// A deterministic pseudo-random word list: `w0`..`w299` spelled as
/// pronounceable words so the English stemmer treats them as words.
fn word(i: usize) -> String {
    const SYL: [&str; 12] = [
        "ka", "lo", "mi", "ren", "sa", "tu", "vel", "no", "pri", "dax", "el", "or",
    ];
    format!(
        "{}{}{}",
        SYL[i % 12],
        SYL[(i / 12) % 12],
        SYL[(i / 144) % 12]
    )
}

fn text(seed: usize, words: usize) -> String {
    let mut x = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word((x % WORDS as u64) as usize)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct Service {
    client: SomabrainClient,
    schema: String,
    pool: PgPool,
    task: tokio::task::JoinHandle<()>,
}

async fn start(name: &str, ranking: Ranking, window: u32) -> Service {
    let url = soma_testkit::require_postgres();
    let pool = PgPool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} (start it: cargo xtask stack up): {e}"));
    let schema = format!("recall_bench_{name}_{}", std::process::id());
    let config = MemoryConfig {
        token: TOKEN.into(),
        ranking,
        recall_window: window,
        ..MemoryConfig::default()
    };
    let service = MemoryService::builder(pool.clone(), config)
        .schema(&schema)
        .build()
        .await
        .expect("memory service starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = service.router();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut cfg = SomabrainConfig::new(format!("http://{addr}")).with_token(TOKEN);
    cfg.retry.max_retries = 0;
    cfg.breaker.enabled = false;
    let client = SomabrainClient::new(cfg).unwrap();
    for chunk in 0..MEMORIES / 500 {
        let items = (chunk * 500..(chunk + 1) * 500)
            .map(|i| {
                Memory::from_json(format!("t{i}"), serde_json::json!({ "text": text(i, 25) }))
                    .unwrap()
            })
            .collect();
        client
            .remember_batch(
                &RememberBatch {
                    items,
                    universe: None,
                },
                scope(),
            )
            .await
            .expect("store the turns");
    }
    Service {
        client,
        schema,
        pool,
        task,
    }
}

fn scope() -> CallOptions {
    CallOptions::new()
        .tenant("bench")
        .namespace("subject:bench-user")
}

async fn recall(s: &Service, i: usize) {
    let q = RecallRequest::new(text(1_000_000 + i, 7)).top_k(3);
    let found = s.client.recall(&q, scope()).await.expect("recall");
    std::hint::black_box(found);
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let services = rt.block_on(async {
        vec![
            (
                "trigram_unbounded",
                start("trgm", Ranking::Trigram, u32::MAX).await,
            ),
            ("fts_window_1000", start("fts", Ranking::Fts, 1_000).await),
            (
                "hybrid_window_1000",
                start("hybrid", Ranking::Hybrid, 1_000).await,
            ),
            (
                "hybrid_window_256",
                start("hybrid256", Ranking::Hybrid, 256).await,
            ),
        ]
    });
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("recall_10k");
    for (name, s) in &services {
        let mut i = 0;
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| {
                i += 1;
                recall(s, i)
            })
        });
    }
    group.finish();

    // Interleaved, so machine noise hits every configuration alike.
    let rounds = 30;
    let mut total = vec![Duration::ZERO; services.len()];
    rt.block_on(async {
        for i in 0..rounds {
            for (k, (_, s)) in services.iter().enumerate() {
                let t = Instant::now();
                recall(s, i).await;
                total[k] += t.elapsed();
            }
        }
    });
    let base = total[0].as_secs_f64() / f64::from(rounds as u32);
    for ((name, _), t) in services.iter().zip(&total) {
        let mean = t.as_secs_f64() / f64::from(rounds as u32);
        println!(
            "interleaved {name:<20} {:>8.3} ms per recall  ({:.3}× of trigram_unbounded)",
            mean * 1e3,
            mean / base
        );
    }
    rt.block_on(async {
        for (_, s) in services {
            s.task.abort();
            sqlx::query(&format!("DROP SCHEMA {} CASCADE", s.schema))
                .execute(&s.pool)
                .await
                .expect("drop the bench schema");
        }
    });
}
