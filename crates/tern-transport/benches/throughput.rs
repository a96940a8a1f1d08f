//! Session throughput on loopback: TLS 1.3 with 1, 2 and 4 streams, and
//! plaintext for comparison. 1 MiB frames, 2 GiB per run, sender and receiver
//! in one process (they share this machine's cores). Frame buffers are reused
//! (warm memory). Run: `cargo bench -p tern-transport --bench throughput`.

use bytes::Bytes;
use std::time::{Duration, Instant};
use tern_transport::{certs, Listener, Security, Sender, SessionConfig, TlsIdentity};

const FRAME: usize = 1 << 20;
const FRAMES: u64 = 2048;

async fn run(streams: u16, tls: Option<(&TlsIdentity, &TlsIdentity)>) -> f64 {
    let mut l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls.map(|(_, d)| d.server_config().unwrap()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let sec = match tls {
        Some((s, _)) => Security::Tls {
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
    let tx = Sender::connect(l.local_addr(), sec, cfg, None)
        .await
        .unwrap();
    let mut rx = l.accept().await.unwrap();
    let recv = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(Ok((seq, d))) = rx.recv().await {
            n += d.len() as u64;
            rx.ack(seq);
        }
        n
    });
    let payload = Bytes::from(vec![0x5au8; FRAME]);
    let t = Instant::now();
    for _ in 0..FRAMES {
        tx.send(payload.clone()).await.unwrap();
    }
    tx.finish().await.unwrap();
    let n = recv.await.unwrap();
    assert_eq!(n, FRAMES * FRAME as u64);
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::init_ca(&d.join("ca")).unwrap();
    let year = Duration::from_secs(365 * 86400);
    let a = certs::issue(&d.join("ca"), "host-a", d, year, false).unwrap();
    let b = certs::issue(&d.join("ca"), "host-b", d, year, false).unwrap();
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
}
