//! soma-redis benchmarks against the real Redis on 127.0.0.1:6379.
//!
//! ```text
//! cargo bench -p soma-redis --bench redis -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Side by side in one run:
//! 1. the bulk path (`Bulk` + `RedisClient::run_bulk`, 50 tasks × batches of
//!    16) vs `redis-benchmark -P 16 -c 50` for the same commands on the same
//!    server: `SET key xxx` (`-t set`; the client with `Ttl::NoExpiry`),
//!    `SET key xxx PX 300000` (what the client sends with a TTL) and `GET`
//!    (`-t get`), in interleaved rounds, with 4 (default) and 50 bulk
//!    connections;
//! 2. the fred paths for context: `RedisClient::batch` (fred pipelines of 16
//!    × 50 tasks), 800 concurrent single commands, and the same pipelines
//!    straight on the fred pool;
//! 3. a rate-limit check (one `EVALSHA`) vs a raw fred `GET`;
//! 4. a cache hit (`Cache::get`, JSON decode) vs a raw fred `GET` of the same bytes.
//!
//! Summaries with ops/s and ratios are printed at the end.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use fred::interfaces::KeysInterface;
use serde::{Deserialize, Serialize};
use soma_redis::{
    Bulk, Cache, CacheOptions, RateLimit, RateLimiter, RedisClient, RedisConfig, Ttl,
};
use tokio::runtime::Runtime;

const TASKS: usize = 50;
const PIPELINE: usize = 16;
/// Interleaved rounds of redis-benchmark and the bulk path in the summary.
const ROUNDS: usize = 5;

#[derive(Clone, Serialize, Deserialize)]
struct Session {
    user: String,
    roles: Vec<String>,
    exp: u64,
}

fn rt() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config() -> RedisConfig {
    let mut config = RedisConfig::default();
    config.url = soma_testkit::require_redis();
    config.key_prefix = format!("{}:", soma_testkit::unique_name("bench"));
    config.command_timeout_ms = 5_000;
    config.pool_size = 4;
    config
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    /// `SET key xxx PX 300000` (the crate's TTL rule)
    Set,
    /// `SET key xxx` (`Ttl::NoExpiry`): the command `redis-benchmark -t set` sends
    SetNoTtl,
    Get,
}

/// `ops` commands through explicit pipelines of 16, from `TASKS` tasks.
async fn pipelined(client: &RedisClient, keys: &Arc<Vec<String>>, op: Op, ops: u64) -> Duration {
    let per_task = (ops as usize).div_ceil(TASKS * PIPELINE).max(1);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let client = client.clone();
        let keys = keys.clone();
        handles.push(tokio::spawn(async move {
            let key = &keys[t];
            for _ in 0..per_task {
                let mut b = client.batch().unwrap();
                for _ in 0..PIPELINE {
                    match op {
                        Op::Set => b.set(key, "xxx", Ttl::secs(300)).await.unwrap(),
                        Op::SetNoTtl => b.set(key, "xxx", Ttl::NoExpiry).await.unwrap(),
                        Op::Get => b.get(key).await.unwrap(),
                    }
                }
                b.run().await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start
        .elapsed()
        .mul_f64(ops as f64 / (per_task * TASKS * PIPELINE) as f64)
}

/// `ops` commands through the bulk path ([`Bulk`] + `run_bulk`), batches of
/// 16 built per call, from `TASKS` tasks.
async fn bulk_pipelined(
    client: &RedisClient,
    keys: &Arc<Vec<String>>,
    op: Op,
    ops: u64,
) -> Duration {
    let per_task = (ops as usize).div_ceil(TASKS * PIPELINE).max(1);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let client = client.clone();
        let keys = keys.clone();
        handles.push(tokio::spawn(async move {
            let key = &keys[t];
            for _ in 0..per_task {
                let mut b = Bulk::with_capacity(PIPELINE);
                for _ in 0..PIPELINE {
                    match op {
                        Op::Set => {
                            b.set(key, "xxx", Ttl::secs(300)).unwrap();
                        }
                        Op::SetNoTtl => {
                            b.set(key, "xxx", Ttl::NoExpiry).unwrap();
                        }
                        Op::Get => {
                            b.get(key);
                        }
                    }
                }
                for r in client.run_bulk(&b).await.unwrap() {
                    r.unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start
        .elapsed()
        .mul_f64(ops as f64 / (per_task * TASKS * PIPELINE) as f64)
}

/// `ops` single commands with `TASKS * PIPELINE` in flight (fred pipelines
/// them on the pooled connections).
async fn concurrent(client: &RedisClient, keys: &Arc<Vec<String>>, op: Op, ops: u64) -> Duration {
    let tasks = TASKS * PIPELINE;
    let per_task = (ops as usize).div_ceil(tasks).max(1);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let client = client.clone();
        let keys = keys.clone();
        handles.push(tokio::spawn(async move {
            let key = &keys[t % TASKS];
            for _ in 0..per_task {
                match op {
                    Op::Set => client.set(key, "xxx", Ttl::secs(300)).await.unwrap(),
                    Op::SetNoTtl => client.set(key, "xxx", Ttl::NoExpiry).await.unwrap(),
                    Op::Get => {
                        client.get::<Bytes>(key).await.unwrap();
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start
        .elapsed()
        .mul_f64(ops as f64 / (per_task * tasks) as f64)
}

/// The same as [`pipelined`], straight on fred (no soma-redis wrapper), to
/// separate the wrapper's cost from fred's.
async fn raw_pipelined(
    client: &RedisClient,
    keys: &Arc<Vec<String>>,
    op: Op,
    ops: u64,
) -> Duration {
    let per_task = (ops as usize).div_ceil(TASKS * PIPELINE).max(1);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let pool = client.fred_pool().clone();
        let keys = keys.clone();
        handles.push(tokio::spawn(async move {
            let key = keys[t].as_str();
            for _ in 0..per_task {
                let p = pool.next().pipeline();
                for _ in 0..PIPELINE {
                    match op {
                        Op::Set | Op::SetNoTtl => p
                            .set::<(), _, _>(
                                key,
                                "xxx",
                                (op == Op::Set).then_some(fred::types::Expiration::PX(300_000)),
                                None,
                                false,
                            )
                            .await
                            .unwrap(),
                        Op::Get => p.get::<(), _>(key).await.unwrap(),
                    }
                }
                let _: Vec<fred::types::Value> = p.all().await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start
        .elapsed()
        .mul_f64(ops as f64 / (per_task * TASKS * PIPELINE) as f64)
}

/// Runs `redis-benchmark -h 127.0.0.1 -p 6379 -P 16 -c 50 -n {n} -q {test}`
/// and returns its requests per second (`None` when it is not installed).
/// `test` is `-t set`, `-t get` or a literal command.
fn redis_benchmark(n: u64, test: &[&str]) -> Option<f64> {
    let n = n.to_string();
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        "6379",
        "-P",
        "16",
        "-c",
        "50",
        "-n",
        &n,
        "-q",
    ];
    args.extend_from_slice(test);
    let out = Command::new("redis-benchmark").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // the last line reads "SET: 512820.53 requests per second, p50=1.2 msec"
    // (or "SET key:__rand_int__ xxx PX 300000: 376293.53 requests per second, ..."),
    // after \r-separated progress lines
    let line = text
        .split(['\n', '\r'])
        .rfind(|l| l.contains(" requests per second"))?;
    let before = line.split(" requests per second").next()?;
    before.split_whitespace().last()?.parse().ok()
}

/// (this process's user+system CPU, finished children's user+system CPU) in
/// clock ticks of 10 ms (Linux `USER_HZ`), from `/proc/self/stat`.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after "pid (comm)": state is field 3, utime 14, stime 15, cutime 16, cstime 17
    let fields: Vec<u64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some((fields[0] + fields[1], fields[2] + fields[3]))
}

fn bench_pipelined(c: &mut Criterion, rt: &Runtime, client: &RedisClient, keys: &Arc<Vec<String>>) {
    let mut g = c.benchmark_group("pipelined");
    let ops = (TASKS * PIPELINE * 10) as u64;
    g.throughput(Throughput::Elements(ops));
    g.sample_size(10);
    for (name, op) in [("set", Op::Set), ("get", Op::Get)] {
        g.bench_function(format!("client_batch16_{name}"), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let client = client.clone();
                let keys = keys.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += pipelined(&client, &keys, op, ops).await;
                    }
                    total
                }
            })
        });
        g.bench_function(format!("client_bulk16_{name}"), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let client = client.clone();
                let keys = keys.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += bulk_pipelined(&client, &keys, op, ops).await;
                    }
                    total
                }
            })
        });
        g.bench_function(format!("client_concurrent800_{name}"), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let client = client.clone();
                let keys = keys.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += concurrent(&client, &keys, op, ops).await;
                    }
                    total
                }
            })
        });
    }
    g.finish();
}

fn bench_latency(
    c: &mut Criterion,
    rt: &Runtime,
    client: &RedisClient,
    cache: &Cache<Session>,
    limiter: &RateLimiter,
    raw_key: &str,
) {
    let mut g = c.benchmark_group("single");
    let pool = client.fred_pool().clone();
    g.bench_function("raw_fred_get", |b| {
        b.to_async(rt)
            .iter(|| async { pool.get::<Bytes, _>(raw_key).await.unwrap() })
    });
    g.bench_function("cache_hit", |b| {
        b.to_async(rt)
            .iter(|| async { cache.get("acme", "s1").await.unwrap() })
    });
    g.bench_function("rate_limit_check", |b| {
        b.to_async(rt)
            .iter(|| async { limiter.check("acme", "bench").await.unwrap() })
    });
    g.finish();
}

/// Interleaved blocks of sequential calls. Returns per-call µs of
/// (raw GET, cache hit), as the minimum and the median over the blocks (the
/// minimum is the least disturbed by other load on a shared machine).
async fn hit_overhead(
    client: &RedisClient,
    cache: &Cache<Session>,
    raw_key: &str,
) -> ((f64, f64), (f64, f64)) {
    let pool = client.fred_pool().clone();
    let (mut raw, mut hit) = (Vec::new(), Vec::new());
    const BLOCK: u32 = 500;
    for _ in 0..30 {
        let s = Instant::now();
        for _ in 0..BLOCK {
            pool.get::<Bytes, _>(raw_key).await.unwrap();
        }
        raw.push(s.elapsed().as_secs_f64() * 1e6 / f64::from(BLOCK));
        let s = Instant::now();
        for _ in 0..BLOCK {
            cache.get("acme", "s1").await.unwrap();
        }
        hit.push(s.elapsed().as_secs_f64() * 1e6 / f64::from(BLOCK));
    }
    raw.sort_by(f64::total_cmp);
    hit.sort_by(f64::total_cmp);
    ((raw[0], hit[0]), (raw[raw.len() / 2], hit[hit.len() / 2]))
}

/// Summary 1: the bulk path vs redis-benchmark, interleaved so that each
/// ratio compares runs made seconds apart (other load on a shared machine
/// drifts over minutes).
fn summary_bulk_vs_redis_benchmark(rt: &Runtime, client: &RedisClient, keys: &Arc<Vec<String>>) {
    let n = 200_000u64;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut wide_config = config();
    wide_config.bulk_connections = TASKS;
    let wide = rt
        .block_on(RedisClient::connect(wide_config))
        .expect("redis on 127.0.0.1:6379");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let tests: [(&str, &[&str], Op); 3] = [
        ("SET (no TTL)", &["-t", "set"], Op::SetNoTtl),
        (
            "SET PX 300000",
            &["SET", "key:__rand_int__", "xxx", "PX", "300000"],
            Op::Set,
        ),
        ("GET", &["-t", "get"], Op::Get),
    ];
    println!(
        "\n=== bulk path vs redis-benchmark -P 16 -c 50, {n} commands per run, {ROUNDS} rounds (load average at start: {}) ===",
        load.trim()
    );
    println!(
        "client: {TASKS} tasks, each sending Bulk batches of {PIPELINE} through RedisClient::run_bulk; \
         bulk_connections = 4 (default) and {TASKS} (one per task, like redis-benchmark -c 50)"
    );
    println!(
        "{:<14} {:>5} {:>14} {:>16} {:>7} {:>16} {:>7}",
        "command", "round", "redis-bench/s", "bulk 4 conns/s", "ratio", "bulk 50 conns/s", "ratio"
    );
    let mut ratios: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); tests.len()];
    let mut rb_missing = false;
    let mut cpu = vec![(0u64, 0u64); tests.len()];
    for round in 0..ROUNDS {
        for (i, (name, test, op)) in tests.iter().enumerate() {
            let cpu0 = cpu_ticks();
            let Some(rb) = redis_benchmark(n, test) else {
                rb_missing = true;
                break;
            };
            let cpu1 = cpu_ticks();
            let narrow = rt.block_on(async { rate(bulk_pipelined(client, keys, *op, n).await) });
            let cpu2 = cpu_ticks();
            let wide_rate = rt.block_on(async { rate(bulk_pipelined(&wide, keys, *op, n).await) });
            ratios[i].0.push(narrow / rb);
            ratios[i].1.push(wide_rate / rb);
            // CPU per command (10 ms ticks): redis-benchmark (a finished child) vs this process
            if let (Some(c0), Some(c1), Some(c2)) = (cpu0, cpu1, cpu2) {
                cpu[i].0 += c1.1 - c0.1;
                cpu[i].1 += c2.0 - c1.0;
            }
            println!(
                "{name:<14} {round:>5} {rb:>14.0} {narrow:>16.0} {:>6.2}x {wide_rate:>16.0} {:>6.2}x",
                narrow / rb,
                wide_rate / rb
            );
        }
    }
    if rb_missing {
        println!("redis-benchmark not found (apt-get install redis-tools): no ratios");
    } else {
        let names: Vec<&str> = tests.iter().map(|(name, _, _)| *name).collect();
        print_medians(&names, &mut ratios, &cpu, n);
    }
}

/// Per command: the median over the rounds of the bulk path's ratio to
/// redis-benchmark (4 and `TASKS` bulk connections), then the CPU per
/// command of redis-benchmark and of the client (`cpu` in 10 ms ticks,
/// over `ROUNDS` runs of `n` commands).
fn print_medians(names: &[&str], ratios: &mut [(Vec<f64>, Vec<f64>)], cpu: &[(u64, u64)], n: u64) {
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (name, (narrow, wide)) in names.iter().zip(ratios.iter_mut()) {
        println!(
            "median ratio {name:<14}: {:.2}x (4 bulk connections)   {:.2}x ({TASKS} bulk connections)",
            median(narrow),
            median(wide)
        );
    }
    let per_cmd = |ticks: u64| ticks as f64 * 10_000.0 / (n * ROUNDS as u64) as f64;
    for (name, (rb, bulk)) in names.iter().zip(cpu) {
        println!(
            "CPU per command {name:<14}: redis-benchmark {:.2} µs, client (bulk, 4 connections) {:.2} µs",
            per_cmd(*rb),
            per_cmd(*bulk)
        );
    }
}

/// Summary 2: the same mix through fred (raw and through the client), for
/// context, and the cache's overhead over a raw GET.
fn summary_fred_paths(
    rt: &Runtime,
    client: &RedisClient,
    keys: &Arc<Vec<String>>,
    cache: &Cache<Session>,
    raw_key: &str,
) {
    let n = 400_000u64;
    let rb = redis_benchmark(n, &["-t", "set"]).zip(redis_benchmark(n, &["-t", "get"]));
    let (raw_set, raw_get, batch_set, batch_get, conc_set, conc_get) = rt.block_on(async {
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        (
            rate(raw_pipelined(client, keys, Op::Set, n).await),
            rate(raw_pipelined(client, keys, Op::Get, n).await),
            rate(pipelined(client, keys, Op::Set, n).await),
            rate(pipelined(client, keys, Op::Get, n).await),
            rate(concurrent(client, keys, Op::Set, n).await),
            rate(concurrent(client, keys, Op::Get, n).await),
        )
    });
    let ((raw_min, hit_min), (raw_med, hit_med)) =
        rt.block_on(hit_overhead(client, cache, raw_key));
    println!("\n=== fred paths, {n} ops per run (SET with PX 300000) ===");
    match rb {
        Some((rb_set, rb_get)) => {
            println!(
                "redis-benchmark -P 16 -c 50: SET {rb_set:>10.0} ops/s   GET {rb_get:>10.0} ops/s"
            );
            println!(
                "raw fred batch16 x50 tasks:  SET {raw_set:>10.0} ops/s ({:.2}x)   GET {raw_get:>10.0} ops/s ({:.2}x)",
                raw_set / rb_set,
                raw_get / rb_get
            );
            println!(
                "client batch16 x50 tasks:    SET {batch_set:>10.0} ops/s ({:.2}x)   GET {batch_get:>10.0} ops/s ({:.2}x)",
                batch_set / rb_set,
                batch_get / rb_get
            );
            println!(
                "client 800 concurrent:       SET {conc_set:>10.0} ops/s ({:.2}x)   GET {conc_get:>10.0} ops/s ({:.2}x)",
                conc_set / rb_set,
                conc_get / rb_get
            );
        }
        None => println!(
            "redis-benchmark not found; client batch16 SET {batch_set:.0} GET {batch_get:.0} ops/s"
        ),
    }
    println!(
        "cache hit vs raw fred GET, best block: {hit_min:.2} µs vs {raw_min:.2} µs = overhead {:.2} µs per call",
        hit_min - raw_min
    );
    println!(
        "cache hit vs raw fred GET, median block: {hit_med:.2} µs vs {raw_med:.2} µs = overhead {:.2} µs per call",
        hit_med - raw_med
    );
}

fn main() {
    let rt = rt();
    let client = rt
        .block_on(RedisClient::connect(config()))
        .expect("redis on 127.0.0.1:6379");
    let keys: Arc<Vec<String>> = Arc::new(
        (0..TASKS)
            .map(|i| client.keys().key("bench", "kv", &i.to_string()).unwrap())
            .collect(),
    );
    let cache: Cache<Session> = Cache::new(
        &client,
        "session",
        CacheOptions::new(Duration::from_secs(600)),
    )
    .unwrap();
    let session = Session {
        user: "user-42".into(),
        roles: vec!["admin".into(), "billing".into()],
        exp: 1_900_000_000,
    };
    rt.block_on(cache.set("acme", "s1", &session)).unwrap();
    let raw_key = cache.key("acme", "s1").unwrap();
    let limiter = RateLimiter::new(
        &client,
        RateLimit::per(u32::MAX / 2, Duration::from_secs(3600)),
    )
    .unwrap();
    rt.block_on(limiter.check("acme", "bench")).unwrap();

    let mut c = Criterion::default().configure_from_args();
    bench_pipelined(&mut c, &rt, &client, &keys);
    bench_latency(&mut c, &rt, &client, &cache, &limiter, &raw_key);
    c.final_summary();

    summary_bulk_vs_redis_benchmark(&rt, &client, &keys);
    summary_fred_paths(&rt, &client, &keys, &cache, &raw_key);
    rt.block_on(async {
        let _ = client
            .del(&keys.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
        let _ = cache.invalidate("acme", "s1").await;
    });
}
