//! A tansu broker owned by one test (or benchmark): its own port and SQLite
//! file, started and killed at will.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tansu broker owned by one test: its own port and SQLite file, so it
/// can be killed and restarted without disturbing other tests, and loaded
/// without slowing the shared broker. The process is killed (SIGKILL) when
/// this is dropped; its data directory is removed with it.
///
/// Needs the `tansu` binary on `PATH` (or in `/root/.cargo/bin` or
/// `/usr/local/bin`), as the local stack installs it.
pub struct OwnBroker {
    /// The loopback port the broker listens on.
    pub port: u16,
    /// The port clients are told to connect to (metadata); `port` unless a
    /// proxy sits in front (see [`OwnBroker::behind_proxy`]).
    advertised_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn tansu_binary() -> PathBuf {
    for c in ["tansu", "/root/.cargo/bin/tansu", "/usr/local/bin/tansu"] {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
        {
            return PathBuf::from(c);
        }
    }
    panic!(
        "the tansu broker binary is not installed (needed to start a private broker); {}",
        crate::HOW_TO_START
    );
}

impl OwnBroker {
    /// Starts a broker on a free loopback port and waits (up to 20 s) until
    /// it listens.
    ///
    /// # Panics
    ///
    /// If tansu is not installed, cannot be started, or does not listen in
    /// time (the message names its log file).
    pub fn start() -> Self {
        let port = crate::free_port();
        Self::start_advertising(port, port)
    }

    /// A broker listening on a free port that tells clients (in metadata) to
    /// connect to `advertised_port` instead, where a proxy (such as
    /// `FaultProxy`, feature `fault-proxy`) forwards to [`port`](Self::port):
    /// every connection of its clients then goes through the proxy.
    ///
    /// # Panics
    ///
    /// As [`OwnBroker::start`].
    pub fn behind_proxy(advertised_port: u16) -> Self {
        Self::start_advertising(crate::free_port(), advertised_port)
    }

    fn start_advertising(port: u16, advertised_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Self {
            port,
            advertised_port,
            dir,
            child: None,
        };
        b.spawn();
        b
    }

    /// `127.0.0.1:<port>`: the bootstrap servers of this broker.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let log = std::fs::File::create(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu_binary())
            .current_dir(self.dir.path())
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < end,
                "private tansu did not start; log in {}",
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The broker's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// The broker's data directory (its SQLite file and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the broker with SIGKILL: no shutdown, no flush. Its data stays
    /// for [`restart`](Self::restart).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL on Unix
            let _ = c.wait();
        }
    }

    /// Kills the broker (if running) and starts it again on the same port
    /// and data, waiting until it listens.
    ///
    /// # Panics
    ///
    /// As [`OwnBroker::start`].
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}
