//! `cargo xtask chaos`: the durable chat path proven on the running platform.
//!
//! The promise under test: a chat message the gateway accepted with `202`
//! is answered, in per-conversation order, exactly once as the client sees
//! it, whatever fails underneath. The harness starts a private stack
//! (PostgreSQL, Redis and tansu on their own loopback ports, data in
//! `.stack/chaos/`), the four platform binaries as processes against it,
//! and per scenario: a fresh database, broker and Redis; the services; one
//! SSE stream per conversation; a load of chat messages; one fault in one
//! dependency; then it waits for the platform to recover on its own (it
//! never restarts a platform service) and reads the ground truth (the
//! replies topic from the beginning, the outbox tables, the DLQ topics).
//!
//! See the README's "Chaos" section for the scenarios and pass criteria.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::load::{self, Conversation, Load, Observed};
use crate::{platform, root, run};

pub(crate) mod deps;
pub(crate) mod services;
mod stress;
mod truth;

use deps::{Broker, MemoryService, Postgres, Redis, Storage};
use services::{GATEWAY_A, GATEWAY_B, Platform, Wiring};

const USAGE: &str = "usage: cargo xtask chaos [--short] [--scenario NAME]... [--keep] \
[--storage postgres|sqlite] [--broker-schema FILE] [--bin-dir DIR [--platform-root DIR]]
       cargo xtask chaos --stress [N]   (the bus/outbox conformance suite, N copies at once; default 3)

scenarios: broker-kill, broker-outage, postgres-restart, redis-restart, somabrain-down, rolling-restart";

const PG_PORT: u16 = 25432;
const BROKER_PG_PORT: u16 = 25433;
const REDIS_PORT: u16 = 26379;
const BROKER_PORT: u16 = 29092;
/// The private memory service (the SomaBrain stand-in).
const SOMABRAIN_ADDR: &str = "127.0.0.1:29696";
const DB: &str = "chaos";
/// Topics of `examples/platform/config/local.toml` (defaults).
const EVENTS_TOPIC: &str = "chat.events";
const REQUESTS_TOPIC: &str = "chat.requests";
const MEMORY_TOPIC: &str = "memory.writes";
const TOPICS: [&str; 5] = [
    "chat.requests",
    "chat.events",
    "memory.writes",
    "tool.requests",
    "config.updates",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    BrokerKill,
    BrokerOutage,
    PostgresRestart,
    RedisRestart,
    SomabrainDown,
    RollingRestart,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::BrokerKill,
        Scenario::BrokerOutage,
        Scenario::PostgresRestart,
        Scenario::RedisRestart,
        Scenario::SomabrainDown,
        Scenario::RollingRestart,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::BrokerKill => "broker-kill",
            Scenario::BrokerOutage => "broker-outage",
            Scenario::PostgresRestart => "postgres-restart",
            Scenario::RedisRestart => "redis-restart",
            Scenario::SomabrainDown => "somabrain-down",
            Scenario::RollingRestart => "rolling-restart",
        }
    }
}

/// Sizes of the load and the faults.
#[derive(Debug, Clone, Copy)]
struct Plan {
    burst: u64,
    conversations: usize,
    broker_down: Duration,
    outage: Duration,
    outage_messages: u64,
    brain_window: Duration,
    brain_messages: u64,
    /// How long the steady stream of a rolling restart lasts.
    rolling_window: Duration,
    /// How long to wait for recovery before calling it failed.
    recover_limit: Duration,
}

impl Plan {
    fn full() -> Self {
        Self {
            burst: 1_000,
            conversations: 50,
            broker_down: Duration::from_secs(10),
            outage: Duration::from_secs(300),
            outage_messages: 2_000,
            brain_window: Duration::from_secs(120),
            brain_messages: 600,
            rolling_window: Duration::from_secs(180),
            recover_limit: Duration::from_secs(240),
        }
    }

    fn short() -> Self {
        Self {
            burst: 200,
            conversations: 20,
            broker_down: Duration::from_secs(10),
            outage: Duration::from_secs(35),
            outage_messages: 300,
            brain_window: Duration::from_secs(30),
            brain_messages: 150,
            rolling_window: Duration::from_secs(60),
            recover_limit: Duration::from_secs(120),
        }
    }
}

struct Opts {
    plan: Plan,
    short: bool,
    keep: bool,
    storage: Storage,
    broker_schema: Option<PathBuf>,
    /// Prebuilt platform binaries (default: build this checkout's).
    bin_dir: Option<PathBuf>,
    /// The checkout those binaries were built from (default: this one).
    platform_root: PathBuf,
    scenarios: Vec<Scenario>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        plan: Plan::full(),
        short: false,
        keep: false,
        // What `cargo xtask stack up` runs: tansu on PostgreSQL storage,
        // with the schema the stack creates for it.
        storage: Storage::Postgres,
        broker_schema: Some(root().join("xtask/stack.d/tansu-pg-schema.sql")),
        bin_dir: None,
        platform_root: root(),
        scenarios: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| USAGE.to_owned());
        match a.as_str() {
            "--short" => {
                o.short = true;
                o.plan = Plan::short();
            }
            "--keep" => o.keep = true,
            "--storage" => {
                o.storage = match value()?.as_str() {
                    "sqlite" => Storage::Sqlite,
                    "postgres" => Storage::Postgres,
                    other => return Err(format!("unknown storage `{other}`\n{USAGE}")),
                }
            }
            "--broker-schema" => o.broker_schema = Some(PathBuf::from(value()?)),
            "--bin-dir" => o.bin_dir = Some(PathBuf::from(value()?)),
            "--platform-root" => o.platform_root = PathBuf::from(value()?),
            "--scenario" => {
                let name = value()?;
                let s = Scenario::ALL
                    .into_iter()
                    .find(|s| s.name() == name)
                    .ok_or_else(|| format!("unknown scenario `{name}`\n{USAGE}"))?;
                o.scenarios.push(s);
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = Scenario::ALL.to_vec();
    }
    Ok(o)
}

pub(crate) fn cli(args: &[String]) -> Result<(), String> {
    if args.first().is_some_and(|a| a == "--stress") {
        let copies = match args.get(1..) {
            Some([]) | None => 3,
            Some([n]) => n
                .parse()
                .map_err(|_| format!("--stress takes a count\n{USAGE}"))?,
            Some(_) => return Err(USAGE.to_owned()),
        };
        return stress::run(copies);
    }
    let opts = parse(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(main(opts))
}

/// The private stack and what every scenario needs.
struct Ctx {
    dir: PathBuf,
    bin_dir: PathBuf,
    pg: Postgres,
    broker_pg: Option<Postgres>,
    redis: Redis,
    broker: Broker,
    memory: MemoryService,
    secret: String,
    issuer_file: PathBuf,
    opts: Opts,
}

async fn main(opts: Opts) -> Result<(), String> {
    let mut ctx = Ctx::prepare(opts)?;
    announce_stack(&ctx);
    let rows = run_scenarios(&mut ctx).await;
    if !ctx.opts.keep {
        stop_stack(&mut ctx);
    } else {
        println!(
            "\nchaos: --keep: the private stack is still up (platform services stopped); \
             logs in {}",
            ctx.dir.display()
        );
    }
    print_table(&rows);
    let path = write_json(&ctx, &rows)?;
    println!("chaos: table written to {}", path.display());
    if rows.iter().all(|r| r.pass) {
        Ok(())
    } else {
        Err(format!(
            "{} of {} scenarios failed",
            rows.iter().filter(|r| !r.pass).count(),
            rows.len()
        ))
    }
}

impl Ctx {
    /// Lays out the private stack in `.stack/chaos/`: the platform binaries,
    /// the token issuer's secret and a handle per dependency (none started).
    fn prepare(opts: Opts) -> Result<Self, String> {
        let dir = root().join(".stack").join("chaos");
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let bin_dir = platform_binaries(&opts)?;
        truth::set_reader(bin_dir.join("soma-topic-dump"));
        let secret = platform::random_hex()?;
        let issuer_file = dir.join("issuer.toml");
        fs::write(&issuer_file, platform::issuer_toml(&secret)).map_err(|e| e.to_string())?;
        let (broker_pg, storage_url) = match opts.storage {
            Storage::Sqlite => (None, "sqlite://tansu.db".to_owned()),
            Storage::Postgres => {
                let pg = Postgres::new("broker-pg", &dir, BROKER_PG_PORT);
                let url = pg.url("tansu");
                (Some(pg), url)
            }
        };
        let pg = Postgres::new("pg", &dir, PG_PORT);
        let memory = MemoryService::new(
            SOMABRAIN_ADDR,
            bin_dir.join("soma-memory-service"),
            opts.platform_root
                .join("examples/memory-service/config/local.toml"),
            pg.url(DB),
        );
        Ok(Ctx {
            pg,
            memory,
            broker_pg,
            redis: Redis::new(&dir, REDIS_PORT),
            broker: Broker::new(&dir, BROKER_PORT, storage_url),
            dir,
            bin_dir,
            secret,
            issuer_file,
            opts,
        })
    }
}

/// The directory of the platform binaries: `--bin-dir`'s prebuilt ones, or
/// this checkout's, built now.
fn platform_binaries(opts: &Opts) -> Result<PathBuf, String> {
    Ok(match &opts.bin_dir {
        Some(dir) => dir.clone(),
        None => {
            println!("chaos: building the platform binaries");
            run(
                "cargo",
                &[
                    "build",
                    "--quiet",
                    "-p",
                    "soma-example-platform",
                    "-p",
                    "soma-memory-service",
                    "-p",
                    "soma-topic-dump",
                    "--bins",
                ],
            )?;
            platform::target_dir().join("debug")
        }
    })
}

/// Prints where the private stack lives and on which ports it listens.
fn announce_stack(ctx: &Ctx) {
    println!(
        "chaos: private stack in {} (PostgreSQL {PG_PORT}, Redis {REDIS_PORT}, tansu {BROKER_PORT} \
         with {} storage); gateway {}; memory service (SomaBrain) {SOMABRAIN_ADDR}",
        ctx.dir.display(),
        match ctx.opts.storage {
            Storage::Sqlite => "SQLite",
            Storage::Postgres => "PostgreSQL",
        },
        GATEWAY_A.api.unwrap_or_default(),
    );
}

/// Runs the chosen scenarios one after another, a row each; a failed one
/// prints its services' logs.
async fn run_scenarios(ctx: &mut Ctx) -> Vec<Row> {
    let mut rows = Vec::new();
    let scenarios = ctx.opts.scenarios.clone();
    for s in scenarios {
        println!("\n==> chaos: {}", s.name());
        let started = Instant::now();
        let row = match scenario(ctx, s).await {
            Ok(row) => row,
            Err(e) => Row::broken(s, e),
        };
        print_outcome(s, &row, started);
        if !row.pass {
            print_logs(ctx, s);
        }
        rows.push(row);
    }
    rows
}

/// The one-line verdict of a scenario that began at `started`.
fn print_outcome(s: Scenario, row: &Row, started: Instant) {
    println!(
        "==> chaos: {} {} in {:.0} s: accepted {}, delivered {}, dupes {}, order {}, \
         dead {}, ready {}, recover {}",
        s.name(),
        if row.pass { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        row.accepted,
        row.delivered,
        row.duplicates,
        row.order_violations,
        row.dead_lettered,
        secs(row.ready_secs),
        secs(row.recover_secs)
    );
}

fn stop_stack(ctx: &mut Ctx) {
    ctx.memory.stop();
    ctx.broker.stop();
    ctx.redis.stop();
    let _ = ctx.pg.stop();
    if let Some(pg) = &ctx.broker_pg {
        let _ = pg.stop();
    }
}

/// A fresh stack for one scenario: empty database, broker storage and Redis.
fn fresh_stack(ctx: &mut Ctx, log_dir: &Path) -> Result<(), String> {
    ctx.memory.stop();
    ctx.broker.stop();
    ctx.redis.stop();
    ctx.pg.start()?;
    ctx.pg.recreate_db(DB)?;
    match &ctx.broker_pg {
        None => ctx.broker.wipe()?,
        Some(pg) => {
            pg.start()?;
            pg.recreate_db("tansu")?;
            let schema = ctx.opts.broker_schema.as_deref().unwrap_or(Path::new(""));
            pg.psql_file("tansu", schema)?;
        }
    }
    ctx.redis.log = log_dir.join("redis.log");
    ctx.broker.log = log_dir.join("tansu.log");
    ctx.memory.log = log_dir.join("memory-service.log");
    ctx.redis.start()?;
    ctx.broker.start()?;
    ctx.memory.start()
}

/// One row of the table.
#[derive(Debug, Default)]
struct Row {
    scenario: &'static str,
    accepted: u64,
    delivered: u64,
    seen_on_sse: u64,
    duplicates: u64,
    order_violations: u64,
    dead_lettered: u64,
    /// Accepted messages whose memory write landed in the memory service.
    remembered: u64,
    pending_outbox: u64,
    ready_secs: Option<f64>,
    recover_secs: Option<f64>,
    restarted_by_hand: u64,
    errors: BTreeMap<String, u64>,
    /// Sends one gateway failed and the other accepted at once.
    failovers: u64,
    gave_up: u64,
    notes: Vec<String>,
    pass: bool,
}

impl Row {
    /// Client-visible errors: failed attempts no other gateway answered in
    /// their place, plus sends given up on.
    fn client_errors(&self) -> u64 {
        self.errors.values().sum::<u64>() + self.gave_up
    }

    fn broken(s: Scenario, e: String) -> Self {
        Row {
            scenario: s.name(),
            notes: vec![format!("the scenario could not run: {e}")],
            ..Row::default()
        }
    }
}

async fn scenario(ctx: &mut Ctx, s: Scenario) -> Result<Row, String> {
    let log_dir = ctx.dir.join(s.name());
    let _ = fs::remove_dir_all(&log_dir);
    fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    tokio::task::block_in_place(|| fresh_stack(ctx, &log_dir))?;
    let wiring = Wiring {
        postgres_url: ctx.pg.url(DB),
        redis_url: format!("redis://{}", ctx.redis.addr()),
        bootstrap: ctx.broker.addr(),
        somabrain_url: format!("http://{SOMABRAIN_ADDR}"),
        issuer_file: ctx.issuer_file.clone(),
        source: ctx.opts.platform_root.clone(),
        port_offset: 0,
        // One sizing change: `chat.sse_buffer` holds a whole burst's reply
        // events, so a client reading 50 streams at once while the backlog
        // drains does not fall behind its channels (a stream that does is
        // resumed from the session event store, one PostgreSQL read per
        // resume — correct, but load the harness should not add to the
        // fault it measures). The benchmarks run the shipped sizing.
        extra_env: vec![("SOMA_CHAT__SSE_BUFFER".to_owned(), "65536".to_owned())],
    };
    // A deploy is judged behind two gateways (no client error at all); the
    // dependency faults run with one.
    let two_gateways = s == Scenario::RollingRestart;
    let mut platform = Platform::start(&ctx.bin_dir, &log_dir, &wiring, two_gateways)?;
    let result = drive(ctx, &mut platform, s).await;
    let exited = platform.exited();
    platform.stop();
    let mut row = result?;
    if !exited.is_empty() {
        row.notes.push(format!(
            "exited during the scenario (not restarted): {}",
            exited.join(", ")
        ));
        row.pass = false;
    }
    Ok(row)
}

async fn wait_ready(platform: &Platform, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let not_ready = tokio::task::block_in_place(|| platform.not_ready());
        if not_ready.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not ready {within:?} after start: {}",
                not_ready.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts the load, injects the fault, waits for recovery, counts.
async fn drive(ctx: &mut Ctx, platform: &mut Platform, s: Scenario) -> Result<Row, String> {
    wait_ready(platform, Duration::from_secs(90)).await?;
    let plan = ctx.opts.plan;
    let mut load = start_load(ctx, platform, s).await?;

    let mut notes = Vec::new();
    let back_at = fault(ctx, platform, s, &mut load, &mut notes).await?;
    let (ready_secs, recover_secs) =
        recover(ctx, platform, &load, back_at, plan.recover_limit).await;
    if recover_secs.is_none() {
        notes.push(stuck(ctx, platform, &load, plan.recover_limit).await);
    }
    // Late duplicates would arrive now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let truth = read_truth(ctx, &mut notes);
    let unknown = truth.is_none();
    let truth = truth.unwrap_or_default();
    let_sse_catch_up(&load, &truth).await;
    load.stop().await;
    let hub_consumed = tokio::task::block_in_place(|| platform.gateway_consumed(EVENTS_TOPIC));
    let observed = load.observed.lock().await;
    if sse_behind(&observed, &truth) {
        for (gateway, n) in hub_consumed {
            notes.push(format!(
                "{gateway}'s SSE hub consumed {n} of the {} records in {EVENTS_TOPIC}",
                truth.replies.records
            ));
        }
    }
    let mut row = count(s, &observed, &truth, notes);
    row.ready_secs = ready_secs;
    row.recover_secs = recover_secs;
    judge(&mut row);
    // Behind two gateways a deploy shows the client no error at all: a
    // gateway refusing or draining is routed around (a failover).
    if s == Scenario::RollingRestart && row.client_errors() > 0 {
        row.notes.push(format!(
            "{} client-visible errors behind two gateways (must be 0)",
            row.client_errors()
        ));
        row.pass = false;
    }
    row.pass &= !unknown;
    Ok(row)
}

/// Opens one SSE stream per conversation (a tenant each) and waits until a
/// warm-up reply streams back: the load is ready to send.
async fn start_load(ctx: &Ctx, platform: &Platform, s: Scenario) -> Result<Load, String> {
    let run = format!(
        "{}-{}",
        s.name(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    );
    let conversations: Vec<Conversation> = (0..ctx.opts.plan.conversations)
        .map(|i| {
            // One tenant per conversation: the shipped per-tenant rate limit
            // (chat.rate_limit per minute) stays as configured.
            let token = platform::token(
                &ctx.secret,
                &format!("chaos-user-{i}"),
                &format!("chaos-{i}"),
                &["user".to_owned()],
            );
            token.map(|token| Conversation {
                id: format!("{run}-c{i}"),
                token,
            })
        })
        .collect::<Result<_, _>>()?;
    let warm = conversations[0].clone();
    let mut load = Load::new(&platform.gateway_urls(), &run, conversations);
    load.listen(Duration::from_secs(30)).await?;
    warm_up(&load, &warm).await?;
    println!(
        "chaos: {}: SSE streams open, replies flowing; load starts",
        s.name()
    );
    Ok(load)
}

/// The ground truth, or `None` with a note saying the row is the client's
/// view only.
fn read_truth(ctx: &Ctx, notes: &mut Vec<String>) -> Option<Truth> {
    match tokio::task::block_in_place(|| Truth::read(ctx)) {
        Ok(t) => Some(t),
        Err(e) => {
            notes.push(format!(
                "ground truth unreadable, the row is the client's view only: {e}"
            ));
            None
        }
    }
}

/// Whether an accepted message has its reply in the topic but not on SSE.
fn sse_behind(observed: &Observed, truth: &Truth) -> bool {
    observed
        .accepted
        .keys()
        .any(|id| truth.replies.completed.contains_key(id) && !observed.completed.contains_key(id))
}

/// The SSE streams trail the topic a little: gives them up to 15 s to show
/// what the topic had when it was read.
async fn let_sse_catch_up(load: &Load, truth: &Truth) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let o = load.observed.lock().await;
        let behind = sse_behind(&o, truth);
        drop(o);
        if !behind {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SSE is live only and the gateway's reply consumer starts at the end of
/// the topic once it has its partitions: send warm-up messages until one
/// reply streams back.
async fn warm_up(load: &Load, warm: &Conversation) -> Result<(), String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let id = load.probe(warm).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if load.observed.lock().await.completed.contains_key(&id) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Err("no warm-up reply reached the SSE stream within 120 s".to_owned())
}

/// Runs the scenario's load and fault; returns when the dependency was back.
async fn fault(
    ctx: &mut Ctx,
    platform: &mut Platform,
    s: Scenario,
    load: &mut Load,
    notes: &mut Vec<String>,
) -> Result<Instant, String> {
    let plan = ctx.opts.plan;
    match s {
        Scenario::BrokerKill => broker_kill(ctx, load).await,
        Scenario::BrokerOutage => {
            outage(
                ctx,
                load,
                Dependency::Broker,
                plan.outage_messages,
                plan.outage,
                notes,
            )
            .await
        }
        Scenario::PostgresRestart => {
            restart_mid_burst(ctx, load, "pg_ctl restart -m fast", |ctx| ctx.pg.restart()).await
        }
        Scenario::RedisRestart => {
            restart_mid_burst(ctx, load, "Redis restarted", |ctx| {
                ctx.redis.stop();
                ctx.redis.start()
            })
            .await
        }
        Scenario::SomabrainDown => {
            let (n, window) = (plan.brain_messages, plan.brain_window);
            outage(ctx, load, Dependency::Somabrain, n, window, notes).await
        }
        Scenario::RollingRestart => rolling_restart(platform, load, plan, notes).await,
    }
}

/// A burst of messages; a fifth in, the broker is killed (`kill -9`), down
/// for `broker_down`, then started again. Returns when it was back.
async fn broker_kill(ctx: &mut Ctx, load: &mut Load) -> Result<Instant, String> {
    let plan = ctx.opts.plan;
    let sending = load.send(plan.burst, None, plan.recover_limit);
    wait_accepted(load, plan.burst / 5).await;
    ctx.broker.kill9();
    println!(
        "chaos: broker killed (kill -9) after {} accepted",
        accepted(load).await
    );
    tokio::time::sleep(plan.broker_down).await;
    tokio::task::block_in_place(|| ctx.broker.start())?;
    let back = Instant::now();
    println!("chaos: broker restarted after {:?}", plan.broker_down);
    let _ = sending.await;
    Ok(back)
}

/// A burst of messages; a quarter in, `restart` runs (announced as `what`).
/// Returns when it had finished.
async fn restart_mid_burst(
    ctx: &mut Ctx,
    load: &mut Load,
    what: &str,
    restart: impl FnOnce(&mut Ctx) -> Result<(), String>,
) -> Result<Instant, String> {
    let plan = ctx.opts.plan;
    let sending = load.send(plan.burst, None, plan.recover_limit);
    wait_accepted(load, plan.burst / 4).await;
    println!("chaos: {what} after {} accepted", accepted(load).await);
    tokio::task::block_in_place(|| restart(ctx))?;
    let back = Instant::now();
    let _ = sending.await;
    Ok(back)
}

/// A deploy behind two gateways: while a steady stream of messages flows,
/// each service in turn gets SIGTERM and is started again (gateway A,
/// conversation worker, tool executor, memory replicator, gateway B); the
/// next goes only once the new process is ready, and a gateway only while
/// the other one is ready, so a client always has a gateway to fail over to.
/// Returns when the last one was back.
async fn rolling_restart(
    platform: &mut Platform,
    load: &mut Load,
    plan: Plan,
    notes: &mut Vec<String>,
) -> Result<Instant, String> {
    let window = plan.rolling_window;
    let sending = load.send(plan.burst, Some(window), plan.recover_limit);
    let order = [
        GATEWAY_A,
        services::WORKER,
        services::TOOLS,
        services::MEMORY,
        GATEWAY_B,
    ];
    let step = window / (order.len() as u32 + 1);
    let t0 = Instant::now();
    for (k, service) in order.iter().enumerate() {
        let i = platform
            .index(*service)
            .ok_or_else(|| format!("{} is not running", service.name))?;
        let due = t0 + step * (k as u32 + 1);
        tokio::time::sleep_until(due.into()).await;
        if service.api.is_some() {
            other_gateway_ready(platform, *service)?;
        }
        redeploy(platform, i, service.name, load, notes).await?;
    }
    let back = Instant::now();
    let _ = sending.await;
    Ok(back)
}

/// `Err` unless the gateway other than `gateway` is ready to take its
/// clients while `gateway` is redeployed.
fn other_gateway_ready(platform: &Platform, gateway: services::Service) -> Result<(), String> {
    let other = if gateway == GATEWAY_A {
        GATEWAY_B
    } else {
        GATEWAY_A
    };
    let j = platform
        .index(other)
        .ok_or_else(|| format!("{} is not running", other.name))?;
    if !tokio::task::block_in_place(|| platform.is_ready(j)) {
        return Err(format!(
            "{} due for redeploy while {} is not ready",
            gateway.name, other.name
        ));
    }
    Ok(())
}

/// Redeploys service `i` (SIGTERM, SIGKILL after a 30 s grace, started
/// again), waits up to 60 s for the new process to be ready and notes how
/// long each half took.
async fn redeploy(
    platform: &mut Platform,
    i: usize,
    name: &str,
    load: &Load,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let at = accepted(load).await;
    let grace = Duration::from_secs(30);
    let stopped = tokio::task::block_in_place(|| platform.redeploy(i, grace))?;
    let started = Instant::now();
    while !tokio::task::block_in_place(|| platform.is_ready(i)) {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("{name} not ready 60 s after its redeploy"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let note = format!(
        "{name} redeployed after {at} accepted: old process exited in {:.1} s, new one ready in {:.1} s",
        stopped.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!("chaos: {note}");
    notes.push(note);
    if stopped >= grace {
        notes.push(format!(
            "graceful shutdown overran: {name} needed SIGKILL after {grace:?}"
        ));
    }
    Ok(())
}

/// A dependency the harness stops for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dependency {
    /// tansu.
    Broker,
    /// The memory service (the SomaBrain stand-in).
    Somabrain,
}

impl Dependency {
    fn label(self) -> &'static str {
        match self {
            Dependency::Broker => "broker",
            Dependency::Somabrain => "memory service (SomaBrain)",
        }
    }

    fn stop(self, ctx: &mut Ctx) {
        match self {
            Dependency::Broker => ctx.broker.stop(),
            Dependency::Somabrain => ctx.memory.stop(),
        }
    }

    fn start(self, ctx: &mut Ctx) -> Result<(), String> {
        match self {
            Dependency::Broker => ctx.broker.start(),
            Dependency::Somabrain => ctx.memory.start(),
        }
    }
}

/// `messages` paced over `window` plus 12 s; 2 s in, `dependency` is
/// stopped for `window`, then started again. Returns when it was back.
async fn outage(
    ctx: &mut Ctx,
    load: &mut Load,
    dependency: Dependency,
    messages: u64,
    window: Duration,
    notes: &mut Vec<String>,
) -> Result<Instant, String> {
    let give_up = ctx.opts.plan.recover_limit;
    let sending = load.send(messages, Some(window + Duration::from_secs(12)), give_up);
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| dependency.stop(ctx));
    let label = dependency.label();
    println!("chaos: {label} stopped for {window:?} while messages arrive");
    tokio::time::sleep(window).await;
    let landed = match dependency {
        Dependency::Somabrain => Some(
            tokio::task::block_in_place(|| truth::memory_keys(&ctx.pg, DB))
                .map(|k| k.len())
                .unwrap_or_default(),
        ),
        Dependency::Broker => None,
    };
    tokio::task::block_in_place(|| dependency.start(ctx))?;
    let back = Instant::now();
    let so_far = accepted(load).await;
    match landed {
        Some(landed) => {
            println!(
                "chaos: {label} restarted; {so_far} accepted so far, {landed} memories stored before"
            );
            notes.push(format!(
                "{label} down {window:?}; {landed} memories were stored when it came back"
            ));
        }
        None => println!("chaos: {label} restarted; {so_far} accepted so far"),
    }
    let _ = sending.await;
    Ok(back)
}

async fn accepted(load: &Load) -> usize {
    load.observed.lock().await.accepted.len()
}

async fn wait_accepted(load: &Load, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while (accepted(load).await as u64) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every service is `/ready` and the backlog is drained (every
/// accepted message answered — on SSE, or in the replies topic when a
/// stream dropped — and no pending outbox row). Returns seconds from
/// `back_at` to all-ready and to recovered.
async fn recover(
    ctx: &Ctx,
    platform: &Platform,
    load: &Load,
    back_at: Instant,
    limit: Duration,
) -> (Option<f64>, Option<f64>) {
    let mut ready_at = None;
    let mut last_topic_check = Instant::now();
    let mut last_memory_check = Instant::now() - Duration::from_secs(10);
    let bootstrap = ctx.broker.addr();
    loop {
        let now = Instant::now();
        if ready_at.is_none() && tokio::task::block_in_place(|| platform.not_ready()).is_empty() {
            ready_at = Some(now);
        }
        let mut drained = load.observed.lock().await.all_delivered();
        if !drained && now.duration_since(last_topic_check) > Duration::from_secs(5) {
            last_topic_check = now;
            let accepted: Vec<String> = load
                .observed
                .lock()
                .await
                .accepted
                .keys()
                .cloned()
                .collect();
            let bs = bootstrap.clone();
            if let Ok(Ok(r)) =
                tokio::task::spawn_blocking(move || truth::replies(&bs, EVENTS_TOPIC)).await
            {
                let sse = load.observed.lock().await;
                drained = accepted
                    .iter()
                    .all(|id| r.completed.contains_key(id) || sse.completed.contains_key(id));
            }
        }
        if drained {
            drained = tokio::task::block_in_place(|| truth::outbox_pending(&ctx.pg, DB)) == Some(0);
        }
        if drained && now.duration_since(last_memory_check) > Duration::from_secs(2) {
            // Every accepted message's memory write landed in the memory service.
            last_memory_check = now;
            let keys = tokio::task::block_in_place(|| truth::memory_keys(&ctx.pg, DB));
            let o = load.observed.lock().await;
            drained = keys.is_ok_and(|k| o.accepted.keys().all(|id| k.contains(id)));
        } else if drained {
            drained = false;
        }
        if drained {
            if let Some(r) = ready_at {
                let secs = |t: Instant| t.saturating_duration_since(back_at).as_secs_f64();
                return (Some(secs(r)), Some(secs(r.max(now))));
            }
        }
        if now.duration_since(back_at) > limit {
            let ready = ready_at.map(|r| r.saturating_duration_since(back_at).as_secs_f64());
            return (ready, None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The ground truth after a scenario.
#[derive(Default)]
struct Truth {
    replies: truth::Replies,
    requests: HashSet<String>,
    dlqs: BTreeMap<String, u64>,
    outbox: BTreeMap<String, (u64, u64)>,
    memories: HashSet<String>,
}

impl Truth {
    fn read(ctx: &Ctx) -> Result<Self, String> {
        let bootstrap = ctx.broker.addr();
        let dlq_topics: Vec<String> = TOPICS.iter().map(|t| format!("{t}.dlq")).collect();
        Ok(Self {
            replies: truth::replies(&bootstrap, EVENTS_TOPIC)?,
            requests: truth::ids_in(&bootstrap, REQUESTS_TOPIC)?,
            dlqs: truth::dlq_counts(&bootstrap, &dlq_topics)?,
            outbox: truth::outbox_counts(&ctx.pg, DB)?,
            memories: truth::memory_keys(&ctx.pg, DB)?,
        })
    }
}

/// What was still wrong when the recovery wait ran out: services not
/// ready (with their unhealthy health components), replies not seen on
/// SSE, outbox rows pending.
async fn stuck(ctx: &Ctx, platform: &Platform, load: &Load, limit: Duration) -> String {
    let (not_ready, pending) = tokio::task::block_in_place(|| {
        let not_ready: Vec<String> = platform
            .not_ready()
            .into_iter()
            .map(|name| format!("{name} ({})", platform.unhealthy(name).join("; ")))
            .collect();
        (not_ready, truth::outbox_pending(&ctx.pg, DB))
    });
    let o = load.observed.lock().await;
    let unanswered = o.accepted.len()
        - o.accepted
            .keys()
            .filter(|id| o.completed.contains_key(*id))
            .count();
    format!(
        "not recovered {limit:?} after the dependency's return: not ready: {}; \
         {unanswered} accepted messages without a reply on SSE; pending outbox rows: {}",
        if not_ready.is_empty() {
            "none".to_owned()
        } else {
            not_ready.join(", ")
        },
        pending.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    )
}

/// The row from what the client saw and the ground truth.
fn count(s: Scenario, observed: &Observed, truth: &Truth, mut notes: Vec<String>) -> Row {
    let tally = observed.tally();
    let Truth {
        replies,
        requests,
        dlqs,
        outbox,
        memories,
    } = truth;
    let answered = Answered::reconcile(observed, replies, requests);
    let topic_order: u64 = replies
        .completion_order
        .values()
        .map(|order| load::order_violations(order, &observed.accepted))
        .sum();
    let dead_outbox: u64 = outbox.values().map(|(d, _)| d).sum();
    let pending: u64 = outbox.values().map(|(_, p)| p).sum();
    let dead_bus: u64 = dlqs.values().sum();
    let remembered = observed
        .accepted
        .keys()
        .filter(|id| memories.contains(*id))
        .count() as u64;
    if remembered < observed.accepted.len() as u64 {
        notes.push(format!(
            "{} accepted messages have no memory in the memory service ({MEMORY_TOPIC} writes not landed)",
            observed.accepted.len() as u64 - remembered
        ));
    }
    note_delivery(observed, &tally, replies, &answered, &mut notes);
    note_leftovers(truth, dead_outbox + dead_bus, pending, &mut notes);
    Row {
        scenario: s.name(),
        accepted: tally.accepted,
        delivered: answered.delivered,
        seen_on_sse: tally.delivered,
        duplicates: tally.duplicates.max(answered.topic_duplicates),
        order_violations: tally.order_violations.max(topic_order),
        dead_lettered: dead_outbox + dead_bus,
        remembered,
        pending_outbox: pending,
        errors: observed.errors.clone(),
        failovers: observed.failovers,
        gave_up: observed.gave_up,
        notes,
        ..Row::default()
    }
}

/// The accepted messages held against the topics.
struct Answered {
    /// Answered, on SSE or in the replies topic.
    delivered: u64,
    /// Second distinct replies in the topic, plus sends accepted twice.
    topic_duplicates: u64,
    /// Unanswered and never in the requests topic.
    lost_before_bus: u64,
}

impl Answered {
    /// Holds each accepted message against the replies and requests topics.
    fn reconcile(
        observed: &Observed,
        replies: &truth::Replies,
        requests: &HashSet<String>,
    ) -> Self {
        let mut delivered = 0;
        let mut topic_duplicates = observed.double_accepts;
        let mut lost_before_bus = 0;
        for id in observed.accepted.keys() {
            let in_topic = replies.completed.get(id);
            if in_topic.is_some() || observed.completed.contains_key(id) {
                delivered += 1;
            } else if !requests.contains(id) {
                lost_before_bus += 1;
            }
            if let Some(ids) = in_topic {
                let distinct: HashSet<&String> = ids.iter().collect();
                topic_duplicates += distinct.len() as u64 - 1;
            }
        }
        Self {
            delivered,
            topic_duplicates,
            lost_before_bus,
        }
    }
}

/// Notes how replies reached the client: the delivery paths, SSE gaps,
/// messages never answered and redelivered reply events.
fn note_delivery(
    observed: &Observed,
    tally: &load::Tally,
    replies: &truth::Replies,
    answered: &Answered,
    notes: &mut Vec<String>,
) {
    let delivered = answered.delivered;
    let deferred = observed
        .accepted
        .values()
        .filter(|m| m.delivery == "deferred")
        .count();
    notes.push(format!(
        "delivery: {} kafka, {deferred} deferred (outbox); delivered per SSE {}, per replies topic {}",
        observed.accepted.len() - deferred,
        tally.delivered,
        observed
            .accepted
            .keys()
            .filter(|id| replies.completed.contains_key(*id))
            .count()
    ));
    if observed.sse_reconnects > 0 || observed.sse_lagged > 0 {
        notes.push(format!(
            "SSE streams reopened {} times ({} lagged); replies missed meanwhile were read from the topic",
            observed.sse_reconnects, observed.sse_lagged
        ));
    } else if tally.delivered < delivered {
        notes.push(format!(
            "the SSE streams never dropped, yet missed {} replies the topic has",
            delivered - tally.delivered
        ));
    }
    let lost = observed.accepted.len() as u64 - delivered;
    if lost > 0 {
        let lost_before_bus = answered.lost_before_bus;
        notes.push(format!(
            "{lost} accepted messages never answered; {lost_before_bus} of them never reached \
             {REQUESTS_TOPIC}"
        ));
    }
    if replies.same_id_again > 0 {
        notes.push(format!(
            "{} reply events are in {EVENTS_TOPIC} twice with the same id (redelivery)",
            replies.same_id_again
        ));
    }
}

/// Notes what was left over: `dead` dead letters (per outbox schema and
/// DLQ topic) and `pending` outbox rows.
fn note_leftovers(truth: &Truth, dead: u64, pending: u64, notes: &mut Vec<String>) {
    if dead > 0 {
        let per: Vec<String> = truth
            .outbox
            .iter()
            .filter(|(_, (d, _))| *d > 0)
            .map(|(s, (d, _))| format!("{s}.dead_letters {d}"))
            .chain(truth.dlqs.iter().map(|(t, n)| format!("{t} {n}")))
            .collect();
        notes.push(format!("dead-lettered: {}", per.join(", ")));
    }
    if pending > 0 {
        notes.push(format!("{pending} outbox rows still pending at the end"));
    }
}

/// Pass criteria: nothing lost, no duplicate, no order violation, nothing
/// dead-lettered, no manual restart, all ready within 60 s and recovered.
fn judge(row: &mut Row) {
    let sse_gap_unexplained = row
        .notes
        .iter()
        .any(|n| n.starts_with("the SSE streams never dropped"));
    let killed = row
        .notes
        .iter()
        .any(|n| n.starts_with("graceful shutdown overran"));
    row.pass = row.accepted > 0
        && row.delivered == row.accepted
        && row.remembered == row.accepted
        && !sse_gap_unexplained
        && !killed
        && row.duplicates == 0
        && row.order_violations == 0
        && row.dead_lettered == 0
        && row.restarted_by_hand == 0
        && row.ready_secs.is_some_and(|s| s <= 60.0)
        && row.recover_secs.is_some();
}

fn secs(s: Option<f64>) -> String {
    s.map_or_else(|| "never".to_owned(), |s| format!("{s:.1} s"))
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<17} {:>8} {:>9} {:>6} {:>6} {:>6} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8}  result",
        "scenario",
        "accepted",
        "delivered",
        "memory",
        "dupes",
        "order",
        "dead",
        "errors",
        "failovers",
        "ready",
        "recover",
        "by hand"
    );
    for r in rows {
        println!(
            "{:<17} {:>8} {:>9} {:>6} {:>6} {:>6} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8}  {}",
            r.scenario,
            r.accepted,
            r.delivered,
            r.remembered,
            r.duplicates,
            r.order_violations,
            r.dead_lettered,
            r.client_errors(),
            r.failovers,
            secs(r.ready_secs),
            secs(r.recover_secs),
            r.restarted_by_hand,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
    for r in rows {
        let errors: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        println!("\n{}:", r.scenario);
        if !errors.is_empty() {
            println!(
                "  client errors (retried): {}{}",
                errors.join(" "),
                if r.gave_up > 0 {
                    format!("; {} sends given up", r.gave_up)
                } else {
                    String::new()
                }
            );
        }
        for n in &r.notes {
            println!("  {n}");
        }
    }
}

fn write_json(ctx: &Ctx, rows: &[Row]) -> Result<PathBuf, String> {
    let dir = platform::target_dir().join("chaos");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario,
                "accepted": r.accepted,
                "delivered": r.delivered,
                "delivered_seen_on_sse": r.seen_on_sse,
                "memories_landed": r.remembered,
                "client_visible_duplicates": r.duplicates,
                "order_violations": r.order_violations,
                "dead_lettered": r.dead_lettered,
                "pending_outbox_rows": r.pending_outbox,
                "ready_after_secs": r.ready_secs,
                "time_to_recover_secs": r.recover_secs,
                "services_restarted_by_hand": r.restarted_by_hand,
                "client_errors_by_status": r.errors,
                "client_errors": r.client_errors(),
                "failovers": r.failovers,
                "sends_given_up": r.gave_up,
                "notes": r.notes,
                "pass": r.pass,
            })
        })
        .collect();
    let doc = json!({
        "short": ctx.opts.short,
        "broker_storage": match ctx.opts.storage { Storage::Sqlite => "sqlite", Storage::Postgres => "postgres" },
        "somabrain": format!("memory service on {SOMABRAIN_ADDR}"),
        "commit": git_head(),
        "platform_binaries": ctx.bin_dir.display().to_string(),
        "platform_root": ctx.opts.platform_root.display().to_string(),
        "rows": rows,
    });
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let path = dir.join(format!("chaos-{stamp}.json"));
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    fs::write(&path, &text).map_err(|e| e.to_string())?;
    fs::write(dir.join("latest.json"), &text).map_err(|e| e.to_string())?;
    Ok(path)
}

fn git_head() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The tail of each service log's warnings and errors, and of the
/// dependency the scenario touched.
fn print_logs(ctx: &Ctx, s: Scenario) {
    let log_dir = ctx.dir.join(s.name());
    let mut logs: Vec<PathBuf> = services::ALL
        .iter()
        .map(|s| log_dir.join(format!("{}.log", s.name)))
        .filter(|p| p.exists())
        .collect();
    logs.push(match s {
        Scenario::BrokerKill | Scenario::BrokerOutage => ctx.broker.log.clone(),
        Scenario::SomabrainDown => ctx.memory.log.clone(),
        Scenario::RollingRestart => ctx.broker.log.clone(),
        Scenario::PostgresRestart => ctx.pg.log.clone(),
        Scenario::RedisRestart => ctx.redis.log.clone(),
    });
    for log in logs {
        let text = fs::read_to_string(&log).unwrap_or_default();
        println!("--- {}", log.display());
        for line in distinct_problems(&text, 10) {
            println!("  {line}");
        }
    }
}

/// The last `n` distinct warnings and errors of a log, each with how often
/// it occurred: ANSI colours removed, and lines that differ only in
/// timestamps, ids and counts folded into one.
fn distinct_problems(text: &str, n: usize) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut seen: std::collections::HashMap<String, (usize, String)> =
        std::collections::HashMap::new();
    for raw in text.lines() {
        let line = strip_ansi(raw);
        let problem = ["WARN", "ERROR", "panic", "FATAL"]
            .iter()
            .any(|w| line.contains(w));
        if !problem || line.contains("TopicAlreadyExists") {
            continue;
        }
        let signature: String = line
            .chars()
            .skip_while(|c| !c.is_alphabetic() || c.is_ascii_hexdigit())
            .filter(|c| !c.is_ascii_digit())
            .take(90)
            .collect();
        let entry = seen.entry(signature.clone()).or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = line.chars().take(300).collect();
        order.retain(|s| *s != signature);
        order.push(signature);
    }
    order[order.len().saturating_sub(n)..]
        .iter()
        .map(|sig| {
            let (count, line) = &seen[sig];
            format!("{count:>5}× {line}")
        })
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_fold_repeated_warnings_and_drop_colours() {
        let log = "\u{1b}[2m2026-12-05T08:55:04.735191Z\u{1b}[0m  WARN x: event: \"breaker_open\"\n\
                   2026-12-05T08:55:05.100000Z  WARN x: event: \"breaker_open\"\n\
                   2026-12-05T08:55:06.000000Z  INFO x: fine\n\
                   2026-12-05T08:55:07.000000Z ERROR y: relay failed\n";
        let tail = distinct_problems(log, 10);
        assert_eq!(tail.len(), 2, "{tail:?}");
        assert!(
            tail[0].starts_with("    2× 2026-12-05T08:55:05.100000Z  WARN"),
            "{tail:?}"
        );
        assert!(tail[1].contains("ERROR y: relay failed"));
    }

    #[test]
    fn options_parse_with_the_stacks_broker_storage_by_default() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let o = parse(&args(&["--short", "--scenario", "redis-restart"])).unwrap();
        assert_eq!(o.scenarios, vec![Scenario::RedisRestart]);
        assert_eq!(o.plan.burst, 200);
        assert_eq!(parse(&args(&[])).unwrap().scenarios.len(), 6);
        assert!(parse(&args(&["--scenario", "nope"])).is_err());
        let o = parse(&args(&[])).unwrap();
        assert_eq!(o.storage, Storage::Postgres);
        assert!(
            o.broker_schema
                .is_some_and(|p| p.ends_with("tansu-pg-schema.sql"))
        );
        assert!(parse(&args(&["--storage", "tape"])).is_err());
    }
}
