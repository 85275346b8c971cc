//! The bulk path: [`Bulk`] batches of `GET`/`SET`/`DEL`/`PEXPIRE` encoded
//! into one buffer and sent on a dedicated connection, for cache warm-ups and
//! bulk reads and writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fred::bytes_utils::Str;
use fred::types::Value;
use fred::types::config::{Config as FredConfig, ServerConfig};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, MutexGuard};

use crate::client::redact_url;
use crate::metrics::BulkKind;
use crate::{ReconnectConfig, RedisClient, RedisConfig, RedisError, Ttl};

/// At most this many commands are written before their replies are read.
const MAX_ROUND_TRIP_COMMANDS: usize = 1024;
/// ... or this many bytes of commands (at least one command).
const MAX_ROUND_TRIP_BYTES: usize = 1 << 20;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// A connection idle for longer than this is checked for a server-side close
/// before it is reused.
const IDLE_CHECK_AFTER: Duration = Duration::from_millis(500);

/// `n` in decimal ASCII, written to the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A batch of commands for [`RedisClient::run_bulk`].
///
/// Commands are encoded as they are added; the batch can be run any number
/// of times and reused after [`clear`](Self::clear). Replies come back in the
/// order the commands were added, one per command. Every `SET` takes a
/// [`Ttl`]: there is no default, so a key without expiry is always an
/// explicit [`Ttl::NoExpiry`] in code.
///
/// # Why a second path
///
/// fred sends every command as its own future through a channel to a routing
/// task, and every reply back through another; that costs a few µs of CPU per
/// command, which is nothing for a request handler and everything for a
/// million-key warm-up (pipelined fred reaches a quarter or less of
/// `redis-benchmark -P 16` on two cores). Here a whole batch is encoded into
/// one buffer of RESP arrays as commands are added, written with one
/// `write`, and its replies are parsed in order (with `redis-protocol`, the
/// codec fred itself uses) from the same connection by the calling task. No
/// per-command future, channel or task hop: about 0.9–1.0× the throughput of
/// `redis-benchmark -P 16` for the same commands (see the crate README).
///
/// Commands of one batch run in order on one connection. Concurrent batches
/// run on different connections, in no particular order relative to each
/// other.
///
/// # Connections
///
/// [`RedisConfig::bulk_connections`](crate::RedisConfig::bulk_connections)
/// dedicated connections (default 4), opened on first use and then kept. A
/// batch takes one connection for the time of its round trip(s), so at most
/// that many batches are in flight; more callers wait (queued per
/// connection, first come first served) for a free one. That wait is not
/// part of `command_timeout_ms`, but it is bounded, because every batch
/// holding a connection is. Each connection is set up like the pooled ones:
/// TCP with nodelay, TLS for `rediss://` (fred's rustls connector, platform
/// roots, the URL's host as server name), `AUTH` (ACL user and password, from
/// the config or the URL) and `SELECT` of the URL's database, all within
/// `connect_timeout_ms`. Standalone servers only: with a sentinel or cluster
/// topology every bulk call fails with [`RedisError::Config`]
/// (`is_invalid()`), since keys would have to be routed per slot.
///
/// # Behaviour under failure
///
/// * **Per command**: a server error (`WRONGTYPE`, `OOM`, `NOPERM`...) is
///   that command's `Err`; the other commands of the batch ran and have their
///   replies.
/// * **Whole batch**: a broken connection fails the batch with
///   [`RedisError::is_connection`]; no reply within `command_timeout_ms` fails
///   it with [`RedisError::is_timeout`]. Either way the connection is closed
///   (its remaining replies can no longer be matched to commands) and the next
///   batch opens a new one. Some commands of a failed batch may have run.
///   Batches are never retried by this crate.
/// * **Server down**: a failed connect starts a backoff shared by all bulk
///   connections (`reconnect.*` settings: exponential with jitter). Until it
///   expires every batch that would need a new connection fails at once with
///   a connection error, so callers do not pile up behind connect timeouts.
/// * **Idle connections** (plain TCP, idle for over 500 ms) are checked for
///   a close by the server before reuse, so after a Redis restart the first batch reconnects
///   instead of failing.
/// * A caller that drops the future mid-batch closes that connection; nothing
///   is left queued.
///
/// # Example
///
/// ```no_run
/// # async fn demo(client: soma_redis::RedisClient) -> Result<(), soma_redis::RedisError> {
/// use soma_redis::{Bulk, Ttl};
/// let keys = client.keys();
/// let mut warm = Bulk::with_capacity(1000);
/// for id in 0..1000 {
///     let key = keys.key("acme", "cache.price", &id.to_string())?;
///     warm.set(&key, format!("{{\"price\":{id}}}"), Ttl::secs(300))?;
/// }
/// for reply in client.run_bulk(&warm).await? {
///     reply?; // a per-command server error, e.g. OOM
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Bulk {
    buf: BytesMut,
    /// Per command: its kind and the end offset of its encoding in `buf`.
    cmds: Vec<(BulkKind, usize)>,
    counts: [u64; BulkKind::COUNT],
}

impl std::fmt::Debug for Bulk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bulk")
            .field("commands", &self.cmds.len())
            .field("bytes", &self.buf.len())
            .finish()
    }
}

impl Bulk {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for about `commands` small commands.
    pub fn with_capacity(commands: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(commands.saturating_mul(64)),
            cmds: Vec::with_capacity(commands),
            counts: [0; BulkKind::COUNT],
        }
    }

    /// Adds `GET key`. Reply: [`Value::Bytes`] or [`Value::Null`].
    pub fn get(&mut self, key: &str) -> &mut Self {
        self.push(BulkKind::Get, &[b"GET", key.as_bytes()]);
        self
    }

    /// Adds `SET key value PX ttl` (or `SET key value` for
    /// [`Ttl::NoExpiry`]). Reply: `Value::String("OK")`.
    ///
    /// Errors (and adds nothing) on a TTL below 1 ms.
    pub fn set(
        &mut self,
        key: &str,
        value: impl AsRef<[u8]>,
        ttl: Ttl,
    ) -> Result<&mut Self, RedisError> {
        let (key, value) = (key.as_bytes(), value.as_ref());
        let mut digits = [0u8; 20];
        match ttl.as_millis()? {
            Some(ms) => {
                let ms = decimal(ms.unsigned_abs(), &mut digits);
                self.push(BulkKind::Set, &[b"SET", key, value, b"PX", ms]);
            }
            None => self.push(BulkKind::Set, &[b"SET", key, value]),
        }
        Ok(self)
    }

    /// Adds `DEL key`. Reply: `Value::Integer(0 or 1)`.
    pub fn del(&mut self, key: &str) -> &mut Self {
        self.push(BulkKind::Del, &[b"DEL", key.as_bytes()]);
        self
    }

    /// Adds `PEXPIRE key ttl` (or `PERSIST key` for [`Ttl::NoExpiry`]).
    /// Reply: `Value::Integer(1)` when the key exists, `0` otherwise.
    ///
    /// Errors (and adds nothing) on a TTL below 1 ms.
    pub fn expire(&mut self, key: &str, ttl: Ttl) -> Result<&mut Self, RedisError> {
        let mut digits = [0u8; 20];
        match ttl.as_millis()? {
            Some(ms) => {
                let ms = decimal(ms.unsigned_abs(), &mut digits);
                self.push(BulkKind::Expire, &[b"PEXPIRE", key.as_bytes(), ms]);
            }
            None => self.push(BulkKind::Expire, &[b"PERSIST", key.as_bytes()]),
        }
        Ok(self)
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// `true` when the batch has no commands.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Removes every command, keeping the allocated buffers.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.cmds.clear();
        self.counts = [0; BulkKind::COUNT];
    }

    pub(crate) fn counts(&self) -> &[u64; BulkKind::COUNT] {
        &self.counts
    }

    pub(crate) fn kind(&self, i: usize) -> BulkKind {
        self.cmds[i].0
    }

    /// Appends one command as a RESP array of bulk strings. Hand-written
    /// rather than `redis-protocol`'s encoder, which sizes every frame with a
    /// floating-point `log10` (about 9 % of the client's CPU in a profile of
    /// the SET benchmark); replies are decoded with `redis-protocol`.
    fn push(&mut self, kind: BulkKind, args: &[&[u8]]) {
        let mut digits = [0u8; 20];
        let len = 16 + args.iter().map(|a| a.len() + 16).sum::<usize>();
        self.buf.reserve(len);
        self.buf.extend_from_slice(b"*");
        self.buf
            .extend_from_slice(decimal(args.len() as u64, &mut digits));
        self.buf.extend_from_slice(b"\r\n");
        for arg in args {
            self.buf.extend_from_slice(b"$");
            self.buf
                .extend_from_slice(decimal(arg.len() as u64, &mut digits));
            self.buf.extend_from_slice(b"\r\n");
            self.buf.extend_from_slice(arg);
            self.buf.extend_from_slice(b"\r\n");
        }
        self.cmds.push((kind, self.buf.len()));
        self.counts[kind as usize] += 1;
    }

    /// `(first command, end command, byte range)` of each round trip.
    fn round_trips(&self) -> impl Iterator<Item = (usize, usize, std::ops::Range<usize>)> + '_ {
        let mut first = 0;
        std::iter::from_fn(move || {
            if first >= self.cmds.len() {
                return None;
            }
            let start_byte = if first == 0 {
                0
            } else {
                self.cmds[first - 1].1
            };
            let mut end = first + 1;
            while end < self.cmds.len()
                && end - first < MAX_ROUND_TRIP_COMMANDS
                && self.cmds[end].1 - start_byte <= MAX_ROUND_TRIP_BYTES
            {
                end += 1;
            }
            let range = start_byte..self.cmds[end - 1].1;
            let r = (first, end, range);
            first = end;
            Some(r)
        })
    }
}

/// One reply of a [`Bulk`] batch: the command's value, or the server's error
/// for that command.
pub type BulkReply = Result<Value, RedisError>;

impl RedisClient {
    /// Sends `bulk` on a dedicated bulk connection and returns one reply per
    /// command, in order. The outer error fails the whole batch (connection,
    /// timeout, unsupported topology); a server error for one command is that
    /// command's `Err`. See [`Bulk`] for the guarantees.
    ///
    /// Up to 1024 commands (or 1 MiB) are written per round trip;
    /// `command_timeout_ms` bounds each round trip. The batch is never
    /// retried.
    pub async fn run_bulk(&self, bulk: &Bulk) -> Result<Vec<BulkReply>, RedisError> {
        if bulk.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let result = self
            .inner
            .bulk
            .run(bulk, &self.inner.metrics.reconnects)
            .await;
        self.inner
            .metrics
            .observe_bulk(bulk, &result, start.elapsed());
        result
    }
}

/// Where and how the bulk connections connect, from fred's parsed config.
struct Target {
    host: String,
    port: u16,
    tls: Option<(fred::types::config::TlsConnector, String)>,
    username: Option<String>,
    password: Option<String>,
    database: Option<u8>,
    display: String,
}

impl Target {
    fn from_config(fc: &FredConfig, url: &str) -> Result<Self, String> {
        let server = match &fc.server {
            ServerConfig::Centralized { server } => server,
            _ => {
                return Err(format!(
                    "the bulk path supports standalone servers only, not {}",
                    redact_url(url)
                ));
            }
        };
        let tls = match &fc.tls {
            None => None,
            Some(tls) => {
                let name = server
                    .tls_server_name
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| server.host.to_string());
                Some((tls.connector.clone(), name))
            }
        };
        Ok(Self {
            host: server.host.to_string(),
            port: server.port,
            tls,
            username: fc.username.clone(),
            password: fc.password.clone(),
            database: fc.database,
            display: redact_url(url),
        })
    }
}

trait TlsIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> TlsIo for T {}

enum Io {
    Tcp(TcpStream),
    Tls(Box<dyn TlsIo>),
}

struct Conn {
    io: Io,
    rbuf: BytesMut,
    last_used: Instant,
}

impl Conn {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.io {
            Io::Tcp(s) => s.write_all(bytes).await,
            Io::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        self.rbuf.reserve(READ_CHUNK);
        match &mut self.io {
            Io::Tcp(s) => s.read_buf(&mut self.rbuf).await,
            Io::Tls(s) => s.read_buf(&mut self.rbuf).await,
        }
    }

    /// `false` when the server closed the connection (or sent something
    /// unsolicited) while it was idle. Plain TCP only; one non-blocking read.
    fn idle_ok(&self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        match &self.io {
            Io::Tcp(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            Io::Tls(_) => true,
        }
    }

    /// Writes `bytes` (holding `n` commands) and appends their `n` replies.
    async fn round_trip(
        &mut self,
        bytes: &[u8],
        n: usize,
        out: &mut Vec<BulkReply>,
    ) -> Result<(), RedisError> {
        self.write_all(bytes).await.map_err(io_error)?;
        let mut got = 0;
        while got < n {
            match decode_bytes_mut(&mut self.rbuf) {
                Ok(Some((frame, _, _))) => {
                    out.push(to_reply(frame));
                    got += 1;
                }
                Ok(None) => {
                    if self.fill().await.map_err(io_error)? == 0 {
                        return Err(RedisError::Connection(
                            "bulk connection closed by the server".into(),
                        ));
                    }
                }
                Err(e) => {
                    return Err(RedisError::Decode(format!(
                        "bad reply on the bulk connection: {e}"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn io_error(e: std::io::Error) -> RedisError {
    RedisError::Connection(format!("bulk connection: {e}"))
}

fn to_reply(frame: BytesFrame) -> BulkReply {
    match frame {
        BytesFrame::BulkString(b) => Ok(Value::Bytes(b)),
        BytesFrame::Null => Ok(Value::Null),
        BytesFrame::SimpleString(s) if s.as_ref() == b"OK" => {
            Ok(Value::String(Str::from_static("OK")))
        }
        BytesFrame::SimpleString(s) => Ok(simple_string(s)),
        BytesFrame::Integer(i) => Ok(Value::Integer(i)),
        BytesFrame::Error(e) => Err(RedisError::from_server_reply(&e)),
        BytesFrame::Array(items) => items
            .into_iter()
            .map(to_reply)
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
    }
}

fn simple_string(b: Bytes) -> Value {
    match Str::from_inner(b) {
        Ok(s) => Value::String(s),
        Err(e) => Value::Bytes(e.into_inner()),
    }
}

#[derive(Default)]
struct Slot {
    conn: Option<Conn>,
    /// This slot had a connection before, so the next one is a reconnect.
    had_connection: bool,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

/// The dedicated bulk connections of one client.
pub(crate) struct BulkPool {
    target: Result<Arc<Target>, String>,
    slots: Box<[Mutex<Slot>]>,
    next: AtomicUsize,
    backoff: parking_lot::Mutex<Backoff>,
    reconnect: ReconnectConfig,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl BulkPool {
    pub(crate) fn new(fc: Option<&FredConfig>, config: &RedisConfig) -> Self {
        let target = match fc {
            Some(fc) => Target::from_config(fc, &config.url).map(Arc::new),
            None => Err("no redis configuration".to_owned()),
        };
        Self {
            target,
            slots: (0..config.bulk_connections.max(1))
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            next: AtomicUsize::new(0),
            backoff: parking_lot::Mutex::new(Backoff::default()),
            reconnect: config.reconnect.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms.max(1)),
            command_timeout: Duration::from_millis(config.command_timeout_ms.max(1)),
        }
    }

    /// A free slot if there is one, else the next one in turn (FIFO wait).
    async fn checkout(&self) -> MutexGuard<'_, Slot> {
        let n = self.slots.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(g) = self.slots[(first + i) % n].try_lock() {
                return g;
            }
        }
        self.slots[first % n].lock().await
    }

    async fn run(
        &self,
        bulk: &Bulk,
        reconnects: &prometheus_client::metrics::counter::Counter,
    ) -> Result<Vec<BulkReply>, RedisError> {
        let target = self
            .target
            .as_ref()
            .map_err(|e| RedisError::Config(e.clone()))?;
        let mut slot = self.checkout().await;
        // The connection is taken out of its slot for the round trips: if
        // anything fails, or the caller drops this future, it is closed and
        // the slot is left empty for the next batch to reconnect.
        let mut conn = match slot.conn.take() {
            Some(c) if c.last_used.elapsed() < IDLE_CHECK_AFTER || c.idle_ok() => c,
            stale => {
                let reconnect = slot.had_connection || stale.is_some();
                drop(stale);
                let c = self.connect(target).await?;
                slot.had_connection = true;
                if reconnect {
                    reconnects.inc();
                }
                c
            }
        };
        let mut out = Vec::with_capacity(bulk.len());
        for (first, end, range) in bulk.round_trips() {
            let trip = conn.round_trip(&bulk.buf[range], end - first, &mut out);
            match tokio::time::timeout(self.command_timeout, trip).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, server = %target.display, "redis bulk connection failed");
                    return Err(e);
                }
                Err(_) => {
                    return Err(RedisError::Timeout(format!(
                        "bulk round trip of {} commands after {:?}",
                        end - first,
                        self.command_timeout
                    )));
                }
            }
        }
        conn.last_used = Instant::now();
        slot.conn = Some(conn);
        Ok(out)
    }

    async fn connect(&self, target: &Target) -> Result<Conn, RedisError> {
        if let Some(at) = self.backoff.lock().retry_at {
            let now = Instant::now();
            if now < at {
                return Err(RedisError::Connection(format!(
                    "bulk connection to {} down; next attempt in {:?}",
                    target.display,
                    at - now
                )));
            }
        }
        let attempt = tokio::time::timeout(self.connect_timeout, open(target)).await;
        let result = match attempt {
            Ok(r) => r,
            Err(_) => Err(RedisError::Connection(format!(
                "no bulk connection to {} within {:?}",
                target.display, self.connect_timeout
            ))),
        };
        let mut b = self.backoff.lock();
        match &result {
            Ok(_) => *b = Backoff::default(),
            Err(e) if e.is_connection() || e.is_timeout() => {
                b.failures = b.failures.saturating_add(1);
                b.retry_at = Some(Instant::now() + backoff_delay(&self.reconnect, b.failures));
            }
            Err(_) => {}
        }
        result
    }
}

/// `min(max_delay, min_delay * base^(n-1)) + rand(0..jitter)`.
fn backoff_delay(r: &ReconnectConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = u64::from(r.base.max(1));
    let delay = u64::from(r.initial_ms.max(1))
        .saturating_mul(base.saturating_pow(exp))
        .min(u64::from(r.max_ms.max(1)));
    let jitter = if r.jitter_ms > 0 {
        rand::random_range(0..u64::from(r.jitter_ms))
    } else {
        0
    };
    Duration::from_millis(delay + jitter)
}

/// TCP (+ TLS), then `AUTH` and `SELECT` in one round trip.
async fn open(target: &Target) -> Result<Conn, RedisError> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| RedisError::Connection(format!("bulk connect to {}: {e}", target.display)))?;
    tcp.set_nodelay(true).map_err(io_error)?;
    let io = match &target.tls {
        None => Io::Tcp(tcp),
        Some((connector, name)) => Io::Tls(tls_connect(connector, name, tcp).await?),
    };
    let mut conn = Conn {
        io,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        last_used: Instant::now(),
    };
    let mut hello = Bulk::new();
    if let Some(password) = target.password.as_deref() {
        match target.username.as_deref().filter(|u| !u.is_empty()) {
            Some(user) => hello.push(
                BulkKind::Internal,
                &[b"AUTH", user.as_bytes(), password.as_bytes()],
            ),
            None => hello.push(BulkKind::Internal, &[b"AUTH", password.as_bytes()]),
        }
    }
    if let Some(db) = target.database.filter(|db| *db != 0) {
        let mut digits = [0u8; 20];
        hello.push(
            BulkKind::Internal,
            &[b"SELECT", decimal(u64::from(db), &mut digits)],
        );
    }
    if !hello.is_empty() {
        let mut out = Vec::with_capacity(hello.len());
        conn.round_trip(&hello.buf, hello.len(), &mut out).await?;
        for reply in out {
            match reply {
                Ok(_) => {}
                Err(RedisError::Server(msg)) => {
                    return Err(RedisError::Config(format!(
                        "bulk connection setup on {}: {msg}",
                        target.display
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(conn)
}

async fn tls_connect(
    connector: &fred::types::config::TlsConnector,
    name: &str,
    tcp: TcpStream,
) -> Result<Box<dyn TlsIo>, RedisError> {
    use fred::types::config::TlsConnector;
    #[allow(unreachable_patterns)]
    match connector {
        TlsConnector::Rustls(c) => {
            let server_name = fred::rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| RedisError::Config(format!("bad TLS server name {name:?}: {e}")))?;
            let stream = c
                .connect(server_name, tcp)
                .await
                .map_err(|e| RedisError::Connection(format!("TLS handshake with {name}: {e}")))?;
            Ok(Box::new(stream))
        }
        _ => Err(RedisError::Config(
            "the bulk path supports rustls connectors only".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_with_ttls() {
        let mut b = Bulk::new();
        b.get("k1");
        b.set("k2", "v", Ttl::millis(1500)).unwrap();
        b.set("k3", b"raw".as_slice(), Ttl::NoExpiry).unwrap();
        b.del("k4");
        b.expire("k5", Ttl::secs(2)).unwrap();
        assert!(b.set("k", "v", Ttl::After(Duration::ZERO)).is_err());
        assert_eq!(b.len(), 5);
        assert_eq!(
            std::str::from_utf8(&b.buf).unwrap(),
            "*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n\
             *5\r\n$3\r\nSET\r\n$2\r\nk2\r\n$1\r\nv\r\n$2\r\nPX\r\n$4\r\n1500\r\n\
             *3\r\n$3\r\nSET\r\n$2\r\nk3\r\n$3\r\nraw\r\n\
             *2\r\n$3\r\nDEL\r\n$2\r\nk4\r\n\
             *3\r\n$7\r\nPEXPIRE\r\n$2\r\nk5\r\n$4\r\n2000\r\n"
        );
        assert_eq!(b.counts()[BulkKind::Set as usize], 2);
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(u64::MAX, &mut d), b"18446744073709551615");
        b.clear();
        assert!(b.is_empty() && b.buf.is_empty());
    }

    #[test]
    fn splits_into_round_trips_on_command_boundaries() {
        let mut b = Bulk::new();
        for i in 0..(MAX_ROUND_TRIP_COMMANDS * 2 + 5) {
            b.get(&format!("k{i}"));
        }
        let trips: Vec<_> = b.round_trips().collect();
        assert_eq!(trips.len(), 3);
        assert_eq!(trips[0].0..trips[0].1, 0..MAX_ROUND_TRIP_COMMANDS);
        assert_eq!(trips[2].1 - trips[2].0, 5);
        assert_eq!(trips[0].2.end, trips[1].2.start);
        assert_eq!(trips[2].2.end, b.buf.len());

        let mut big = Bulk::new();
        let value = vec![b'x'; MAX_ROUND_TRIP_BYTES / 2 + 1];
        for i in 0..3 {
            big.set(&format!("k{i}"), &value, Ttl::secs(1)).unwrap();
        }
        // each round trip stays under the byte limit, but holds at least one command
        assert_eq!(big.round_trips().count(), 3);
    }

    #[test]
    fn replies_map_to_values_and_typed_errors() {
        let mut buf = BytesMut::from(
            &b"+OK\r\n$3\r\nabc\r\n$-1\r\n:7\r\n-WRONGTYPE Operation against a key\r\n-NOPERM no\r\n"[..],
        );
        let mut out = Vec::new();
        while let Some((f, _, _)) = decode_bytes_mut(&mut buf).unwrap() {
            out.push(to_reply(f));
        }
        assert!(matches!(&out[0], Ok(Value::String(s)) if &**s == "OK"));
        assert!(matches!(&out[1], Ok(Value::Bytes(b)) if b.as_ref() == b"abc"));
        assert!(matches!(out[2], Ok(Value::Null)));
        assert!(matches!(out[3], Ok(Value::Integer(7))));
        let e = out[4].as_ref().unwrap_err();
        assert!(matches!(e, RedisError::Server(m) if m.starts_with("WRONGTYPE")));
        assert!(!e.is_retryable() && !e.is_connection());
        assert!(matches!(out[5], Err(RedisError::Auth(_))));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = ReconnectConfig {
            max_attempts: 0,
            initial_ms: 10,
            max_ms: 100,
            base: 2,
            jitter_ms: 0,
        };
        assert_eq!(backoff_delay(&r, 1), Duration::from_millis(10));
        assert_eq!(backoff_delay(&r, 3), Duration::from_millis(40));
        assert_eq!(backoff_delay(&r, 50), Duration::from_millis(100));
    }

    #[test]
    fn other_topologies_are_a_typed_config_error() {
        let fc = FredConfig::from_url("redis-cluster://127.0.0.1:7000").unwrap();
        let e = Target::from_config(&fc, "redis-cluster://127.0.0.1:7000").err();
        assert!(e.unwrap().contains("standalone"));
        let fc = FredConfig::from_url("redis://u:pw@127.0.0.1:6380/3").unwrap();
        let t = Target::from_config(&fc, "redis://u:pw@127.0.0.1:6380/3").unwrap();
        assert_eq!((t.port, t.database), (6380, Some(3)));
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert!(!t.display.contains("pw"));
    }
}
