//! The bulk path: [`Bulk`] batches of `GET`/`SET`/`DEL`/`PEXPIRE` encoded
//! into one buffer and sent on a dedicated connection, for cache warm-ups and
//! bulk reads and writes.
//!
//! - this module: the batch ([`Bulk`]) and its encoding;
//! - `pool`: the dedicated connections of one client and their backoff;
//! - `conn`: one connection (TCP or TLS, `AUTH`/`SELECT`) and reply decoding;
//! - `metrics`: the bulk path's handles on the client's metric families.
//!
//! The client reaches in through [`BulkPool`] only; nothing here imports the
//! client.

mod conn;
mod metrics;
mod pool;

use bytes::BytesMut;
use fred::types::Value;

pub(crate) use pool::BulkPool;

use crate::{RedisError, Ttl};

/// At most this many commands are written before their replies are read.
const MAX_ROUND_TRIP_COMMANDS: usize = 1024;
/// ... or this many bytes of commands (at least one command).
const MAX_ROUND_TRIP_BYTES: usize = 1 << 20;

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

/// The commands of the bulk path, for per-command metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BulkKind {
    Get = 0,
    Set = 1,
    Del = 2,
    Expire = 3,
    /// Connection setup (`AUTH`, `SELECT`): never part of a user batch.
    Internal = 4,
}

impl BulkKind {
    pub(crate) const COUNT: usize = 5;
    pub(crate) const ALL: [BulkKind; Self::COUNT] = [
        Self::Get,
        Self::Set,
        Self::Del,
        Self::Expire,
        Self::Internal,
    ];

    /// The `command` label of this kind's metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Get => "bulk_get",
            Self::Set => "bulk_set",
            Self::Del => "bulk_del",
            Self::Expire => "bulk_expire",
            Self::Internal => "bulk_setup",
        }
    }
}

/// A batch of commands for [`RedisClient::run_bulk`](crate::RedisClient::run_bulk).
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
}
