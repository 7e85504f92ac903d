//! A TCP proxy standing in for a cross-region line between the syncer and
//! one cluster: one-way delay in each direction, a bandwidth limit, and cuts
//! that either hold bytes (a half-open link) or reset every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

const PASS: u8 = 0;
const HOLD: u8 = 1;
const RESET: u8 = 2;

#[derive(Default)]
struct LinkState {
    delay_micros: AtomicU64,
    /// Bytes per second in each direction; 0 is unlimited.
    bandwidth: AtomicU64,
    mode: AtomicU8,
    /// Bytes read from one side and not yet written to the other, per
    /// direction: what a hold is sitting on.
    pending_to_server: AtomicU64,
    pending_to_client: AtomicU64,
    /// Bytes written to the upstream server since the proxy started.
    forwarded_to_server: AtomicU64,
    /// Bytes written back to the clients since the proxy started.
    forwarded_to_client: AtomicU64,
    /// When non-zero: switch to HOLD before forwarding a byte beyond this
    /// many towards the server (see [`LinkProxy::hold_after_forwarding`]).
    hold_after: AtomicU64,
    /// Connection tasks, aborted on reset.
    connections: Mutex<JoinSet<()>>,
}

pub struct LinkProxy {
    addr: SocketAddr,
    state: Arc<LinkState>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(LinkState::default());
        let accept_state = state.clone();
        let accept_task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accept_state.mode.load(Ordering::SeqCst) == RESET {
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                let state = accept_state.clone();
                let mut connections = accept_state.connections.lock().expect("connections");
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    // Aborting the task then resets both sides instead of closing them.
                    let _ = client.set_zero_linger();
                    let _ = server.set_zero_linger();
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(
                            client_read,
                            server_write,
                            state.clone(),
                            Direction::ToServer
                        ),
                        pump(server_read, client_write, state, Direction::ToClient)
                    );
                });
            }
        });
        Ok(Self {
            addr,
            state,
            accept_task,
        })
    }

    /// Starts a proxy in front of the first endpoint of an etcd cluster and
    /// returns the proxy with the endpoint to give the syncer instead.
    pub async fn in_front_of(endpoint: &str) -> Result<(Self, String)> {
        let (scheme, authority) = endpoint.split_once("://").unwrap_or(("http", endpoint));
        let proxy = Self::start(authority.parse()?).await?;
        let proxied = format!("{scheme}://{}", proxy.addr());
        Ok((proxy, proxied))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One-way delay added to each direction (15ms each way is a 30ms RTT).
    pub fn set_delay(&self, one_way: Duration) {
        self.state
            .delay_micros
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    pub fn set_bandwidth(&self, bytes_per_second: u64) {
        self.state
            .bandwidth
            .store(bytes_per_second, Ordering::SeqCst);
    }

    /// Bytes stop flowing but connections stay open: a half-open link.
    pub fn hold(&self) {
        self.state.mode.store(HOLD, Ordering::SeqCst);
    }

    /// Every connection is reset, and new ones are refused, until [`Self::restore`].
    pub fn reset(&self) {
        self.state.mode.store(RESET, Ordering::SeqCst);
        self.state
            .connections
            .lock()
            .expect("connections")
            .abort_all();
    }

    /// Passes bytes again (also disarms [`Self::hold_after_forwarding`]).
    pub fn restore(&self) {
        self.state.hold_after.store(0, Ordering::SeqCst);
        self.state.mode.store(PASS, Ordering::SeqCst);
    }

    /// Freezes the link by itself once `bytes` in total have reached the
    /// server: no chunk that would go past that mark is forwarded. A test
    /// can so stop a process at a point of its work fixed by volume (e.g.
    /// a quarter into a full sync) instead of racing it with a timer.
    pub fn hold_after_forwarding(&self, bytes: u64) {
        self.state.hold_after.store(bytes.max(1), Ordering::SeqCst);
    }

    /// True while bytes are held ([`Self::hold`], or the mark of
    /// [`Self::hold_after_forwarding`] was reached).
    pub fn is_holding(&self) -> bool {
        self.state.mode.load(Ordering::SeqCst) == HOLD
    }

    /// Bytes the clients sent that the server has not been given yet (held
    /// or delayed): a request is known to be parked in the proxy once this
    /// covers its size. Bytes dropped by [`Self::reset`] stay counted, so
    /// read it with holds, not across resets.
    pub fn pending_to_server(&self) -> u64 {
        self.state.pending_to_server.load(Ordering::SeqCst)
    }

    /// Bytes the server sent that the clients have not been given yet.
    pub fn pending_to_client(&self) -> u64 {
        self.state.pending_to_client.load(Ordering::SeqCst)
    }

    /// Bytes handed to the upstream server so far.
    pub fn forwarded_to_server(&self) -> u64 {
        self.state.forwarded_to_server.load(Ordering::SeqCst)
    }

    /// Bytes written back to the clients since the proxy started.
    pub fn forwarded_to_client(&self) -> u64 {
        self.state.forwarded_to_client.load(Ordering::SeqCst)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.state
            .connections
            .lock()
            .expect("connections")
            .abort_all();
    }
}

/// Copies one direction. The reader stamps each chunk with its arrival time;
/// the writer releases it `delay` later, so latency is added without capping
/// throughput, and order is kept.
#[derive(Clone, Copy)]
enum Direction {
    ToServer,
    ToClient,
}

impl LinkState {
    fn pending(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::ToServer => &self.pending_to_server,
            Direction::ToClient => &self.pending_to_client,
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<LinkState>,
    direction: Direction,
) {
    let (chunks, mut pending) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader_state = state.clone();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    reader_state
                        .pending(direction)
                        .fetch_add(n as u64, Ordering::SeqCst);
                    if chunks
                        .send((Instant::now(), buffer[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((arrived, chunk)) = pending.recv().await {
            if let Direction::ToServer = direction {
                let mark = state.hold_after.load(Ordering::SeqCst);
                if mark > 0
                    && state.forwarded_to_server.load(Ordering::SeqCst) + chunk.len() as u64 > mark
                {
                    state.hold_after.store(0, Ordering::SeqCst);
                    state.mode.store(HOLD, Ordering::SeqCst);
                }
            }
            while state.mode.load(Ordering::SeqCst) == HOLD {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let delay = Duration::from_micros(state.delay_micros.load(Ordering::SeqCst));
            tokio::time::sleep_until(arrived + delay).await;
            let written = to.write_all(&chunk).await;
            state
                .pending(direction)
                .fetch_sub(chunk.len() as u64, Ordering::SeqCst);
            if written.is_err() {
                return;
            }
            match direction {
                Direction::ToServer => &state.forwarded_to_server,
                Direction::ToClient => &state.forwarded_to_client,
            }
            .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            let bandwidth = state.bandwidth.load(Ordering::SeqCst);
            if bandwidth > 0 {
                tokio::time::sleep(Duration::from_secs_f64(
                    chunk.len() as f64 / bandwidth as f64,
                ))
                .await;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
