//! The bulk path's handles on the client's metric families
//! (`soma_redis_commands_total`, `soma_redis_command_duration_seconds`,
//! `soma_redis_reconnects_total`), resolved once per client.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::{Bulk, BulkKind, BulkReply};
use crate::RedisError;
use crate::metrics::{CommandLabels, CommandOnly, RedisMetrics};

/// Per-kind success counters, the batch histogram and the reconnect counter.
pub(super) struct BulkMetrics {
    commands: Family<CommandLabels, Counter>,
    ok: [Counter; BulkKind::COUNT],
    duration: Histogram,
    pub(super) reconnects: Counter,
}

impl BulkMetrics {
    pub(super) fn new(metrics: &RedisMetrics) -> Self {
        let ok = BulkKind::ALL.map(|k| {
            metrics
                .commands
                .get_or_create(&CommandLabels {
                    command: k.label(),
                    outcome: "ok",
                })
                .clone()
        });
        Self {
            commands: metrics.commands.clone(),
            ok,
            duration: metrics
                .duration
                .get_or_create(&CommandOnly { command: "bulk" })
                .clone(),
            reconnects: metrics.reconnects.clone(),
        }
    }

    /// One bulk batch: every command counted by kind and outcome (a failed
    /// batch counts all its commands with the batch's error), one latency
    /// observation for the batch.
    pub(super) fn observe(
        &self,
        bulk: &Bulk,
        result: &Result<Vec<BulkReply>, RedisError>,
        elapsed: Duration,
    ) {
        self.duration.observe(elapsed.as_secs_f64());
        let counts = bulk.counts();
        match result {
            Ok(replies) => {
                let mut errors = [0u64; BulkKind::COUNT];
                for (i, reply) in replies.iter().enumerate() {
                    if let Err(e) = reply {
                        let kind = bulk.kind(i);
                        errors[kind as usize] += 1;
                        self.failed(kind, e, 1);
                    }
                }
                for (k, ok) in self.ok.iter().enumerate() {
                    let n = counts[k] - errors[k];
                    if n > 0 {
                        ok.inc_by(n);
                    }
                }
            }
            Err(e) => {
                for kind in BulkKind::ALL {
                    let n = counts[kind as usize];
                    if n > 0 {
                        self.failed(kind, e, n);
                    }
                }
            }
        }
    }

    fn failed(&self, kind: BulkKind, e: &RedisError, n: u64) {
        self.commands
            .get_or_create(&CommandLabels {
                command: kind.label(),
                outcome: e.kind_label(),
            })
            .inc_by(n);
    }
}
