//! The chaos stack's private dependencies: a PostgreSQL cluster, a
//! redis-server and a tansu broker on their own loopback ports with their
//! own data under the chaos directory, so faults never reach the shared
//! services on 5432, 6379 and 9092.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A child process writing to a log file; killed when dropped.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// `Some(status)` when the process has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// `kill -9`.
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub(crate) fn terminate(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill9();
        }
    }
}

/// Whether something accepts TCP connections on `addr`.
pub(crate) fn port_open(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// Waits until `addr` accepts connections.
pub(crate) fn wait_port(what: &str, addr: &str, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !port_open(addr) {
        if Instant::now() > deadline {
            return Err(format!("{what} did not open {addr} within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A private PostgreSQL 15 cluster (trust auth, run as the `postgres` user
/// when we are root).
#[derive(Clone)]
pub(crate) struct Postgres {
    pub(crate) name: &'static str,
    pub(crate) port: u16,
    pub(crate) data: PathBuf,
    pub(crate) log: PathBuf,
    /// More server options (`-c name=value …`), e.g. a preloaded library.
    pub(crate) extra_opts: String,
}

impl Postgres {
    pub(crate) fn new(name: &'static str, dir: &Path, port: u16) -> Self {
        Self {
            name,
            port,
            data: dir.join(name),
            log: dir.join(format!("{name}.log")),
            extra_opts: String::new(),
        }
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub(crate) fn pid(&self) -> Option<u32> {
        fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn as_postgres(program: &str) -> Command {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=200 {}",
            self.port,
            self.data.display(),
            self.extra_opts
        );
        let status = Self::as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &opts, "-w", "-t", "60"])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("pg_ctl {}: {e}", args.join(" ")))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: pg_ctl {} failed ({status}); log {}",
                self.name,
                args.join(" "),
                self.log.display()
            ))
        }
    }

    /// `initdb` on first use, then starts the cluster unless it is running.
    pub(crate) fn start(&self) -> Result<(), String> {
        if !self.data.join("PG_VERSION").exists() {
            fs::create_dir_all(&self.data).map_err(|e| e.to_string())?;
            if is_root() {
                chown_postgres(&self.data)?;
                File::create(&self.log).map_err(|e| e.to_string())?;
                chown_postgres(&self.log)?;
            }
            let out = Self::as_postgres(&format!("{PG_BIN}/initdb"))
                .arg("-D")
                .arg(&self.data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .output()
                .map_err(|e| format!("initdb: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{}: initdb failed: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        if port_open(&self.addr()) {
            return Ok(());
        }
        self.pg_ctl(&["start"])
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the cluster is
    /// back when this returns.
    pub(crate) fn restart(&self) -> Result<(), String> {
        self.pg_ctl(&["restart", "-m", "fast"])
    }

    pub(crate) fn stop(&self) -> Result<(), String> {
        if !self.data.join("postmaster.pid").exists() {
            return Ok(());
        }
        self.pg_ctl(&["stop", "-m", "fast"])
    }

    /// Runs `sql` in `db` with psql; returns the unaligned, tuples-only output.
    pub(crate) fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "psql on {}: {}",
                self.addr(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs a SQL file in `db`.
    pub(crate) fn psql_file(&self, db: &str, file: &Path) -> Result<(), String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-f",
            ])
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "psql -f {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Drops and creates `db`: a fresh database per scenario.
    pub(crate) fn recreate_db(&self, db: &str) -> Result<(), String> {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        )?;
        self.psql("postgres", &format!("CREATE DATABASE {db}"))?;
        Ok(())
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn chown_postgres(path: &Path) -> Result<(), String> {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .map_err(|e| format!("chown: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("chown postgres {} failed", path.display()))
}

/// A private redis-server that keeps nothing on disk (as the shared one).
pub(crate) struct Redis {
    pub(crate) port: u16,
    dir: PathBuf,
    /// Where its output goes (set per scenario).
    pub(crate) log: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub(crate) fn new(dir: &Path, port: u16) -> Self {
        Self {
            port,
            dir: dir.join("redis"),
            log: dir.join("redis.log"),
            proc: None,
        }
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn start(&mut self) -> Result<(), String> {
        fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir);
        self.proc = Some(Proc::spawn("redis", cmd, &self.log)?);
        wait_port("redis", &self.addr(), Duration::from_secs(10))
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }
}

/// Where the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// `sqlite://tansu.db` in the broker's directory.
    Sqlite,
    /// A database in a second private PostgreSQL cluster (so restarting the
    /// platform's PostgreSQL does not take the broker's storage with it).
    Postgres,
}

/// A private tansu broker.
pub(crate) struct Broker {
    pub(crate) port: u16,
    dir: PathBuf,
    storage_url: String,
    /// Where its output goes (set per scenario).
    pub(crate) log: PathBuf,
    proc: Option<Proc>,
}

impl Broker {
    pub(crate) fn new(dir: &Path, port: u16, storage_url: String) -> Self {
        Self {
            port,
            dir: dir.join("tansu"),
            storage_url,
            log: dir.join("tansu.log"),
            proc: None,
        }
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// Removes the broker's SQLite data (a fresh broker per scenario).
    pub(crate) fn wipe(&self) -> Result<(), String> {
        if self.dir.exists() {
            for entry in fs::read_dir(&self.dir).map_err(|e| e.to_string())? {
                let path = entry.map_err(|e| e.to_string())?.path();
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("tansu.db"))
                {
                    fs::remove_file(&path).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn start(&mut self) -> Result<(), String> {
        fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tansu_bin());
        // tansu reads LISTENER_URL, STORAGE_ENGINE, … as flag defaults; the
        // flags win, and nothing else leaks in.
        for var in [
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "CLUSTER_ID",
        ] {
            cmd.env_remove(var);
        }
        cmd.current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage_url]);
        self.proc = Some(Proc::spawn("tansu", cmd, &self.log)?);
        wait_port("tansu", &self.addr(), Duration::from_secs(30))
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }
}

fn tansu_bin() -> PathBuf {
    let installed = crate::cargo_bin_dir().join("tansu");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("tansu")
    }
}

/// The local memory service (`examples/memory-service`, the SomaBrain
/// stand-in) on a private port, storing in the chaos database.
pub(crate) struct MemoryService {
    pub(crate) addr: &'static str,
    bin: PathBuf,
    config: PathBuf,
    postgres_url: String,
    /// Where its output goes (set per scenario).
    pub(crate) log: PathBuf,
    proc: Option<Proc>,
}

impl MemoryService {
    pub(crate) fn new(
        addr: &'static str,
        bin: PathBuf,
        config: PathBuf,
        postgres_url: String,
    ) -> Self {
        Self {
            addr,
            bin,
            config,
            postgres_url,
            log: PathBuf::from("memory-service.log"),
            proc: None,
        }
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    pub(crate) fn start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .env("SOMA_HTTP__BIND", self.addr)
            .env("SOMA_POSTGRES__URL", &self.postgres_url);
        self.proc = Some(Proc::spawn("memory-service", cmd, &self.log)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(
                crate::platform::http(self.addr, "GET", "/readyz", &[], ""),
                Ok((200, _))
            ) {
                return Ok(());
            }
            if let Some(p) = &mut self.proc {
                if let Some(status) = p.exited() {
                    return Err(format!(
                        "the memory service exited ({status}); log: {}",
                        self.log.display()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the memory service was not ready on {} within 30 s; log: {}",
                    self.addr,
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }
}
