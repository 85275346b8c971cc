//! A TCP forwarder on a loopback port that can cut or slow the link, for
//! fault injection on the far side of a client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A TCP forwarder on a loopback port in front of a broker (or any TCP
/// server), for fault injection on the far side of a client:
/// [`FaultProxy::cut`] drops every open connection and refuses new ones
/// (accepts and closes them at once) until [`FaultProxy::restore`];
/// [`FaultProxy::set_delay`] holds every forwarded chunk, in both
/// directions, for a fixed latency (order and throughput kept).
///
/// The forwarding task runs on the current tokio runtime and stops when
/// this is dropped, dropping every forwarded connection.
pub struct FaultProxy {
    /// The loopback port it listens on.
    pub port: u16,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    up: AtomicBool,
    /// Cancelled on `cut`; replaced on `restore`.
    conns: parking_lot::Mutex<CancellationToken>,
    forwarded: AtomicU64,
    refused: AtomicU64,
    /// Added one-way latency in milliseconds (0: none).
    delay_ms: Arc<AtomicU64>,
}

/// Copies `from` to `to`, each chunk held until `delay` after it was read
/// (the delay in force when it was read). A reader and a writer task with a
/// queue between them, so a slow link still carries many chunks at once.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl FaultProxy {
    /// Listens on `port` (loopback) and forwards to `127.0.0.1:upstream`.
    ///
    /// # Panics
    ///
    /// If `port` cannot be bound.
    pub async fn start(port: u16, upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy port");
        let state = Arc::new(ProxyState {
            up: AtomicBool::new(true),
            conns: parking_lot::Mutex::new(CancellationToken::new()),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            delay_ms: Arc::new(AtomicU64::new(0)),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !st.up.load(Ordering::SeqCst) {
                    st.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let token = st.conns.lock().clone();
                st.forwarded.fetch_add(1, Ordering::SeqCst);
                let delay = st.delay_ms.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                delayed_pipe(cr, sw, delay.clone()),
                                delayed_pipe(sr, cw, delay),
                            )
                        } => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Self { port, state, task }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        let mut conns = self.state.conns.lock();
        conns.cancel();
        *conns = CancellationToken::new();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// Holds every chunk forwarded from now on for `delay`, each way
    /// (`Duration::ZERO` removes the latency).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Connections forwarded.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.conns.lock().cancel();
    }
}
