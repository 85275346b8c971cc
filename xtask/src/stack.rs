//! `cargo xtask stack up|down|status`: the local services.
//!
//! `up` runs every `xtask/stack.d/NN-*.sh` in name order. Each script is
//! idempotent: it installs what is missing and starts what is not running,
//! and is quick when everything is already there. Scripts get two variables:
//! `SOMA_REPO` (the workspace root) and `SOMA_STACK_DIR` (`<root>/.stack`,
//! for data, logs and `<name>.pid` files). `down` stops every process with a
//! pid file there; the machine's own PostgreSQL and Redis are left running.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::root;

const SERVICES: &[(&str, &str)] = &[
    ("PostgreSQL", "127.0.0.1:5432"),
    ("Redis", "127.0.0.1:6379"),
    ("tansu (Kafka protocol)", "127.0.0.1:9092"),
    ("memory (SomaBrain stand-in)", "127.0.0.1:9696"),
];

pub(crate) fn cli(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("up") => up(),
        Some("down") => down(),
        Some("status") => {
            status();
            Ok(())
        }
        _ => Err("usage: cargo xtask stack up|down|status".to_owned()),
    }
}

pub(crate) fn up() -> Result<(), String> {
    let dir = root().join("xtask").join("stack.d");
    let stack_dir = root().join(".stack");
    fs::create_dir_all(&stack_dir).map_err(|e| format!("create {}: {e}", stack_dir.display()))?;
    let mut scripts: Vec<_> = fs::read_dir(&dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    scripts.sort();
    for script in scripts {
        let name = script
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        println!("stack: {name}");
        let status = Command::new("bash")
            .arg(&script)
            .env("SOMA_REPO", root())
            .env("SOMA_STACK_DIR", &stack_dir)
            .current_dir(root())
            .status()
            .map_err(|e| format!("could not run {name}: {e}"))?;
        if !status.success() {
            return Err(format!("stack script {name} failed ({status})"));
        }
    }
    status();
    Ok(())
}

fn down() -> Result<(), String> {
    let stack_dir = root().join(".stack");
    let Ok(entries) = fs::read_dir(&stack_dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "pid") {
            if let Ok(pid) = fs::read_to_string(&path) {
                let pid = pid.trim();
                println!("stack: stopping {} (pid {pid})", path.display());
                let _ = Command::new("kill").arg(pid).status();
            }
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

fn status() {
    for (name, addr) in SERVICES {
        let up = addr
            .parse::<SocketAddr>()
            .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
        println!("  {name:<24} {addr:<16} {}", if up { "up" } else { "DOWN" });
    }
}
