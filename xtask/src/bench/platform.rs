//! The platform group: the four platform binaries on a private stack, an
//! open-loop chat load followed to its replies, and the same `POST` load on
//! a bare handler (no soma layers) in the same run as the baseline.
//!
//! The private stack reuses the chaos harness's (`chaos/deps.rs`,
//! `chaos/services.rs`) on a port block of its own (chaos + 100), so a
//! benchmark and a chaos run can share the machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::cpu::{self, Watched};
use super::drift::{self, Point, Statements};
use super::openloop::{Conv, OpenLoop, Report, Shape};
use super::table::{Goal, Row};
use crate::chaos::deps::{self, Broker, MemoryService, Postgres, Proc, Redis};
use crate::chaos::services::{Platform, Wiring};
use crate::{platform, root, run};

pub(crate) mod sse;

/// Chaos's ports + 100.
const PORT_OFFSET: u16 = 100;
const PG_PORT: u16 = 25532;
const BROKER_PG_PORT: u16 = 25533;
const REDIS_PORT: u16 = 26479;
const BROKER_PORT: u16 = 29192;
const SOMABRAIN_ADDR: &str = "127.0.0.1:29796";
const BARE_ADDR: &str = "127.0.0.1:28190";
const DB: &str = "bench";
const GROUP: &str = "platform";

/// What the platform group runs.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
    pub(crate) conversations: usize,
    pub(crate) zipf_s: f64,
    pub(crate) ceiling_workers: usize,
    pub(crate) ceiling: Duration,
    /// Prebuilt binaries (default: build this checkout's, release profile).
    pub(crate) bin_dir: Option<PathBuf>,
    /// Leave the private stack up afterwards.
    pub(crate) keep: bool,
    /// More `SOMA_*` overrides for the platform services (`KEY=VALUE`).
    pub(crate) env: Vec<(String, String)>,
    /// How long the bare path's load runs (default: `duration`). A long
    /// decay run of the platform needs the baseline's figures, not its
    /// decay, so `--bare-secs` spares the machine the bare path's hour.
    pub(crate) bare_duration: Option<Duration>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            rate: 500.0,
            duration: Duration::from_secs(60),
            conversations: 1_000,
            zipf_s: 1.0,
            ceiling_workers: 64,
            ceiling: Duration::from_secs(10),
            bin_dir: None,
            keep: false,
            env: Vec::new(),
            bare_duration: None,
        }
    }
}

struct Stack {
    pg: Postgres,
    broker_pg: Postgres,
    redis: Redis,
    broker: Broker,
    memory: MemoryService,
}

impl Stack {
    fn new(dir: &Path, bin_dir: &Path) -> Self {
        let mut pg = Postgres::new("pg", dir, PG_PORT);
        // Where the platform's queries go: pg_stat_statements says.
        pg.extra_opts = "-c shared_preload_libraries=pg_stat_statements".to_owned();
        let mut broker_pg = Postgres::new("broker-pg", dir, BROKER_PG_PORT);
        broker_pg.extra_opts = pg.extra_opts.clone();
        let storage = broker_pg.url("tansu");
        let memory = MemoryService::new(
            SOMABRAIN_ADDR,
            bin_dir.join("soma-memory-service"),
            root().join("examples/memory-service/config/local.toml"),
            pg.url(DB),
        );
        Self {
            pg,
            redis: Redis::new(dir, REDIS_PORT),
            broker: Broker::new(dir, BROKER_PORT, storage),
            broker_pg,
            memory,
        }
    }

    /// Fresh: empty databases, broker storage and Redis (as `cargo xtask
    /// stack up` runs them: tansu on PostgreSQL storage).
    fn start(&mut self, log_dir: &Path) -> Result<(), String> {
        self.stop();
        for pg in [&self.pg, &self.broker_pg] {
            // A cluster left running by an earlier run without the library.
            let _ = pg.stop();
            pg.start()?;
        }
        self.pg.recreate_db(DB)?;
        self.broker_pg.recreate_db("tansu")?;
        self.broker_pg
            .psql_file("tansu", &root().join("xtask/stack.d/tansu-pg-schema.sql"))?;
        for (pg, db) in [(&self.pg, DB), (&self.broker_pg, "tansu")] {
            pg.psql(db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")?;
        }
        self.redis.log = log_dir.join("redis.log");
        self.broker.log = log_dir.join("tansu.log");
        self.memory.log = log_dir.join("memory-service.log");
        self.redis.start()?;
        self.broker.start()?;
        self.memory.start()
    }

    fn stop(&mut self) {
        self.memory.stop();
        self.broker.stop();
        self.redis.stop();
        let _ = self.pg.stop();
        let _ = self.broker_pg.stop();
    }

    fn watched(&self) -> Vec<Watched> {
        let mut w = Vec::new();
        let mut add = |name: &str, pid: Option<u32>, with_children: bool| {
            if let Some(pid) = pid {
                w.push(Watched {
                    name: name.to_owned(),
                    pid,
                    with_children,
                });
            }
        };
        add("tansu", self.broker.pid(), false);
        add("postgres (platform)", self.pg.pid(), true);
        add("postgres (tansu storage)", self.broker_pg.pid(), true);
        add("redis", self.redis.pid(), false);
        add("memory-service", self.memory.pid(), false);
        add(cpu::LOAD_GENERATOR, Some(std::process::id()), false);
        w
    }

    /// The statements that took the most time since the last reset.
    fn top_statements(&self) -> String {
        let sql = "SELECT calls, round(total_exec_time)::bigint, \
                   round(mean_exec_time::numeric, 2), \
                   regexp_replace(left(query, 90), '\\s+', ' ', 'g') \
                   FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 6";
        let mut out = String::new();
        for (name, pg, db) in [
            ("platform", &self.pg, DB),
            ("tansu storage", &self.broker_pg, "tansu"),
        ] {
            out.push_str(&format!(
                "  postgres ({name}): calls | total ms | mean ms | query\n"
            ));
            match pg.psql(db, sql) {
                Ok(rows) => {
                    for r in rows.lines() {
                        out.push_str(&format!("    {}\n", r.replace('|', " | ")));
                    }
                }
                Err(e) => out.push_str(&format!("    (pg_stat_statements: {e})\n")),
            }
        }
        out
    }

    fn reset_statements(&self) {
        for (pg, db) in [(&self.pg, DB), (&self.broker_pg, "tansu")] {
            let _ = pg.psql(db, "SELECT pg_stat_statements_reset()");
        }
    }
}

fn build(bin_dir: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(dir) = bin_dir {
        return Ok(dir.to_owned());
    }
    println!("bench: building the platform, the memory service and the bare gateway (release)");
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--quiet",
            "-p",
            "soma-example-platform",
            "-p",
            "soma-memory-service",
            "-p",
            "soma-bare-gateway",
            "--bins",
        ],
    )?;
    Ok(platform::target_dir().join("release"))
}

/// Runs the platform group; returns its rows.
pub(crate) async fn run_group(opts: &Opts) -> Result<Vec<Row>, String> {
    let (bin_dir, dir, log_dir, mut stack) = start_stack(opts.bin_dir.as_deref())?;
    let result = phases(opts, &dir, &log_dir, &bin_dir, &stack).await;
    stop_stack(&mut stack, opts.keep, &log_dir);
    result
}

/// Runs the SSE group (10,000 idle streams, time to first event beside
/// them); returns its rows.
pub(crate) async fn run_sse_group(opts: &sse::Opts) -> Result<Vec<Row>, String> {
    let (bin_dir, dir, log_dir, mut stack) = start_stack(opts.bin_dir.as_deref())?;
    let result = sse::phases(opts, &dir, &log_dir, &bin_dir, &stack).await;
    stop_stack(&mut stack, opts.keep, &log_dir);
    result
}

/// Builds (unless `bin_dir` is given) and starts the private stack: the
/// binaries' directory, the stack's directory, its log directory, the stack.
fn start_stack(bin_dir: Option<&Path>) -> Result<(PathBuf, PathBuf, PathBuf, Stack), String> {
    let bin_dir = tokio::task::block_in_place(|| build(bin_dir))?;
    let dir = root().join(".stack").join("bench");
    let log_dir = dir.join("logs");
    let _ = fs::remove_dir_all(&log_dir);
    fs::create_dir_all(&log_dir).map_err(|e| format!("create {}: {e}", log_dir.display()))?;
    let mut stack = Stack::new(&dir, &bin_dir);
    println!(
        "bench: private stack in {} (PostgreSQL {PG_PORT}, tansu {BROKER_PORT} on PostgreSQL \
         {BROKER_PG_PORT}, Redis {REDIS_PORT}, memory service {SOMABRAIN_ADDR}); \
         bare gateway {BARE_ADDR}; platform ports = chaos + {PORT_OFFSET}",
        dir.display()
    );
    if let Err(e) = tokio::task::block_in_place(|| stack.start(&log_dir)) {
        stack.stop();
        return Err(e);
    }
    Ok((bin_dir, dir, log_dir, stack))
}

fn stop_stack(stack: &mut Stack, keep: bool, log_dir: &Path) {
    if keep {
        println!(
            "bench: --keep: the private stack is still up; logs in {}",
            log_dir.display()
        );
    } else {
        tokio::task::block_in_place(|| stack.stop());
    }
}

fn stamp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

async fn phases(
    opts: &Opts,
    dir: &Path,
    log_dir: &Path,
    bin_dir: &Path,
    stack: &Stack,
) -> Result<Vec<Row>, String> {
    let shape = Shape {
        rate: opts.rate,
        duration: opts.duration,
        zipf_s: opts.zipf_s,
        max_in_flight: 4_096,
        seed: 16,
    };
    let run_id = format!("bench-{}", stamp());

    // The baseline: the bare handler, same load, same broker.
    let bare = {
        let mut proc = spawn_bare(bin_dir, log_dir, stack)?;
        let convs: Vec<Conv> = (0..opts.conversations)
            .map(|i| Conv {
                id: format!("{run_id}-bare-c{i}"),
                token: None,
            })
            .collect();
        let load = OpenLoop::new(
            &format!("http://{BARE_ADDR}"),
            &format!("{run_id}-bare"),
            convs,
        );
        load.warm_up(Duration::from_secs(60)).await?;
        let mut watched = stack.watched();
        watched.push(Watched {
            name: "bare gateway".into(),
            pid: proc.child.id(),
            with_children: false,
        });
        let bare_shape = Shape {
            duration: opts.bare_duration.unwrap_or(opts.duration),
            ..shape
        };
        println!(
            "bench: bare path: {} msg/s for {:?} over {} conversations (Zipf s = {})",
            opts.rate, bare_shape.duration, opts.conversations, opts.zipf_s
        );
        let rest = at_rest("bare path", &watched).await;
        let m = measured(&load, bare_shape, Duration::ZERO, &watched, rest).await;
        println!("bench: bare path: cpu {}", m.profile);
        println!("bench: bare path: cpu per message {}", m.per_message);
        let (ceiling, ceiling_errors) = load.ceiling(opts.ceiling_workers, opts.ceiling, 17).await;
        println!("bench: bare path: ceiling {ceiling:.0} msg/s ({ceiling_errors} failed)");
        proc.terminate(Duration::from_secs(5));
        (m, ceiling)
    };
    tokio::task::block_in_place(|| stack.reset_statements());

    // The platform.
    let (mut platform, secret) = start_platform(dir, log_dir, bin_dir, stack, &opts.env)?;
    let result = measure_platform(opts, shape, &run_id, &secret, &mut platform, stack).await;
    let exited = platform.exited();
    platform.stop();
    let (ours, ours_ceiling) = result?;
    if !exited.is_empty() {
        return Err(format!("exited during the load: {}", exited.join(", ")));
    }
    Ok(rows(opts, &ours, &bare.0, ours_ceiling, bare.1))
}

async fn measure_platform(
    opts: &Opts,
    shape: Shape,
    run_id: &str,
    secret: &str,
    platform: &mut Platform,
    stack: &Stack,
) -> Result<(Measured, f64), String> {
    wait_ready(platform).await?;
    let convs = conversations(secret, &format!("{run_id}-c"), opts.conversations)?;
    let base = platform.gateway_urls()[0].clone();
    let mut load = OpenLoop::new(&base, run_id, convs);
    load.follow(Duration::from_secs(120)).await?;
    load.warm_up(Duration::from_secs(120)).await?;
    let mut watched = stack.watched();
    for (s, p) in platform.services.iter().zip(&platform.procs) {
        watched.push(Watched {
            name: s.name.to_owned(),
            pid: p.child.id(),
            with_children: false,
        });
    }
    let rest = at_rest("platform", &watched).await;
    println!(
        "bench: platform: {} SSE streams open; {} msg/s for {:?} (Zipf s = {})",
        opts.conversations, opts.rate, opts.duration, opts.zipf_s
    );
    let (m, points) = tokio::join!(
        measured(&load, shape, Duration::from_secs(60), &watched, rest),
        drift_points(stack, &watched, opts.duration)
    );
    println!("bench: platform: cpu {}", m.profile);
    let clusters = ["platform", "tansu storage"];
    if let [a, b, c, d] = &points[..] {
        println!(
            "bench: platform: drift, first third of the load against the last ({:?} each)\n{}",
            opts.duration / 3,
            drift::report(&clusters, &watched, [a, b, c, d], opts.duration / 3)
        );
    }
    println!("bench: platform: cpu per message {}", m.per_message);
    let statements = tokio::task::block_in_place(|| stack.top_statements());
    println!("bench: platform: time in PostgreSQL during the load\n{statements}");
    let tables = tokio::task::block_in_place(|| {
        format!(
            "  platform:\n{}  tansu storage:\n{}",
            drift::tables(&stack.pg, DB),
            drift::tables(&stack.broker_pg, "tansu")
        )
    });
    println!("bench: platform: largest tables after the load\n{tables}");
    let (ceiling, ceiling_errors) = load.ceiling(opts.ceiling_workers, opts.ceiling, 18).await;
    println!("bench: platform: ceiling {ceiling:.0} msg/s ({ceiling_errors} failed)");
    load.stop().await;
    Ok((m, ceiling))
}

/// The stack's statements and CPU at the start of the load and after each
/// third of `duration` (four points; fewer if a read fails to finish).
async fn drift_points(stack: &Stack, watched: &[Watched], duration: Duration) -> Vec<Point> {
    let start = Instant::now();
    let mut points = Vec::with_capacity(4);
    for k in 0..4u32 {
        tokio::time::sleep_until(start + duration * k / 3).await;
        let (pg, broker_pg, w) = (stack.pg.clone(), stack.broker_pg.clone(), watched.to_vec());
        let point = tokio::task::spawn_blocking(move || Point {
            cpu: cpu::sample(&w),
            statements: vec![
                Statements::read(&pg, DB),
                Statements::read(&broker_pg, "tansu"),
            ],
        })
        .await;
        match point {
            Ok(p) => points.push(p),
            Err(e) => println!("bench: drift: a sample failed: {e}"),
        }
    }
    points
}

/// The bare gateway (the baseline), started and listening.
fn spawn_bare(bin_dir: &Path, log_dir: &Path, stack: &Stack) -> Result<Proc, String> {
    let mut cmd = Command::new(bin_dir.join("soma-bare-gateway"));
    cmd.args([BARE_ADDR, &stack.broker.addr(), "bench.bare"]);
    let proc = Proc::spawn("soma-bare-gateway", cmd, &log_dir.join("bare-gateway.log"))?;
    tokio::task::block_in_place(|| {
        deps::wait_port("bare gateway", BARE_ADDR, Duration::from_secs(60))
    })?;
    Ok(proc)
}

/// The platform's services on the private stack, with a fresh token
/// issuer (returned: its secret) and `env` as extra `SOMA_*` overrides.
fn start_platform(
    dir: &Path,
    log_dir: &Path,
    bin_dir: &Path,
    stack: &Stack,
    env: &[(String, String)],
) -> Result<(Platform, String), String> {
    let secret = platform::random_hex()?;
    let issuer_file = dir.join("issuer.toml");
    fs::write(&issuer_file, platform::issuer_toml(&secret)).map_err(|e| e.to_string())?;
    let mut extra = vec![
        // One tenant per conversation at up to hundreds of messages a
        // second: the shipped limit (120 a minute) would refuse most.
        ("SOMA_CHAT__RATE_LIMIT".to_owned(), "1000000".to_owned()),
    ];
    extra.extend(env.iter().cloned());
    let wiring = Wiring {
        postgres_url: stack.pg.url(DB),
        redis_url: format!("redis://{}", stack.redis.addr()),
        bootstrap: stack.broker.addr(),
        somabrain_url: format!("http://{SOMABRAIN_ADDR}"),
        issuer_file,
        source: root(),
        port_offset: PORT_OFFSET,
        extra_env: extra,
    };
    Ok((Platform::start(bin_dir, log_dir, &wiring, false)?, secret))
}

/// Waits until every service of `platform` is ready (120 s at most).
async fn wait_ready(platform: &Platform) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let not_ready = tokio::task::block_in_place(|| platform.not_ready());
        if not_ready.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after 120 s: {}", not_ready.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `n` conversations `{prefix}{i}`, each of its own tenant and user, with
/// a token the platform's issuer signed.
fn conversations(secret: &str, prefix: &str, n: usize) -> Result<Vec<Conv>, String> {
    (0..n)
        .map(|i| {
            platform::token(
                secret,
                &format!("bench-user-{i}"),
                &format!("bench-{i}"),
                &["user".to_owned()],
            )
            .map(|t| Conv {
                id: format!("{prefix}{i}"),
                token: Some(t),
            })
        })
        .collect()
}

/// A load's outcome and what it cost.
struct Measured {
    report: Report,
    /// CPU per process group, percent of one core (printable).
    profile: String,
    /// CPU milliseconds per accepted message, by group (printable).
    per_message: String,
    /// CPU milliseconds per accepted message, the stack's total.
    stack_ms_per_message: Option<f64>,
    /// Cores the stack used at rest just before the load (streams open, no
    /// messages): its fixed cost, polling included.
    rest_cores: f64,
    /// CPU milliseconds per accepted message above that fixed cost: the
    /// load's marginal cost.
    marginal_ms_per_message: Option<f64>,
}

/// How long the stack is watched at rest before a load.
const REST: Duration = Duration::from_secs(15);

/// Cores the watched stack (the load generator aside) uses over `REST`
/// with no load: printed with its profile, returned.
async fn at_rest(what: &str, watched: &[Watched]) -> f64 {
    let before = cpu::sample(watched);
    let t = Instant::now();
    tokio::time::sleep(REST).await;
    let after = cpu::sample(watched);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "bench: {what}: at rest for {:?} (no messages): cpu {}",
        REST,
        cpu::report(watched, &before, &after, secs)
    );
    cpu::stack_secs(watched, &before, &after) / secs
}

/// The load with CPU sampled around it (load and drain); prints the
/// outcome.
async fn measured(
    load: &OpenLoop,
    shape: Shape,
    drain: Duration,
    watched: &[Watched],
    rest_cores: f64,
) -> Measured {
    let before = cpu::sample(watched);
    let t = std::time::Instant::now();
    let report = load.run(shape, drain).await;
    let after = cpu::sample(watched);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "bench:   offered {} accepted {} ({:.0}/s), deferred {}, errors {:?}, completed {}, \
         sse reconnects {}",
        report.offered,
        report.accepted,
        report.accepted_per_sec,
        report.deferred,
        report.errors,
        report.completed,
        report.sse_reconnects
    );
    let stack_secs = cpu::stack_secs(watched, &before, &after);
    let stack_ms_per_message =
        (report.accepted > 0).then(|| stack_secs * 1e3 / report.accepted as f64);
    let marginal_ms_per_message = (report.accepted > 0)
        .then(|| (stack_secs - rest_cores * secs).max(0.0) * 1e3 / report.accepted as f64);
    Measured {
        rest_cores,
        marginal_ms_per_message,
        profile: cpu::report(watched, &before, &after, secs),
        per_message: cpu::per_message(watched, &before, &after, report.accepted),
        stack_ms_per_message,
        report,
    }
}

/// The baseline's name in the platform rows.
const BARE: &str = "bare axum+producer";
/// The goal rate: what the measured cost per message says about
/// reaching it on this machine's cores.
const GOAL_RATE: f64 = 500.0;

/// The platform group's rows, family by family: throughput and POST
/// latency, replies, errors, decay, the closed-loop ceiling, CPU cost.
fn rows(
    opts: &Opts,
    ours_m: &Measured,
    bare_m: &Measured,
    ours_ceiling: f64,
    bare_ceiling: f64,
) -> Vec<Row> {
    let mut rows = post_rows(opts, &ours_m.report, &bare_m.report);
    rows.extend(reply_rows(&ours_m.report));
    rows.extend(error_rows(&ours_m.report, &bare_m.report));
    rows.extend(decay_rows(&ours_m.report, &bare_m.report));
    rows.push(ceiling_row(opts, ours_ceiling, bare_ceiling));
    rows.extend(cpu_rows(ours_m, bare_m));
    rows
}

fn row(what: &str, unit: &str) -> Row {
    Row::new(GROUP, what, unit)
}

/// `n` as a percentage of `of`; `None` when `of` is 0.
fn share(n: u64, of: u64) -> Option<f64> {
    (of > 0).then(|| n as f64 / of as f64 * 100.0)
}

/// `a / b` when both are known and `b` is positive.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Messages accepted under the open loop, and the POST's latency.
fn post_rows(opts: &Opts, ours: &Report, bare: &Report) -> Vec<Row> {
    vec![
        row(
            &format!(
                "chat messages accepted, open loop {}/s × {} s, {} conversations (Zipf {})",
                opts.rate,
                opts.duration.as_secs(),
                opts.conversations,
                opts.zipf_s
            ),
            "msg/s",
        )
        .ours(Some(ours.accepted_per_sec))
        .baseline(BARE, Some(bare.accepted_per_sec))
        .goal(Goal::AtLeast(500.0)),
        row("POST latency p50", "ms")
            .ours(ours.post_p50_ms)
            .baseline(BARE, bare.post_p50_ms),
        row("POST latency p99", "ms")
            .ours(ours.post_p99_ms)
            .baseline(BARE, bare.post_p99_ms)
            .goal(Goal::AtMost(50.0)),
        row("POST latency max", "ms")
            .ours(ours.post_max_ms)
            .baseline(BARE, bare.post_max_ms),
    ]
}

/// Time to the first reply event and to `assistant.completed`, and the
/// replies completed (ours only: the bare path sends no replies).
fn reply_rows(ours: &Report) -> Vec<Row> {
    vec![
        row("send → first reply event p50", "ms").ours(ours.first_p50_ms),
        row("send → first reply event p99", "ms")
            .ours(ours.first_p99_ms)
            .goal(Goal::AtMost(100.0)),
        row("send → assistant.completed p50", "ms").ours(ours.completed_p50_ms),
        row("send → assistant.completed p99", "ms")
            .ours(ours.completed_p99_ms)
            .goal(Goal::AtMost(500.0)),
        row("replies completed of accepted", "%")
            .ours(share(ours.completed, ours.accepted))
            .goal(Goal::AtLeast(100.0)),
    ]
}

/// Failed sends, and sends the outbox deferred with the broker up.
fn error_rows(ours: &Report, bare: &Report) -> Vec<Row> {
    vec![
        row("errors (non-202 answers, transport)", "")
            .ours(Some(ours.error_count() as f64))
            .baseline(BARE, Some(bare.error_count() as f64))
            .goal(Goal::AtMost(0.0)),
        row("deferred (outbox) share, broker up", "%")
            .ours(share(ours.deferred, ours.accepted))
            .goal(Goal::AtMost(0.0)),
    ]
}

/// Latency at the end of the load against its start.
fn decay_rows(ours: &Report, bare: &Report) -> Vec<Row> {
    vec![
        row("decay: POST p99, last third / first third", "×")
            .ours(ratio(ours.post_p99_last_ms, ours.post_p99_first_ms))
            .baseline(BARE, ratio(bare.post_p99_last_ms, bare.post_p99_first_ms))
            .goal(Goal::AtMost(1.5)),
        row("decay: send → completed p99, last third / first third", "×")
            .ours(ratio(
                ours.completed_p99_last_ms,
                ours.completed_p99_first_ms,
            ))
            .goal(Goal::AtMost(1.5)),
    ]
}

/// Messages accepted under the closed loop.
fn ceiling_row(opts: &Opts, ours_ceiling: f64, bare_ceiling: f64) -> Row {
    row(
        &format!(
            "ceiling: accepted, closed loop {} clients × {} s",
            opts.ceiling_workers,
            opts.ceiling.as_secs()
        ),
        "msg/s",
    )
    .ours(Some(ours_ceiling))
    .baseline(BARE, Some(bare_ceiling))
    .goal(Goal::RatioAtLeast(0.5))
}

/// CPU per message, at rest and above rest, and the cores `GOAL_RATE`
/// would need on this machine.
fn cpu_rows(ours_m: &Measured, bare_m: &Measured) -> Vec<Row> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    vec![
        row(
            "CPU per accepted message, stack processes, load + drain",
            "ms",
        )
        .ours(ours_m.stack_ms_per_message)
        .baseline(BARE, bare_m.stack_ms_per_message),
        row(
            &format!("cores the stack needs for {GOAL_RATE}/s at that cost (machine: {cores})"),
            "cores",
        )
        .ours(ours_m.stack_ms_per_message.map(|ms| ms * GOAL_RATE / 1e3))
        .baseline(
            BARE,
            bare_m.stack_ms_per_message.map(|ms| ms * GOAL_RATE / 1e3),
        )
        .goal(Goal::AtMost(cores)),
        row(
            "stack CPU at rest before the load (streams open, no messages)",
            "cores",
        )
        .ours(Some(ours_m.rest_cores))
        .baseline(BARE, Some(bare_m.rest_cores)),
        row("CPU per accepted message above the stack at rest", "ms")
            .ours(ours_m.marginal_ms_per_message)
            .baseline(BARE, bare_m.marginal_ms_per_message),
        row(
            &format!("cores for {GOAL_RATE}/s: at rest + {GOAL_RATE} × cost above rest"),
            "cores",
        )
        .ours(cores_for(GOAL_RATE, ours_m))
        .baseline(BARE, cores_for(GOAL_RATE, bare_m))
        .goal(Goal::AtMost(cores)),
    ]
}

/// Cores a stack would need at `rate` messages a second: its fixed cost at
/// rest plus `rate` times its marginal cost per message.
fn cores_for(rate: f64, m: &Measured) -> Option<f64> {
    m.marginal_ms_per_message
        .map(|ms| m.rest_cores + rate * ms / 1e3)
}
