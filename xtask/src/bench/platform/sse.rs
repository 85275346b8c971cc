//! `cargo xtask bench --group sse`: SSE at scale (issue #16, item 4).
//!
//! On the private stack of the platform group:
//!
//! 1. **Baseline**: the bare gateway's idle SSE route (axum's `Sse` with a
//!    keep-alive and no events, nothing else) holds `idle` streams; its
//!    resident memory before and after, divided by the streams, is what one
//!    idle connection costs a plain axum server.
//! 2. **Ours**: one platform gateway holds `idle` streams of as many
//!    conversations (each of its own tenant, authenticated, authorized,
//!    subscribed to its conversation's fan-out, heart-beating); the same
//!    figure per stream.
//! 3. With those streams still open, `active` conversations send at `rate`
//!    messages a second for `duration`, each followed on its own stream:
//!    time to first event (send → first `assistant.*` event) p50/p99.
//!
//! Resident memory is read from `/proc/<pid>/status` (`VmRSS`) once the
//! streams have been open a few seconds; it includes whatever the allocator
//! keeps, so it is an upper bound of what a stream holds.

use std::path::Path;
use std::time::Duration;

use super::super::openloop::{Conv, OpenLoop, Report, Shape};
use super::super::table::{Goal, Row};
use super::{BARE_ADDR, Stack, conversations, spawn_bare, stamp, start_platform, wait_ready};
use crate::chaos::services::{GATEWAY_A, Platform};

const GROUP: &str = "sse";
const BARE: &str = "bare axum SSE";

/// What the SSE group runs.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    /// Idle streams held open on one gateway.
    pub(crate) idle: usize,
    /// Conversations sending while the idle streams are open.
    pub(crate) active: usize,
    /// Messages a second over the active conversations.
    pub(crate) rate: f64,
    /// How long the active conversations send.
    pub(crate) duration: Duration,
    /// Prebuilt binaries (default: build this checkout's, release profile).
    pub(crate) bin_dir: Option<std::path::PathBuf>,
    /// Leave the private stack up afterwards.
    pub(crate) keep: bool,
    /// More `SOMA_*` overrides for the platform services.
    pub(crate) env: Vec<(String, String)>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            idle: 10_000,
            active: 1_000,
            rate: 100.0,
            duration: Duration::from_secs(20),
            bin_dir: None,
            keep: false,
            env: Vec::new(),
        }
    }
}

/// Resident memory of `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Opens `streams` on `base` and returns the resident memory of `pid` per
/// stream in KiB, with the streams still open (the caller stops them).
async fn per_stream_kib(
    what: &str,
    pid: u32,
    load: &mut OpenLoop,
    streams: usize,
) -> Result<f64, String> {
    // Let start-up allocations settle before the "before" figure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(pid)?;
    let t = std::time::Instant::now();
    load.follow(Duration::from_secs(300)).await?;
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(pid)?;
    let per = after.saturating_sub(before) as f64 / streams as f64;
    println!(
        "bench: {what}: {streams} idle SSE streams open in {opened:.1?}; resident {before} KiB → \
         {after} KiB = {per:.1} KiB a stream"
    );
    Ok(per)
}

/// The SSE group's phases on a started private stack: the bare gateway's
/// idle streams, then the platform gateway's idle and active ones, then
/// the rows.
pub(super) async fn phases(
    opts: &Opts,
    dir: &Path,
    log_dir: &Path,
    bin_dir: &Path,
    stack: &Stack,
) -> Result<Vec<Row>, String> {
    let run_id = format!("sse-{}", stamp());
    let bare_per = bare_per_stream(opts, &run_id, log_dir, bin_dir, stack).await?;

    let (mut platform, secret) = start_platform(dir, log_dir, bin_dir, stack, &opts.env)?;
    let result = on_platform(opts, &run_id, &platform, &secret).await;
    let exited = platform.exited();
    platform.stop();
    let ours = result?;
    if !exited.is_empty() {
        return Err(format!("exited during the run: {}", exited.join(", ")));
    }
    Ok(rows(opts, bare_per, &ours))
}

/// Phase 1: resident memory per idle stream on the bare gateway, in KiB.
async fn bare_per_stream(
    opts: &Opts,
    run_id: &str,
    log_dir: &Path,
    bin_dir: &Path,
    stack: &Stack,
) -> Result<f64, String> {
    let mut proc = spawn_bare(bin_dir, log_dir, stack)?;
    let pid = proc.child.id();
    let convs: Vec<Conv> = (0..opts.idle)
        .map(|i| Conv {
            id: format!("{run_id}-bare-{i}"),
            token: None,
        })
        .collect();
    let mut load = OpenLoop::new(&format!("http://{BARE_ADDR}"), run_id, convs);
    let per = per_stream_kib("bare gateway", pid, &mut load, opts.idle).await;
    load.stop().await;
    proc.terminate(Duration::from_secs(5));
    per
}

/// What the platform gateway showed.
struct Ours {
    /// Resident memory per idle stream, KiB.
    per_stream_kib: f64,
    /// The active conversations' load.
    report: Report,
    /// Idle streams reopened while they were held.
    idle_reconnects: u64,
}

/// Phases 2 and 3 on the started platform: idle streams held open, then
/// the active conversations' load beside them.
async fn on_platform(
    opts: &Opts,
    run_id: &str,
    platform: &Platform,
    secret: &str,
) -> Result<Ours, String> {
    wait_ready(platform).await?;
    let i = platform
        .index(GATEWAY_A)
        .ok_or("the platform runs no gateway")?;
    let pid = platform.procs[i].child.id();
    let base = platform.gateway_urls()[0].clone();
    let idle = conversations(secret, &format!("{run_id}-idle-"), opts.idle)?;
    let mut idle_load = OpenLoop::new(&base, &format!("{run_id}-idle"), idle);
    let per_stream_kib = per_stream_kib("platform gateway", pid, &mut idle_load, opts.idle).await?;

    let report = active_load(opts, run_id, &base, secret).await?;
    let idle_reconnects = idle_load.reconnects();
    idle_load.stop().await;
    Ok(Ours {
        per_stream_kib,
        report,
        idle_reconnects,
    })
}

/// Phase 3: `active` conversations send at `rate`, each followed on its
/// own stream; prints and returns the outcome.
async fn active_load(
    opts: &Opts,
    run_id: &str,
    base: &str,
    secret: &str,
) -> Result<Report, String> {
    let active = conversations(secret, &format!("{run_id}-active-"), opts.active)?;
    let mut load = OpenLoop::new(base, run_id, active);
    load.follow(Duration::from_secs(120)).await?;
    load.warm_up(Duration::from_secs(120)).await?;
    println!(
        "bench: platform gateway: {} active conversations at {} msg/s for {:?}, beside {} \
         idle streams",
        opts.active, opts.rate, opts.duration, opts.idle
    );
    let shape = Shape {
        rate: opts.rate,
        duration: opts.duration,
        zipf_s: 0.0,
        max_in_flight: 4_096,
        seed: 23,
    };
    let report = load.run(shape, Duration::from_secs(60)).await;
    println!(
        "bench:   offered {} accepted {}, errors {:?}, completed {}, first event p50 {:?} \
         ms p99 {:?} ms, sse reconnects {}",
        report.offered,
        report.accepted,
        report.errors,
        report.completed,
        report.first_p50_ms,
        report.first_p99_ms,
        report.sse_reconnects
    );
    load.stop().await;
    Ok(report)
}

/// The group's rows: memory per idle stream against the bare gateway,
/// reopened streams, time to first event, replies completed.
fn rows(opts: &Opts, bare_per: f64, ours: &Ours) -> Vec<Row> {
    let report = &ours.report;
    let row = |what: &str, unit: &str| Row::new(GROUP, what, unit);
    let share = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64 * 100.0);
    vec![
        row(
            &format!(
                "resident memory per idle SSE stream, {} on one gateway",
                opts.idle
            ),
            "KiB",
        )
        .ours(Some(ours.per_stream_kib))
        .baseline(BARE, Some(bare_per))
        .goal(Goal::AtMost(16.0)),
        row("idle streams reopened while held", "")
            .ours(Some(ours.idle_reconnects as f64))
            .goal(Goal::AtMost(0.0)),
        row(
            &format!(
                "send → first event p50, {} active conversations beside {} idle",
                opts.active, opts.idle
            ),
            "ms",
        )
        .ours(report.first_p50_ms),
        row(
            &format!(
                "send → first event p99, {} active conversations beside {} idle",
                opts.active, opts.idle
            ),
            "ms",
        )
        .ours(report.first_p99_ms)
        .goal(Goal::AtMost(100.0)),
        row("replies completed of accepted (SSE group)", "%")
            .ours(share(report.completed, report.accepted))
            .goal(Goal::AtLeast(100.0)),
    ]
}
