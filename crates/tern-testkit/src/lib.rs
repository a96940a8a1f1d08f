//! Test support: a TCP link emulator, [`netns`] test hosts, and
//! [`procstatus`] for checking jailed processes.
//!
//! This kernel has no `netem`, so WAN conditions come from a relay of our own:
//! it accepts connections, connects each to the target, and forwards both
//! directions through a queue that adds one-way delay and jitter, caps the rate,
//! and can cut every connection (and refuse new ones) for a while, hold all
//! traffic without resetting anything (a black hole), or flip one byte of a
//! client-to-server stream to test integrity checks.

pub mod netns;
pub mod procstatus;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// Link properties, per direction.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Added to every chunk, one way (RTT is twice this).
    pub one_way_delay: Duration,
    /// Extra delay in `[0, jitter]` per chunk (order is kept).
    pub jitter: Duration,
    /// Bytes per second per direction, shared by all connections (0: unlimited).
    pub rate_bytes_per_sec: u64,
    /// Bytes queued per connection and direction before the relay stops reading
    /// (the "router buffer"; TCP back-pressure does the rest).
    pub queue_bytes: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            one_way_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bytes_per_sec: 0,
            queue_bytes: 1 << 20,
        }
    }
}

struct Pacer {
    rate: u64,
    next_free: Instant,
}

impl Pacer {
    /// When `n` bytes finish crossing the shared link if they start at `ready`.
    fn schedule(&mut self, ready: Instant, n: usize) -> Instant {
        if self.rate == 0 {
            return ready;
        }
        let start = ready.max(self.next_free);
        self.next_free = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
        self.next_free
    }
}

struct Shared {
    cfg: Mutex<LinkConfig>,
    cut: watch::Sender<u64>,
    refuse_until: Mutex<Option<Instant>>,
    hold_until: Mutex<Option<Instant>>,
    corrupt_at: Mutex<Option<u64>>,
    up: Mutex<Pacer>,
    down: Mutex<Pacer>,
    accepted: AtomicU64,
    bytes_up: AtomicU64,
    seed: AtomicU64,
}

/// A running emulator. Dropping it stops accepting (existing relays end with their sockets).
pub struct LinkEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkEmulator {
    /// Listens on a free loopback port and relays to `target`.
    pub async fn start(target: SocketAddr, cfg: LinkConfig) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), target, cfg).await
    }

    /// Listens on `listen` and relays to `target`.
    pub async fn start_on(
        listen: SocketAddr,
        target: SocketAddr,
        cfg: LinkConfig,
    ) -> std::io::Result<Self> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        let rate = cfg.rate_bytes_per_sec;
        let shared = Arc::new(Shared {
            cfg: Mutex::new(cfg),
            cut: watch::channel(0).0,
            refuse_until: Mutex::new(None),
            hold_until: Mutex::new(None),
            corrupt_at: Mutex::new(None),
            up: Mutex::new(Pacer {
                rate,
                next_free: Instant::now(),
            }),
            down: Mutex::new(Pacer {
                rate,
                next_free: Instant::now(),
            }),
            accepted: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        });
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else {
                    continue;
                };
                let refuse = sh
                    .refuse_until
                    .lock()
                    .expect("lock")
                    .is_some_and(|t| Instant::now() < t);
                if refuse {
                    drop(client);
                    continue;
                }
                sh.accepted.fetch_add(1, Relaxed);
                let sh = sh.clone();
                tokio::spawn(async move {
                    // In a black hole the connection seems open but reaches nothing.
                    sh.wait_hold().await;
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    client.set_nodelay(true).ok();
                    server.set_nodelay(true).ok();
                    let corrupt = sh.corrupt_at.lock().expect("lock").take();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pump(sh.clone(), cr, sw, true, corrupt));
                    let down = tokio::spawn(pump(sh.clone(), sr, cw, false, None));
                    let (ua, da) = (up.abort_handle(), down.abort_handle());
                    let mut cut = sh.cut.subscribe();
                    tokio::select! {
                        _ = cut.changed() => { ua.abort(); da.abort(); }
                        _ = async { let _ = up.await; let _ = down.await; } => {}
                    }
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection now and refuses new ones for `down_for`.
    pub fn cut(&self, down_for: Duration) {
        *self.shared.refuse_until.lock().expect("lock") = Some(Instant::now() + down_for);
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// A black hole for `down_for`: nothing crosses in either direction, yet
    /// no connection is reset or refused (new ones are accepted and reach
    /// nothing). Afterwards what was queued crosses, as TCP's retransmissions
    /// would deliver it, to whichever end still listens.
    pub fn hold(&self, down_for: Duration) {
        *self.shared.hold_until.lock().expect("lock") = Some(Instant::now() + down_for);
    }

    /// Flips one byte at `offset` of the next connection's client-to-server stream.
    pub fn corrupt_next_connection_at(&self, offset: u64) {
        *self.shared.corrupt_at.lock().expect("lock") = Some(offset);
    }

    /// Changes the rate cap (both directions).
    pub fn set_rate(&self, rate: u64) {
        self.shared.cfg.lock().expect("lock").rate_bytes_per_sec = rate;
        self.shared.up.lock().expect("lock").rate = rate;
        self.shared.down.lock().expect("lock").rate = rate;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Relaxed)
    }

    /// Bytes relayed client to server.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Relaxed)
    }
}

impl Shared {
    /// Returns once no black hole is on.
    async fn wait_hold(&self) {
        loop {
            let until = *self.hold_until.lock().expect("lock");
            match until {
                Some(t) if Instant::now() < t => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.cut.send_modify(|g| *g += 1);
    }
}

async fn pump(
    sh: Arc<Shared>,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    upstream: bool,
    mut corrupt_at: Option<u64>,
) {
    let (queue_bytes, delay, jitter) = {
        let c = sh.cfg.lock().expect("lock");
        (c.queue_bytes.max(64 * 1024), c.one_way_delay, c.jitter)
    };
    let space = Arc::new(Semaphore::new(queue_bytes));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader_space = space.clone();
    let sh_r = sh.clone();
    let reader = AbortOnDrop(tokio::spawn(async move {
        let mut offset = 0u64;
        let mut last_release = Instant::now();
        loop {
            let mut buf = vec![0u8; 16 * 1024];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.truncate(n);
            if let Some(at) = corrupt_at {
                if at >= offset && at < offset + n as u64 {
                    buf[(at - offset) as usize] ^= 0x40;
                    corrupt_at = None;
                }
            }
            offset += n as u64;
            if upstream {
                sh_r.bytes_up.fetch_add(n as u64, Relaxed);
            }
            let Ok(permit) = reader_space.acquire_many(n as u32).await else {
                return;
            };
            permit.forget();
            let j = if jitter.is_zero() {
                Duration::ZERO
            } else {
                let r = sh_r
                    .seed
                    .fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed)
                    .wrapping_mul(0xbf58_476d_1ce4_e5b9);
                jitter.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
            };
            let release = (Instant::now() + delay + j).max(last_release);
            last_release = release;
            if tx.send((release, buf)).is_err() {
                return;
            }
        }
    }));
    while let Some((release, buf)) = rx.recv().await {
        let done = {
            let pacer = if upstream { &sh.up } else { &sh.down };
            pacer.lock().expect("lock").schedule(release, buf.len())
        };
        tokio::time::sleep_until(done).await;
        sh.wait_hold().await;
        if to.write_all(&buf).await.is_err() {
            break;
        }
        space.add_permits(buf.len());
    }
    drop(reader);
    let _ = to.shutdown().await;
}

/// Aborts the task when dropped, so a cut relay closes both socket halves.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
