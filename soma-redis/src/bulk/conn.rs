//! One bulk connection: where it connects ([`Target`]), TCP or TLS, `AUTH`
//! and `SELECT`, round trips and the decoding of replies.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fred::bytes_utils::Str;
use fred::types::Value;
use fred::types::config::{Config as FredConfig, ServerConfig};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use soma_observability::redact_url;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BulkKind, BulkReply, decimal};
use crate::{Bulk, RedisError};

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Where and how the bulk connections connect, from fred's parsed config.
pub(super) struct Target {
    host: String,
    port: u16,
    tls: Option<(fred::types::config::TlsConnector, String)>,
    username: Option<String>,
    password: Option<String>,
    database: Option<u8>,
    pub(super) display: String,
}

impl Target {
    pub(super) fn from_config(fc: &FredConfig, url: &str) -> Result<Self, String> {
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

pub(super) struct Conn {
    io: Io,
    rbuf: BytesMut,
    pub(super) last_used: Instant,
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
    pub(super) fn idle_ok(&self) -> bool {
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
    pub(super) async fn round_trip(
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

/// TCP (+ TLS), then `AUTH` and `SELECT` in one round trip.
pub(super) async fn open(target: &Target) -> Result<Conn, RedisError> {
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
