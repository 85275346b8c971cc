//! CPU time per process over a window, from `/proc/<pid>/stat`: where the
//! machine's time went while the load ran.

use std::fs;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

/// A named group of processes (a PostgreSQL cluster is its postmaster and
/// every backend under it).
#[derive(Debug, Clone)]
pub(crate) struct Watched {
    pub(crate) name: String,
    pub(crate) pid: u32,
    /// Count the pid's children too (at sampling time).
    pub(crate) with_children: bool,
}

/// CPU seconds used so far by each watched group, and by the whole machine.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    per: Vec<f64>,
    machine_busy: f64,
    machine_total: f64,
}

/// `utime + stime` in seconds, and the parent pid, of `pid`.
fn stat(pid: u32) -> Option<(f64, u32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

/// Fields after the `(comm)` (which may hold spaces): state is 3rd, ppid
/// 4th, utime 14th, stime 15th of the whole line.
pub(crate) fn parse_stat(line: &str) -> Option<(f64, u32)> {
    let rest = &line[line.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(((utime + stime) / TICKS, ppid))
}

fn children_cpu(parent: u32) -> f64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .filter(|(_, ppid)| *ppid == parent)
        .map(|(cpu, _)| cpu)
        .sum()
}

fn machine() -> (f64, f64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / TICKS, total / TICKS)
}

pub(crate) fn sample(watched: &[Watched]) -> Sample {
    let per = watched
        .iter()
        .map(|w| {
            let own = stat(w.pid).map(|(c, _)| c).unwrap_or(0.0);
            own + if w.with_children {
                children_cpu(w.pid)
            } else {
                0.0
            }
        })
        .collect();
    let (machine_busy, machine_total) = machine();
    Sample {
        per,
        machine_busy,
        machine_total,
    }
}

/// `name 87%` per group between two samples (percent of one core), busiest
/// first, and the whole machine's busy share of all its cores.
pub(crate) fn report(watched: &[Watched], a: &Sample, b: &Sample, secs: f64) -> String {
    let mut per: Vec<(String, f64)> = watched
        .iter()
        .enumerate()
        .map(|(i, w)| {
            (
                w.name.clone(),
                (b.per[i] - a.per[i]).max(0.0) / secs * 100.0,
            )
        })
        .collect();
    per.sort_by(|x, y| y.1.total_cmp(&x.1));
    let total = b.machine_total - a.machine_total;
    let busy = if total > 0.0 {
        (b.machine_busy - a.machine_busy) / total * 100.0
    } else {
        0.0
    };
    let list: Vec<String> = per.iter().map(|(n, p)| format!("{n} {p:.0}%")).collect();
    format!(
        "{} (of one core); machine {busy:.0}% busy over all cores",
        list.join(", ")
    )
}

/// The name of the watched group that is the benchmark itself (not part of
/// the stack whose cost is measured).
pub(crate) const LOAD_GENERATOR: &str = "load generator (xtask)";

/// CPU seconds the watched groups other than the load generator used
/// between two samples: what the stack under test cost, whatever else the
/// machine was doing.
pub(crate) fn stack_secs(watched: &[Watched], a: &Sample, b: &Sample) -> f64 {
    watched
        .iter()
        .enumerate()
        .filter(|(_, w)| w.name != LOAD_GENERATOR)
        .map(|(i, _)| (b.per[i] - a.per[i]).max(0.0))
        .sum()
}

/// `name 1.23` per group: CPU milliseconds per message of `messages`
/// between two samples, busiest first, and the stack's total.
pub(crate) fn per_message(watched: &[Watched], a: &Sample, b: &Sample, messages: u64) -> String {
    if messages == 0 {
        return "no messages".to_owned();
    }
    let n = messages as f64;
    let mut per: Vec<(String, f64)> = watched
        .iter()
        .enumerate()
        .filter(|(_, w)| w.name != LOAD_GENERATOR)
        .map(|(i, w)| (w.name.clone(), (b.per[i] - a.per[i]).max(0.0) * 1e3 / n))
        .collect();
    per.sort_by(|x, y| y.1.total_cmp(&x.1));
    let list: Vec<String> = per.iter().map(|(n, ms)| format!("{n} {ms:.2}")).collect();
    format!(
        "{} ms; stack {:.2} ms per message",
        list.join(", "),
        stack_secs(watched, a, b) * 1e3 / n
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let line = "1234 (tokio worker 1) S 77 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 0 0";
        let (cpu, ppid) = parse_stat(line).unwrap();
        assert_eq!(ppid, 77);
        assert!((cpu - 3.0).abs() < 1e-9, "{cpu}");
    }

    #[test]
    fn this_process_is_sampled() {
        let me = Watched {
            name: "me".into(),
            pid: std::process::id(),
            with_children: false,
        };
        let a = sample(std::slice::from_ref(&me));
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = sample(std::slice::from_ref(&me));
        assert!(b.per[0] > a.per[0], "{x}: {:?} → {:?}", a.per, b.per);
        assert!(report(std::slice::from_ref(&me), &a, &b, 0.2).starts_with("me "));
        let used = stack_secs(std::slice::from_ref(&me), &a, &b);
        assert!(used > 0.0, "{used}");
        let line = per_message(std::slice::from_ref(&me), &a, &b, 10);
        assert!(
            line.starts_with("me ") && line.ends_with("ms per message"),
            "{line}"
        );
        let generator = Watched {
            name: LOAD_GENERATOR.into(),
            ..me
        };
        let g = std::slice::from_ref(&generator);
        let (a, b) = (sample(g), sample(g));
        assert_eq!(
            stack_secs(g, &a, &b),
            0.0,
            "the load generator is not the stack"
        );
    }
}
