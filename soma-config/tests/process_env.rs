//! End to end through the real process environment: the parent re-executes
//! this test binary with `Command::env` (the process env is never mutated),
//! and the child loads with the default (process) environment source.

mod common;

use std::process::Command;

use common::AppSettings;
use soma_config::Loader;

/// The child half. It is `#[ignore]`d so a normal run does not execute it
/// on its own; the parent runs it explicitly with `--ignored --exact`.
#[test]
#[ignore = "run by process_env_is_read_end_to_end in a child process"]
fn child_loads_process_env() {
    match Loader::<AppSettings>::new().strict(true).into_live() {
        Ok(live) => println!("SNAPSHOT {}", live.snapshot()),
        Err(err) => println!("ERROR {err}"),
    }
}

fn run_child(envs: &[(std::ffi::OsString, std::ffi::OsString)]) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "child_loads_process_env",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn child test process");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints `test name ... ` before the test's own output.
    stdout
        .lines()
        .find_map(|l| {
            l.find("SNAPSHOT ")
                .or_else(|| l.find("ERROR "))
                .map(|i| l[i..].to_owned())
        })
        .unwrap_or_else(|| panic!("child printed no result: {stdout}"))
}

#[test]
fn process_env_is_read_end_to_end() {
    let line = run_child(&[
        ("SOMA_BUS__BOOTSTRAP_SERVERS".into(), "kafka-1:9092".into()),
        ("SOMA_REDIS__POOL_SIZE".into(), "21".into()),
        ("SOMA_REDIS__PASSWORD".into(), "child-secret".into()),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(line.strip_prefix("SNAPSHOT ").expect(&line)).unwrap();
    assert_eq!(json["config"]["bus"]["bootstrap_servers"], "kafka-1:9092");
    assert_eq!(json["config"]["redis"]["pool_size"], 21);
    assert_eq!(
        json["sources"]["bus"]["detail"],
        "SOMA_BUS__BOOTSTRAP_SERVERS"
    );
    assert_eq!(json["config"]["redis"]["password"], "[REDACTED]");
    assert!(!line.contains("child-secret"));
}

#[cfg(unix)]
#[test]
fn non_utf8_process_env_value_is_a_typed_error_not_a_panic() {
    use std::os::unix::ffi::OsStringExt;
    let line = run_child(&[(
        "SOMA_REDIS__URL".into(),
        std::ffi::OsString::from_vec(vec![b'x', 0xff]),
    )]);
    assert!(line.starts_with("ERROR "), "{line}");
    assert!(
        line.contains("SOMA_REDIS__URL") && line.contains("UTF-8"),
        "{line}"
    );
}
