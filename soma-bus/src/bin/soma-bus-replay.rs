//! `soma-bus-replay`: republish dead-lettered messages from `<topic>.dlq` to
//! `<topic>`, the topic the DLQ belongs to (records whose origin header names
//! another topic are refused and stay in the DLQ).
//!
//! All settings come from arguments (this tool reads no environment
//! variables). The SASL password, if any, is read from a file so it never
//! appears in the process list. Prints a JSON report; exits non-zero on error,
//! when replay did not reach the end of the DLQ, or when it refused records.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use soma_bus::{BusConfig, BusProducer, ReplayOptions, replay_dlq};

/// Republish messages from a DLQ topic to their origin topic.
#[derive(Debug, Parser)]
#[command(name = "soma-bus-replay", version)]
struct Args {
    /// DLQ topic to replay, e.g. `orders.dlq` (replayed to `orders`).
    #[arg(long)]
    dlq_topic: String,
    /// Suffix that makes a topic's DLQ name (`<topic><suffix>`).
    #[arg(long, default_value = ".dlq")]
    dlq_suffix: String,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap_servers: String,
    /// Consumer group that remembers replay progress.
    #[arg(long, default_value = "soma.replay")]
    group: String,
    /// Skip messages already replayed this many times.
    #[arg(long, default_value_t = 3)]
    replay_max: u32,
    /// Stop after this many DLQ records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Seconds to wait for the next record before stopping.
    #[arg(long, default_value_t = 10)]
    idle_timeout_secs: u64,
    /// Kafka client id.
    #[arg(long, default_value = "soma-bus-replay")]
    client_id: String,
    /// `security.protocol`.
    #[arg(long, default_value = "plaintext")]
    security_protocol: String,
    /// SASL mechanism.
    #[arg(long)]
    sasl_mechanism: Option<String>,
    /// SASL username.
    #[arg(long)]
    sasl_username: Option<String>,
    /// File holding the SASL password (trailing newline trimmed).
    #[arg(long)]
    sasl_password_file: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let sasl_password = match &args.sasl_password_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => Some(soma_config::Secret::new(s.trim_end_matches(['\n', '\r']))),
            Err(e) => {
                eprintln!("cannot read --sasl-password-file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let mut config = BusConfig::default();
    config.bootstrap_servers = args.bootstrap_servers;
    config.client_id = args.client_id;
    config.security_protocol = args.security_protocol;
    config.sasl_mechanism = args.sasl_mechanism;
    config.sasl_username = args.sasl_username;
    config.sasl_password = sasl_password;
    config.consumer.replay_max = args.replay_max;
    config.consumer.dlq_suffix = args.dlq_suffix;
    let producer = match BusProducer::new(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = ReplayOptions {
        group: Some(args.group),
        max_messages: args.max_messages,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        ..ReplayOptions::new(args.dlq_topic)
    };
    let result = replay_dlq(&config, &producer, &opts, None).await;
    let flushed = producer.flush(Duration::from_secs(10)).await;
    match result {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.complete && report.refused == 0 && flushed.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
