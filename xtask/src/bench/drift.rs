//! What grows while the load runs: the stack's statements and processes in
//! the first third of the load against the last third, so a decay names
//! its cause (a statement whose mean time grows with the data, a process
//! that needs more CPU for the same rate) instead of only its symptom.

use std::collections::HashMap;
use std::time::Duration;

use super::cpu::{self, Sample, Watched};
use crate::chaos::deps::Postgres;

/// The statements a cluster has run so far, by query id: calls, total
/// execution milliseconds, and the start of the text.
#[derive(Debug, Clone, Default)]
pub(crate) struct Statements {
    by_id: HashMap<String, Stat>,
}

#[derive(Debug, Clone, Default)]
struct Stat {
    calls: f64,
    total_ms: f64,
    query: String,
}

impl Statements {
    /// `pg_stat_statements` of `db` on `pg` now (empty when unreadable: a
    /// drift report is diagnostic, it never fails the run).
    pub(crate) fn read(pg: &Postgres, db: &str) -> Self {
        let sql = "SELECT queryid, calls, total_exec_time, \
                   regexp_replace(left(query, 100), '\\s+', ' ', 'g') \
                   FROM pg_stat_statements WHERE queryid IS NOT NULL";
        match pg.psql(db, sql) {
            Ok(out) => Self::parse(&out),
            Err(e) => {
                println!("bench: drift: pg_stat_statements of {db}: {e}");
                Self::default()
            }
        }
    }

    /// `queryid|calls|total|query` lines (the query may hold `|`).
    fn parse(out: &str) -> Self {
        let by_id = out
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, '|');
                let id = f.next()?.to_owned();
                let calls = f.next()?.parse().ok()?;
                let total_ms = f.next()?.parse().ok()?;
                let query = f.next().unwrap_or_default().to_owned();
                Some((
                    id,
                    Stat {
                        calls,
                        total_ms,
                        query,
                    },
                ))
            })
            .collect();
        Self { by_id }
    }

    /// Calls and milliseconds between `self` (earlier) and `later`.
    fn window(&self, later: &Self) -> HashMap<String, Stat> {
        later
            .by_id
            .iter()
            .map(|(id, b)| {
                let a = self.by_id.get(id);
                let stat = Stat {
                    calls: b.calls - a.map_or(0.0, |a| a.calls),
                    total_ms: b.total_ms - a.map_or(0.0, |a| a.total_ms),
                    query: b.query.clone(),
                };
                (id.clone(), stat)
            })
            .filter(|(_, s)| s.calls > 0.0)
            .collect()
    }
}

/// One point of the load: the clusters' statements and the processes' CPU.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub(crate) statements: Vec<Statements>,
    pub(crate) cpu: Sample,
}

/// The statements whose time grew most from the first window (`a`..`b`)
/// to the last (`c`..`d`), per cluster, and each process's CPU in the two
/// windows (windows of the same length at the same offered rate).
pub(crate) fn report(
    clusters: &[&str],
    watched: &[Watched],
    [a, b, c, d]: [&Point; 4],
    window: Duration,
) -> String {
    let mut out = String::new();
    let secs = window.as_secs_f64();
    out.push_str(&format!(
        "  cpu, first window: {}\n  cpu, last window:  {}\n",
        cpu::report(watched, &a.cpu, &b.cpu, secs),
        cpu::report(watched, &c.cpu, &d.cpu, secs),
    ));
    for (i, name) in clusters.iter().enumerate() {
        let first = a.statements[i].window(&b.statements[i]);
        let last = c.statements[i].window(&d.statements[i]);
        let (first_ms, last_ms): (f64, f64) = (
            first.values().map(|s| s.total_ms).sum(),
            last.values().map(|s| s.total_ms).sum(),
        );
        out.push_str(&format!(
            "  postgres ({name}): statement time {first_ms:.0} ms in the first window, \
             {last_ms:.0} ms in the last\n    \
             growth ms | calls first → last | mean ms first → last | query\n"
        ));
        let mut rows: Vec<(f64, String)> = last
            .iter()
            .map(|(id, l)| {
                let f = first.get(id).cloned().unwrap_or_default();
                let mean = |s: &Stat| {
                    if s.calls > 0.0 {
                        s.total_ms / s.calls
                    } else {
                        0.0
                    }
                };
                (
                    l.total_ms - f.total_ms,
                    format!(
                        "{:>9.0} | {:.0} → {:.0} | {:.3} → {:.3} | {}",
                        l.total_ms - f.total_ms,
                        f.calls,
                        l.calls,
                        mean(&f),
                        mean(l),
                        l.query
                    ),
                )
            })
            .collect();
        rows.sort_by(|x, y| y.0.total_cmp(&x.0));
        for (_, line) in rows.iter().take(8) {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// The largest tables of `db`, with live and dead rows: storage that grows
/// under the load (a delete-heavy table's dead rows, say).
pub(crate) fn tables(pg: &Postgres, db: &str) -> String {
    let sql = "SELECT schemaname || '.' || relname, \
               pg_size_pretty(pg_total_relation_size(relid)), n_live_tup, n_dead_tup, \
               coalesce(autovacuum_count, 0) \
               FROM pg_stat_user_tables ORDER BY pg_total_relation_size(relid) DESC LIMIT 8";
    match pg.psql(db, sql) {
        Ok(rows) => rows
            .lines()
            .map(|r| format!("    {}\n", r.replace('|', " | ")))
            .collect(),
        Err(e) => format!("    ({db}: {e})\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_the_difference_and_a_query_may_hold_bars() {
        let a = Statements::parse("1|10|100.0|SELECT 1\n2|5|5|SELECT a | b");
        let b = Statements::parse("1|30|400.5|SELECT 1\n2|5|5|SELECT a | b\n3|1|2|new");
        let w = a.window(&b);
        assert_eq!(w.len(), 2, "the unchanged statement has no calls: {w:?}");
        assert_eq!(w["1"].calls, 20.0);
        assert!((w["1"].total_ms - 300.5).abs() < 1e-9);
        assert_eq!(w["3"].query, "new");
        assert_eq!(a.by_id["2"].query, "SELECT a | b");
    }
}
