//! `cargo xtask bench`: every benchmark of the crates and of the platform,
//! one table.
//!
//! Each row is one measured thing: our figure, the baseline measured in the
//! same run, the ratio, the goal (from the crate's README or issue #16) and
//! whether it was met. The crate rows come from the crates' criterion
//! benches (run here, then read from `target/criterion`); the platform rows
//! from a load harness that starts a private stack and the platform
//! binaries (see [`platform`]). The table is printed and written as JSON to
//! `target/bench/latest.json` (and a copy named by the time).

use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{platform as xplatform, run};

mod cpu;
mod crates;
mod drift;
mod openloop;
mod platform;
mod stats;
mod table;

use table::Row;

const GROUPS: [&str; 10] = [
    "platform",
    "sse",
    "bus",
    "outbox",
    "policy",
    "redis",
    "somabrain",
    "memory",
    "config",
    "observability",
];

const USAGE: &str = "usage: cargo xtask bench [--group NAME]... [--no-run]
         [--rate MSG_PER_SEC] [--duration SECS] [--conversations N] [--zipf S]
         [--ceiling-clients N] [--ceiling-secs SECS] [--bare-secs SECS] [--env SOMA_KEY=VALUE]...
         [--idle N] [--active N] [--bin-dir DIR] [--keep]

groups: platform, sse, bus, outbox, policy, redis, somabrain, memory, config, observability (default: all)
  --no-run       crate groups: do not run `cargo bench`, read the last criterion results
  platform load: --rate (500), --duration (60), --conversations (1000), --zipf (1.0),
                 --ceiling-clients (64), --ceiling-secs (10), --bare-secs (the baseline's load,
                 default --duration); --env adds a SOMA_* override
                 to the platform services; --bin-dir uses prebuilt binaries
  sse:           --idle (10000) idle streams on one gateway, --active (1000) conversations
                 sending beside them (at --rate, default 100 here, for --duration, default 20)";

struct Opts {
    groups: Vec<String>,
    run_crates: bool,
    platform: platform::Opts,
    sse: platform::sse::Opts,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        groups: Vec::new(),
        run_crates: true,
        platform: platform::Opts::default(),
        sse: platform::sse::Opts::default(),
    };
    let (mut rate, mut duration) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("`{a}` needs a value\n{USAGE}"))
        };
        let num = |v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("`{a}` takes a number, not `{v}`"))
        };
        match a.as_str() {
            "--group" => {
                let g = value()?;
                if !GROUPS.contains(&g.as_str()) {
                    return Err(format!("unknown group `{g}`\n{USAGE}"));
                }
                o.groups.push(g);
            }
            "--no-run" => o.run_crates = false,
            "--rate" => rate = Some(num(value()?)?),
            "--duration" => duration = Some(Duration::from_secs_f64(num(value()?)?)),
            "--idle" => o.sse.idle = num(value()?)? as usize,
            "--active" => o.sse.active = num(value()?)? as usize,
            "--conversations" => o.platform.conversations = num(value()?)? as usize,
            "--zipf" => o.platform.zipf_s = num(value()?)?,
            "--ceiling-clients" => o.platform.ceiling_workers = num(value()?)? as usize,
            "--ceiling-secs" => o.platform.ceiling = Duration::from_secs_f64(num(value()?)?),
            "--bare-secs" => {
                o.platform.bare_duration = Some(Duration::from_secs_f64(num(value()?)?));
            }
            "--bin-dir" => {
                let dir: std::path::PathBuf = value()?.into();
                o.sse.bin_dir = Some(dir.clone());
                o.platform.bin_dir = Some(dir);
            }
            "--keep" => (o.platform.keep, o.sse.keep) = (true, true),
            "--env" => {
                let kv = value()?;
                let (k, v) = kv
                    .split_once('=')
                    .filter(|(k, _)| k.starts_with("SOMA_"))
                    .ok_or_else(|| format!("--env takes SOMA_KEY=VALUE, not `{kv}`"))?;
                o.platform.env.push((k.to_owned(), v.to_owned()));
                o.sse.env.push((k.to_owned(), v.to_owned()));
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    if let Some(r) = rate {
        (o.platform.rate, o.sse.rate) = (r, r);
    }
    if let Some(d) = duration {
        (o.platform.duration, o.sse.duration) = (d, d);
    }
    if o.platform.rate <= 0.0
        || o.platform.conversations == 0
        || o.sse.idle == 0
        || o.sse.active == 0
    {
        return Err("--rate, --conversations, --idle and --active must be positive".to_owned());
    }
    if o.groups.is_empty() {
        o.groups = GROUPS.iter().map(|g| (*g).to_owned()).collect();
    }
    Ok(o)
}

pub(crate) fn cli(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let started = SystemTime::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = Vec::new();
    for g in &opts.groups {
        println!("\n==> bench: {g}");
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("tokio runtime: {e}"))
        };
        let result = match g.as_str() {
            "platform" => runtime().and_then(|rt| rt.block_on(platform::run_group(&opts.platform))),
            "sse" => runtime().and_then(|rt| rt.block_on(platform::run_sse_group(&opts.sse))),
            _ => crate_group(g, opts.run_crates),
        };
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                println!("==> bench: {g} FAILED: {e}");
                failures.push(format!("{g}: {e}"));
            }
        }
    }
    println!("\n{}", table::render(&rows));
    let missed = rows.iter().filter(|r| r.met() == Some(false)).count();
    let met = rows.iter().filter(|r| r.met() == Some(true)).count();
    println!("bench: {met} goals met, {missed} missed");
    let path = write_json(&rows, &opts, started, &failures)?;
    println!("bench: table written to {}", path.display());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "groups that could not run: {}",
            failures.join("; ")
        ))
    }
}

fn crate_group(group: &str, run_benches: bool) -> Result<Vec<Row>, String> {
    let benches: Vec<crates::Bench> = crates::benches()
        .into_iter()
        .filter(|b| b.group == group)
        .collect();
    let criterion = xplatform::target_dir().join("criterion");
    let mut rows = Vec::new();
    for b in &benches {
        if run_benches {
            run(
                "cargo",
                &[
                    "bench",
                    "-p",
                    b.package,
                    "--bench",
                    b.bench,
                    "--",
                    "--warm-up-time",
                    "1",
                    "--measurement-time",
                    "3",
                ],
            )?;
        }
        rows.extend(crates::rows(b, &crates::read_estimates(&criterion)));
    }
    Ok(rows)
}

/// This machine in a few words: cores and CPU model.
fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {model}")
}

fn write_json(
    rows: &[Row],
    opts: &Opts,
    started: SystemTime,
    failures: &[String],
) -> Result<std::path::PathBuf, String> {
    let dir = xplatform::target_dir().join("bench");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let secs = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let p = &opts.platform;
    let doc = serde_json::json!({
        "started_unix": secs,
        "machine": machine(),
        "groups": opts.groups,
        "platform_load": {
            "rate": p.rate, "duration_secs": p.duration.as_secs_f64(),
            "conversations": p.conversations, "zipf_s": p.zipf_s,
            "ceiling_clients": p.ceiling_workers, "ceiling_secs": p.ceiling.as_secs_f64(),
            "env": p.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        },
        "failures": failures,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    let latest = dir.join("latest.json");
    fs::write(dir.join(format!("bench-{secs}.json")), &text).map_err(|e| e.to_string())?;
    fs::write(&latest, &text).map_err(|e| format!("write {}: {e}", latest.display()))?;
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_parse_and_bad_ones_are_refused() {
        let o = parse(&args(&[
            "--group",
            "platform",
            "--rate",
            "300",
            "--duration",
            "30",
        ]))
        .unwrap();
        assert_eq!(o.groups, ["platform"]);
        assert_eq!(o.platform.rate, 300.0);
        assert_eq!(o.platform.duration, Duration::from_secs(30));
        // One --rate / --duration serves both load groups; each keeps its
        // own default otherwise.
        assert_eq!(
            (o.sse.rate, o.sse.duration),
            (300.0, Duration::from_secs(30))
        );
        let d = parse(&args(&["--idle", "200", "--active", "20"])).unwrap();
        assert_eq!((d.sse.idle, d.sse.active), (200, 20));
        assert_eq!((d.platform.rate, d.sse.rate), (500.0, 100.0));
        assert!(parse(&args(&["--idle", "0"])).is_err());
        assert_eq!(parse(&[]).unwrap().groups.len(), GROUPS.len());
        assert!(parse(&args(&["--group", "nope"])).is_err());
        assert!(parse(&args(&["--rate", "fast"])).is_err());
        assert!(parse(&args(&["--rate"])).is_err());
        assert!(parse(&args(&["--env", "PATH=/bin"])).is_err());
        let b = parse(&args(&["--duration", "900", "--bare-secs", "120"])).unwrap();
        assert_eq!(b.platform.duration, Duration::from_secs(900));
        assert_eq!(b.platform.bare_duration, Some(Duration::from_secs(120)));
        assert_eq!(parse(&args(&[])).unwrap().platform.bare_duration, None);
        assert!(parse(&args(&["--bare-secs", "soon"])).is_err());
        let e = parse(&args(&["--env", "SOMA_BUS__PRODUCER__LINGER_MS=1"])).unwrap();
        assert_eq!(
            e.platform.env,
            [("SOMA_BUS__PRODUCER__LINGER_MS".to_owned(), "1".to_owned())]
        );
    }

    #[test]
    fn every_group_has_rows_or_is_the_platform() {
        let benches = crates::benches();
        for g in GROUPS.iter().filter(|g| !["platform", "sse"].contains(*g)) {
            assert!(benches.iter().any(|b| b.group == *g), "{g}");
        }
        // Each bench file named exists in its crate.
        for b in &benches {
            let dir = match b.package {
                "soma-memory-service" => "examples/memory-service",
                p => p,
            };
            let file = crate::root()
                .join(dir)
                .join("benches")
                .join(format!("{}.rs", b.bench));
            assert!(file.exists(), "{}", file.display());
        }
    }
}
