//! Session throughput on loopback: TLS 1.3 with 1, 2 and 4 streams, and
//! plaintext for comparison. 1 MiB frames, 2 GiB per run, sender and receiver
//! in one process (they share this machine's cores). Frame buffers are reused
//! (warm memory). Then the two-host shape: sender and receiver in separate
//! processes, each pinned to its own core with a single-threaded runtime (as
//! two hosts, each giving the migration one core).
//! Run: `cargo bench -p tern-transport --bench throughput`.

use bytes::Bytes;
use std::time::{Duration, Instant};
use tern_transport::{certs, Listener, Security, Sender, SessionConfig, TlsIdentity};

const FRAME: usize = 1 << 20;
const FRAMES: u64 = 2048;

/// Connects a sender as host-a (TLS when `src` is given).
async fn connect(addr: std::net::SocketAddr, src: Option<&TlsIdentity>, streams: u16) -> Sender {
    let sec = match src {
        Some(s) => Security::Tls {
            config: s.client_config().unwrap(),
            server_name: "host-b".into(),
        },
        None => Security::InsecurePlaintext,
    };
    let cfg = SessionConfig {
        streams,
        window_bytes: 128 << 20,
        ..Default::default()
    };
    Sender::connect(addr, sec, cfg, None).await.unwrap()
}

/// Sends FRAMES frames of FRAME bytes and finishes; returns when it started.
async fn send_all(tx: Sender) -> Instant {
    let payload = Bytes::from(vec![0x5au8; FRAME]);
    let t = Instant::now();
    for _ in 0..FRAMES {
        tx.send(payload.clone()).await.unwrap();
    }
    tx.finish().await.unwrap();
    t
}

/// Receives and acknowledges everything; returns the payload bytes.
async fn receive_all(mut rx: tern_transport::Receiver) -> u64 {
    let mut n = 0u64;
    while let Some(Ok((seq, d))) = rx.recv().await {
        n += d.len() as u64;
        rx.ack(seq);
    }
    n
}

async fn run(streams: u16, tls: Option<(&TlsIdentity, &TlsIdentity)>) -> f64 {
    let mut l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls.map(|(_, d)| d.server_config().unwrap()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let tx = connect(l.local_addr(), tls.map(|(s, _)| s), streams).await;
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(receive_all(rx));
    let t = send_all(tx).await;
    let n = recv.await.unwrap();
    assert_eq!(n, FRAMES * FRAME as u64);
    n as f64 / t.elapsed().as_secs_f64()
}

fn pin_to_cpu(cpu: usize) -> bool {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

/// The receiving host: a pinned process with a single-threaded runtime.
fn receiver_process(d: &std::path::Path, tls: bool) {
    pin_to_cpu(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = if tls {
            let pin = std::fs::read_to_string(d.join("pin-a")).unwrap();
            let id = TlsIdentity::load(
                &d.join("host-b.pem"),
                &d.join("host-b.key"),
                &d.join("ca/ca.pem"),
                &[tern_transport::tls::parse_pin(pin.trim()).unwrap()],
            )
            .unwrap();
            Some(id.server_config().unwrap())
        } else {
            None
        };
        let mut l = Listener::bind(
            "127.0.0.1:0".parse().unwrap(),
            server,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        println!("port {}", l.local_addr().port());
        let rx = l.accept().await.unwrap();
        println!("bytes {}", receive_all(rx).await);
    });
}

/// The sending host: spawns the receiver, pins itself to the other core.
fn two_process_run(d: &std::path::Path, streams: u16, src: Option<&TlsIdentity>) -> f64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--bench")
        .env(
            "TERN_BENCH_ROLE",
            if src.is_some() {
                "receiver-tls"
            } else {
                "receiver-plain"
            },
        )
        .env("TERN_BENCH_DIR", d)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("port ").unwrap().parse().unwrap();
    pin_to_cpu(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rate = rt.block_on(async {
        let tx = connect(format!("127.0.0.1:{port}").parse().unwrap(), src, streams).await;
        let t = send_all(tx).await;
        (FRAMES * FRAME as u64) as f64 / t.elapsed().as_secs_f64()
    });
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("bytes {}", FRAMES * FRAME as u64));
    child.wait().unwrap();
    // Let the sender use both cores again for the next in-process run.
    let mut all = rustix::thread::CpuSet::new();
    for c in 0..rustix::thread::CpuSet::MAX_CPU.min(64) {
        all.set(c);
    }
    let _ = rustix::thread::sched_setaffinity(None, &all);
    rate
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let (Ok(role), Ok(dir)) = (
        std::env::var("TERN_BENCH_ROLE"),
        std::env::var("TERN_BENCH_DIR"),
    ) {
        receiver_process(std::path::Path::new(&dir), role == "receiver-tls");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::init_ca(&d.join("ca")).unwrap();
    let year = Duration::from_secs(365 * 86400);
    let a = certs::issue(&d.join("ca"), "host-a", d, year, false).unwrap();
    let b = certs::issue(&d.join("ca"), "host-b", d, year, false).unwrap();
    std::fs::write(d.join("pin-a"), &a.spki_sha256).unwrap();
    let pin = |s: &str| tern_transport::tls::parse_pin(s).unwrap();
    let src = TlsIdentity::load(
        &a.cert,
        &a.key,
        &d.join("ca/ca.pem"),
        &[pin(&b.spki_sha256)],
    )
    .unwrap();
    let dst = TlsIdentity::load(
        &b.cert,
        &b.key,
        &d.join("ca/ca.pem"),
        &[pin(&a.spki_sha256)],
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("session throughput on loopback, 2 GiB of 1 MiB frames per run, 2 worker threads, sender + receiver in one process");
        println!("{:<10} {:>7} {:>10}", "security", "streams", "GB/s");
        for streams in [1u16, 2, 4] {
            let tls = run(streams, Some((&src, &dst))).await;
            println!("{:<10} {:>7} {:>10.2}", "tls1.3", streams, tls / 1e9);
        }
        for streams in [1u16, 4] {
            let plain = run(streams, None).await;
            println!("{:<10} {:>7} {:>10.2}", "plaintext", streams, plain / 1e9);
        }
    });
    drop(rt);
    println!("two hosts' shape: sender and receiver in separate processes, one core each (pinned), one runtime worker each");
    println!("{:<10} {:>7} {:>10}", "security", "streams", "GB/s");
    for streams in [1u16, 2, 4] {
        let tls = two_process_run(d, streams, Some(&src));
        println!("{:<10} {:>7} {:>10.2}", "tls1.3", streams, tls / 1e9);
    }
    let plain = two_process_run(d, 1, None);
    println!("{:<10} {:>7} {:>10.2}", "plaintext", 1, plain / 1e9);
}
