//! Sessions on loopback: mTLS with pinning (and its refusals), byte-identical
//! bulk transfer, resume after cuts, damaged frames, rate caps and fairness,
//! and adaptation on an emulated WAN link. Slow tests are `#[ignore]`d;
//! `scripts/test.sh` runs them.

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_testkit::{LinkConfig, LinkEmulator};
use tern_transport::certs;
use tern_transport::{
    HostLimiter, Listener, Receiver, Security, Sender, SessionConfig, TlsIdentity, TransportError,
    SILENCE_LIMIT,
};

const MB: u64 = 1_000_000;

struct Pki {
    _dir: tempfile::TempDir,
    src: TlsIdentity,
    dst: TlsIdentity,
    dir: std::path::PathBuf,
}

fn pin(p: &str) -> [u8; 32] {
    tern_transport::tls::parse_pin(p).unwrap()
}

fn pki() -> Pki {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_owned();
    certs::init_ca(&dir.join("ca")).unwrap();
    let year = Duration::from_secs(365 * 86400);
    let a = certs::issue(&dir.join("ca"), "host-a", &dir, year, false).unwrap();
    let b = certs::issue(&dir.join("ca"), "host-b", &dir, year, false).unwrap();
    let ca = dir.join("ca/ca.pem");
    let src = TlsIdentity::load(&a.cert, &a.key, &ca, &[pin(&b.spki_sha256)]).unwrap();
    let dst = TlsIdentity::load(&b.cert, &b.key, &ca, &[pin(&a.spki_sha256)]).unwrap();
    Pki {
        _dir: d,
        src,
        dst,
        dir,
    }
}

fn tls(id: &TlsIdentity) -> Security {
    Security::Tls {
        config: id.client_config().unwrap(),
        server_name: "host-b".into(),
    }
}

/// Host identities, a TLS listener for the destination, and a link
/// emulator in front of it (connect to `link.addr()`).
async fn tls_behind_a_link() -> (Pki, Listener, LinkEmulator) {
    let p = pki();
    let l = listen(Some(&p.dst)).await;
    let link = LinkEmulator::start(l.local_addr(), LinkConfig::default())
        .await
        .unwrap();
    (p, l, link)
}

async fn listen(id: Option<&TlsIdentity>) -> Listener {
    Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        id.map(|i| i.server_config().unwrap()),
        Duration::from_secs(10),
    )
    .await
    .unwrap()
}

/// Deterministic frame content.
fn frame(seq: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// Receives everything, acking each frame after hashing it. Returns (hash, bytes).
async fn drain(mut rx: Receiver) -> (blake3::Hash, u64, Receiver) {
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    while let Some(item) = rx.recv().await {
        let (seq, data) = item.expect("receive");
        h.update(&data);
        n += data.len() as u64;
        rx.ack(seq);
    }
    (h.finalize(), n, rx)
}

/// Sends `count` frames of `len` bytes; returns the hash of what was sent.
async fn pump(tx: &Sender, count: u64, len: usize) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for seq in 0..count {
        let f = frame(seq, len);
        h.update(&f);
        tx.send(f).await.expect("send");
    }
    h.finalize()
}

#[tokio::test]
async fn mtls_with_pinned_certs_delivers_in_order() {
    let p = pki();
    let mut l = listen(Some(&p.dst)).await;
    let tx = Sender::connect(l.local_addr(), tls(&p.src), SessionConfig::default(), None)
        .await
        .unwrap();
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(drain(rx));
    let sent = pump(&tx, 200, 10_000).await;
    let m = tx.finish().await.unwrap();
    let (got, n, _) = recv.await.unwrap();
    assert_eq!((got, n), (sent, 2_000_000));
    assert_eq!(m.bytes_acked, 2_000_000);
    assert_eq!(m.retransmits, 0);
}

async fn refused(sec: Security, l: &Listener) -> String {
    match Sender::connect(
        l.local_addr(),
        sec,
        SessionConfig {
            streams: 1,
            ..Default::default()
        },
        None,
    )
    .await
    {
        Ok(_) => panic!("connection should have been refused"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn unknown_expired_unpinned_and_plaintext_peers_are_refused() {
    let p = pki();
    let l = listen(Some(&p.dst)).await;
    let year = Duration::from_secs(365 * 86400);

    // A certificate from another CA.
    certs::init_ca(&p.dir.join("other-ca")).unwrap();
    let o = certs::issue(&p.dir.join("other-ca"), "host-o", &p.dir, year, false).unwrap();
    let other = TlsIdentity::load(
        &o.cert,
        &o.key,
        &p.dir.join("ca/ca.pem"),
        &[p.dst.own_pin().unwrap()],
    )
    .unwrap();
    let e = refused(tls(&other), &l).await;
    assert!(e.contains("TLS") || e.contains("reply"), "{e}");

    // Same CA, expired.
    let x = certs::issue(&p.dir.join("ca"), "host-x", &p.dir, year, true).unwrap();
    let expired = TlsIdentity::load(
        &x.cert,
        &x.key,
        &p.dir.join("ca/ca.pem"),
        &[p.dst.own_pin().unwrap()],
    )
    .unwrap();
    let e = refused(tls(&expired), &l).await;
    assert!(e.contains("TLS") || e.contains("reply"), "{e}");

    // Same CA, valid, but the receiver was not told to trust it.
    let u = certs::issue(&p.dir.join("ca"), "host-u", &p.dir, year, false).unwrap();
    let unpinned = TlsIdentity::load(
        &u.cert,
        &u.key,
        &p.dir.join("ca/ca.pem"),
        &[p.dst.own_pin().unwrap()],
    )
    .unwrap();
    let e = refused(tls(&unpinned), &l).await;
    assert!(e.contains("TLS") || e.contains("reply"), "{e}");

    // The sender refuses a receiver it did not pin, with a clear reason.
    let wrong_pin = TlsIdentity::load(
        &p.dir.join("host-a.pem"),
        &p.dir.join("host-a.key"),
        &p.dir.join("ca/ca.pem"),
        &[[0u8; 32]],
    )
    .unwrap();
    let e = refused(tls(&wrong_pin), &l).await;
    assert!(e.contains("not pinned"), "{e}");

    // A plaintext peer against a TLS listener, and TLS against a plaintext listener.
    let e = refused(Security::InsecurePlaintext, &l).await;
    assert!(
        e.contains("reply") || e.contains("magic") || e.contains("timed out"),
        "{e}"
    );
    let plain = listen(None).await;
    let e = refused(tls(&p.src), &plain).await;
    assert!(e.contains("TLS"), "{e}");

    // And the good pair still works.
    let mut l2 = listen(Some(&p.dst)).await;
    let tx = Sender::connect(
        l2.local_addr(),
        tls(&p.src),
        SessionConfig {
            streams: 1,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let rx = l2.accept().await.unwrap();
    let recv = tokio::spawn(drain(rx));
    pump(&tx, 1, 10).await;
    tx.finish().await.unwrap();
    recv.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 1 GiB over TLS"]
async fn one_gib_over_four_tls_streams_arrives_identical() {
    let p = pki();
    let mut l = listen(Some(&p.dst)).await;
    let tx = Sender::connect(l.local_addr(), tls(&p.src), SessionConfig::default(), None)
        .await
        .unwrap();
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(drain(rx));
    let t = Instant::now();
    let sent = pump(&tx, 1024, 1 << 20).await;
    let m = tx.finish().await.unwrap();
    let (got, n, _) = recv.await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "1 GiB over 4 TLS streams: {:.2} s, {:.0} MB/s (debug build)",
        secs,
        n as f64 / secs / 1e6
    );
    assert_eq!(n, 1 << 30);
    assert_eq!(got, sent, "byte-identical");
    assert_eq!(m.retransmits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_links_resume_and_replay_at_most_the_window() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TERN_TEST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let (p, mut l, link) = tls_behind_a_link().await;
    let window = 8 << 20;
    let cfg = SessionConfig {
        window_bytes: window,
        ..Default::default()
    };
    let tx = Arc::new(
        Sender::connect(link.addr(), tls(&p.src), cfg, None)
            .await
            .unwrap(),
    );
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(drain(rx));
    let cutter = {
        let tx = tx.clone();
        tokio::spawn(async move {
            // Cut twice mid-transfer; the second time for 2 s.
            while tx.metrics().bytes_acked < 40 * MB {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let before = tx.unacked_bytes();
            link.cut(Duration::from_millis(300));
            tokio::time::sleep(Duration::from_millis(800)).await;
            while tx.metrics().bytes_acked < 120 * MB {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            link.cut(Duration::from_secs(2));
            (before, link)
        })
    };
    let sent = pump(&tx, 256, 1 << 20).await;
    let (_, link) = cutter.await.unwrap();
    let tx = Arc::try_unwrap(tx).ok().expect("only owner");
    let m = tx.finish().await.unwrap();
    let (got, n, rx) = recv.await.unwrap();
    assert_eq!(n, 256 << 20);
    assert_eq!(got, sent, "byte-identical after two cuts");
    assert!(m.reconnects >= 2, "{m:?}");
    assert!(
        link.connections() >= 8,
        "streams reconnected through the link"
    );
    assert!(
        m.retransmitted_bytes <= 2 * window as u64,
        "replayed {} bytes, more than the unacked window ({window}) per cut",
        m.retransmitted_bytes
    );
    eprintln!(
        "two cuts: reconnects {}, replayed {} bytes (window {window}), duplicates dropped {}",
        m.reconnects,
        m.retransmitted_bytes,
        rx.metrics().duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_frame_is_rerequested_not_delivered() {
    // Plaintext, so the damage reaches our checksum instead of TLS's.
    let mut l = listen(None).await;
    let link = LinkEmulator::start(l.local_addr(), LinkConfig::default())
        .await
        .unwrap();
    // Hello is 58 bytes, a frame header 17: byte 2000 is inside the first payload.
    link.corrupt_next_connection_at(58 + 17 + 2000);
    let cfg = SessionConfig {
        streams: 1,
        ..Default::default()
    };
    let tx = Sender::connect(link.addr(), Security::InsecurePlaintext, cfg, None)
        .await
        .unwrap();
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(drain(rx));
    let sent = pump(&tx, 20, 64 * 1024).await;
    let m = tx.finish().await.unwrap();
    let (got, _, rx) = recv.await.unwrap();
    assert_eq!(got, sent, "the damaged frame was never delivered");
    assert_eq!(rx.metrics().corrupt, 1);
    assert_eq!((m.nacks, m.retransmits), (1, 1));
}

async fn run_for(tx: &Sender, secs: f64, len: usize) -> u64 {
    let t = Instant::now();
    let mut seq = 0;
    let payload = frame(1, len);
    while t.elapsed().as_secs_f64() < secs {
        tx.send(payload.clone()).await.unwrap();
        seq += 1;
    }
    seq
}

async fn counting_receiver(mut rx: Receiver) -> (u64, Vec<(Instant, u64)>) {
    let mut n = 0;
    let mut marks = vec![];
    while let Some(Ok((seq, d))) = rx.recv().await {
        n += d.len() as u64;
        rx.ack(seq);
        marks.push((Instant::now(), n));
    }
    (n, marks)
}

/// Bytes per second between `from` and `to` seconds after the first frame.
fn rate_between(marks: &[(Instant, u64)], from: f64, to: f64) -> f64 {
    let t0 = marks[0].0;
    let at = |s: f64| {
        marks
            .iter()
            .find(|(t, _)| t.duration_since(t0).as_secs_f64() >= s)
            .copied()
    };
    let (a, b) = (at(from).unwrap(), at(to).unwrap_or(*marks.last().unwrap()));
    (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 6 s of rate-limited transfer"]
async fn a_50_mb_per_s_cap_holds_within_ten_percent() {
    let p = pki();
    let mut l = listen(Some(&p.dst)).await;
    let cfg = SessionConfig {
        rate_bytes_per_sec: 50 * MB,
        ..Default::default()
    };
    let tx = Sender::connect(l.local_addr(), tls(&p.src), cfg, None)
        .await
        .unwrap();
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(counting_receiver(rx));
    run_for(&tx, 6.0, 256 * 1024).await;
    tx.finish().await.unwrap();
    let (_, marks) = recv.await.unwrap();
    let rate = rate_between(&marks, 0.5, 5.5);
    eprintln!(
        "capped at 50 MB/s: measured {:.1} MB/s over 5 s",
        rate / 1e6
    );
    assert!((45e6..=55e6).contains(&rate), "{:.1} MB/s", rate / 1e6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 5 s of two sessions under one host cap"]
async fn two_sessions_share_a_host_cap_evenly() {
    let p = pki();
    let host = HostLimiter::new(100 * MB);
    let mut l = listen(Some(&p.dst)).await;
    let a = Sender::connect(
        l.local_addr(),
        tls(&p.src),
        SessionConfig::default(),
        Some(host.clone()),
    )
    .await
    .unwrap();
    let ra = tokio::spawn(counting_receiver(l.accept().await.unwrap()));
    let b = Sender::connect(
        l.local_addr(),
        tls(&p.src),
        SessionConfig {
            streams: 1,
            ..Default::default()
        },
        Some(host.clone()),
    )
    .await
    .unwrap();
    let rb = tokio::spawn(counting_receiver(l.accept().await.unwrap()));
    let (_, _) = tokio::join!(run_for(&a, 5.0, 256 * 1024), run_for(&b, 5.0, 256 * 1024));
    tokio::join!(async { a.finish().await.unwrap() }, async {
        b.finish().await.unwrap()
    });
    let (_, ma) = ra.await.unwrap();
    let (_, mb) = rb.await.unwrap();
    let (x, y) = (rate_between(&ma, 1.0, 4.5), rate_between(&mb, 1.0, 4.5));
    eprintln!(
        "host cap 100 MB/s: session A (4 streams) {:.1} MB/s, B (1 stream) {:.1} MB/s",
        x / 1e6,
        y / 1e6
    );
    assert!(x + y <= 110e6, "sum {:.1} MB/s over the cap", (x + y) / 1e6);
    for r in [x, y] {
        assert!(
            (40e6..=60e6).contains(&r),
            "each about half: {:.1} MB/s",
            r / 1e6
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 15 s on an emulated WAN link"]
async fn adaptive_rate_settles_near_a_wan_link_rate() {
    let p = pki();
    let mut l = listen(Some(&p.dst)).await;
    let link_rate = 12_500_000; // 100 Mbit/s
    let link = LinkEmulator::start(
        l.local_addr(),
        LinkConfig {
            one_way_delay: Duration::from_millis(25),
            rate_bytes_per_sec: link_rate,
            queue_bytes: 1 << 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cfg = SessionConfig {
        adaptive: true,
        initial_rate_bytes_per_sec: 2 * MB,
        window_bytes: 16 << 20,
        ..Default::default()
    };
    let tx = Sender::connect(link.addr(), tls(&p.src), cfg, None)
        .await
        .unwrap();
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(counting_receiver(rx));
    let sampler = async {
        let mut rates = vec![];
        for _ in 0..150 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            rates.push(tx.metrics().rate_bytes_per_sec);
        }
        rates
    };
    let (_, rates) = tokio::join!(run_for(&tx, 15.0, 64 * 1024), sampler);
    let m = tx.metrics();
    tx.finish().await.unwrap();
    let (_, marks) = recv.await.unwrap();
    let goodput = rate_between(&marks, 7.0, 14.0);
    let late: Vec<u64> = rates[70..].to_vec();
    let avg_rate = late.iter().sum::<u64>() as f64 / late.len() as f64;
    eprintln!(
        "WAN 50 ms RTT, 100 Mbit/s: goodput {:.2} MB/s ({:.0}% of link), mean limiter rate {:.2} MB/s, srtt {:?}, min rtt {:?}",
        goodput / 1e6,
        goodput / link_rate as f64 * 100.0,
        avg_rate / 1e6,
        m.srtt,
        m.min_rtt
    );
    assert!(
        // How close it settles depends on how busy this machine is (the figure
        // is printed above and quoted in the notes); what must hold regardless
        // is that it climbed well above its 2 MB/s start and, below, that it
        // does not run away above the link.
        goodput >= 0.3 * link_rate as f64,
        "never climbed from its start rate: {:.2} MB/s",
        goodput / 1e6
    );
    assert!(
        avg_rate <= 1.5 * link_rate as f64,
        "limiter runs far above the link: {:.2} MB/s",
        avg_rate / 1e6
    );
    assert!(
        m.min_rtt >= Duration::from_millis(50),
        "the emulated RTT is visible: {:?}",
        m.min_rtt
    );
}

/// A session asked to adapt above 5 ms of RTT does so on a 20 ms link, and
/// not over plain loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_adapts_on_a_link_slower_than_the_threshold() {
    let p = pki();
    let mut l = listen(Some(&p.dst)).await;
    let link = LinkEmulator::start(
        l.local_addr(),
        LinkConfig {
            one_way_delay: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cfg = SessionConfig {
        adaptive_above_rtt: Some(Duration::from_millis(5)),
        ..Default::default()
    };
    let slow = Sender::connect(link.addr(), tls(&p.src), cfg.clone(), None)
        .await
        .unwrap();
    let _rx = l.accept().await.unwrap();
    let m = slow.metrics();
    assert!(m.adaptive, "{m:?}");
    assert!(m.min_rtt >= Duration::from_millis(20), "{m:?}");
    assert_eq!(
        m.rate_bytes_per_sec, cfg.initial_rate_bytes_per_sec,
        "{m:?}"
    );
    let fast = Sender::connect(l.local_addr(), tls(&p.src), cfg, None)
        .await
        .unwrap();
    let m = fast.metrics();
    assert!(!m.adaptive && m.rate_bytes_per_sec == 0, "{m:?}");
}

/// The default `#[tokio::test]` runtime is single-threaded: a session must
/// work there too (no task may block the only worker), plain and TLS.
#[tokio::test]
async fn works_on_a_current_thread_runtime() {
    let p = pki();
    for secure in [false, true] {
        let mut l = listen(secure.then_some(&p.dst)).await;
        let sec = if secure {
            tls(&p.src)
        } else {
            Security::InsecurePlaintext
        };
        let cfg = SessionConfig {
            streams: 2,
            window_bytes: 8 << 20,
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
        let payload = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..64 {
            tx.send(payload.clone()).await.unwrap();
        }
        tx.finish().await.unwrap();
        assert_eq!(recv.await.unwrap(), 64 << 20, "secure: {secure}");
    }
}

/// A peer that sends frames far ahead of the one the receiver waits for
/// (issue 14: 24 frames of 32 MiB grew an agent by 770 MiB) loses its
/// stream once it is past the reorder bound; the receiver does not grow.
#[tokio::test]
async fn frames_ahead_of_delivery_are_bounded() {
    use tern_transport::wire;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut l = listen(None).await;
    // Route 0 (this listener's own process), plain TCP (TLS off).
    let (mut s, _) = raw_hello(&l, 7).await;
    let _rx = l.accept().await.expect("a session");
    let chunk = vec![0x5au8; wire::MAX_PAYLOAD.min(16 << 20)];
    let hash = wire::payload_hash(&chunk);
    let mut sent = 0usize;
    let mut cut = false;
    // Never frame 0: everything waits in the reorder buffer.
    for seq in 1..64u64 {
        let ok = async {
            s.write_all(&wire::data_header(seq, chunk.len() as u32))
                .await?;
            s.write_all(&chunk).await?;
            s.write_all(&hash).await
        }
        .await;
        if ok.is_err() {
            cut = true;
            break;
        }
        sent += chunk.len();
    }
    if !cut {
        // The receiver closes the stream; the next read sees its end.
        let mut b = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("the receiver closed the stream")
            .unwrap_or(0);
        cut = n == 0;
    }
    assert!(cut, "{sent} bytes ahead were accepted");
    assert!(sent <= tern_transport::MAX_REORDER_BYTES + 2 * chunk.len());
}

/// Opens a session on `l` by hand (plain TCP), returning its hello status.
async fn raw_hello(l: &Listener, session: u8) -> (tokio::net::TcpStream, u8) {
    use tern_transport::wire::{self, Hello};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(l.local_addr())
        .await
        .unwrap();
    s.write_all(&[0]).await.unwrap();
    let hello = Hello {
        session: [session; 16],
        token: [9; 32],
        stream_index: 0,
        stream_count: 1,
        resume: false,
    };
    s.write_all(&hello.encode()).await.unwrap();
    let mut ack = [0u8; wire::HELLO_ACK_LEN];
    s.read_exact(&mut ack).await.unwrap();
    (s, ack[5])
}

/// Issue 14, finding 4: a pinned peer cannot open sessions without end;
/// a session that ended frees its place.
#[tokio::test]
async fn the_session_table_is_bounded_and_ended_sessions_leave_it() {
    use tern_transport::wire::HelloStatus;
    use tern_transport::MAX_SESSIONS;
    let mut l = listen(None).await;
    let mut held = vec![];
    for i in 0..MAX_SESSIONS {
        let (s, status) = raw_hello(&l, i as u8).await;
        assert_eq!(status, HelloStatus::Ok as u8);
        held.push((s, l.accept().await.expect("a session")));
    }
    let (_s, status) = raw_hello(&l, 200).await;
    assert_eq!(status, HelloStatus::Busy as u8, "one session too many");
    // One session ends: its receiver is dropped and its stream closed.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, status) = raw_hello(&l, 201).await;
        if status == HelloStatus::Ok as u8 {
            held.push((s, l.accept().await.unwrap()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ended session kept its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 14, finding 3: connections that never name their route are
/// bounded and cut, so they cannot hold the migration port.
#[tokio::test]
async fn silent_connections_cannot_hold_the_listener() {
    use tern_transport::{MAX_PENDING, ROUTE_TIMEOUT};
    let l = listen(None).await;
    let mut silent = vec![];
    for _ in 0..MAX_PENDING + 16 {
        silent.push(
            tokio::net::TcpStream::connect(l.local_addr())
                .await
                .unwrap(),
        );
    }
    // Past the route timeout, the first ones are cut and a real session
    // gets through.
    tokio::time::sleep(ROUTE_TIMEOUT).await;
    let deadline = Instant::now() + ROUTE_TIMEOUT * 3;
    let (_s, status) = tokio::time::timeout_at(deadline.into(), raw_hello(&l, 1))
        .await
        .expect("a session gets through after the silent ones are cut");
    assert_eq!(status, 0);
}

/// A black hole (traffic held, nothing reset) shorter than the resume
/// deadline: the streams notice the silence, drop, resume once the link is
/// back, and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: waits out a black hole"]
async fn a_black_hole_within_the_deadline_is_resumed() {
    let (p, mut l, link) = tls_behind_a_link().await;
    let cfg = SessionConfig {
        window_bytes: 8 << 20,
        rate_bytes_per_sec: 20 * MB,
        resume_deadline: Duration::from_secs(10),
        ..Default::default()
    };
    let tx = Arc::new(
        Sender::connect(link.addr(), tls(&p.src), cfg, None)
            .await
            .unwrap(),
    );
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(drain(rx));
    let holder = {
        let tx = tx.clone();
        tokio::spawn(async move {
            while tx.metrics().bytes_acked < 20 * MB {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            link.hold(Duration::from_secs(7));
            link
        })
    };
    let t = Instant::now();
    let sent = pump(&tx, 160, 1 << 20).await;
    let link = holder.await.unwrap();
    let tx = Arc::try_unwrap(tx).ok().expect("only owner");
    let m = tx.finish().await.unwrap();
    let (got, n, _) = recv.await.unwrap();
    assert_eq!((got, n), (sent, 160 << 20), "byte-identical after the hold");
    assert!(
        m.reconnects >= 1,
        "the silent streams were not resumed: {m:?}"
    );
    eprintln!(
        "7 s black hole: done in {:.1} s, {} reconnects, {} connections through the link",
        t.elapsed().as_secs_f64(),
        m.reconnects,
        link.connections()
    );
}

/// A black hole past the resume deadline: both ends give up with
/// `LinkLost` within the deadline plus the silence limit and one connect
/// attempt, instead of waiting on a connection that will never answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: waits out a black hole"]
async fn a_black_hole_past_the_deadline_ends_both_sides() {
    let p = pki();
    let deadline = Duration::from_secs(3);
    let mut l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        Some(p.dst.server_config().unwrap()),
        deadline,
    )
    .await
    .unwrap();
    let link = LinkEmulator::start(l.local_addr(), LinkConfig::default())
        .await
        .unwrap();
    let cfg = SessionConfig {
        window_bytes: 4 << 20,
        resume_deadline: deadline,
        ..Default::default()
    };
    let tx = Sender::connect(link.addr(), tls(&p.src), cfg, None)
        .await
        .unwrap();
    let mut rx = l.accept().await.unwrap();
    tx.send(frame(0, 1000)).await.unwrap();
    let (seq, _) = rx.recv().await.unwrap().unwrap();
    rx.ack(seq);
    link.hold(Duration::from_secs(600));
    let t = Instant::now();
    let receiving = tokio::spawn(async move {
        let r = rx.recv().await;
        (r.map(|r| r.map(|_| ())), Instant::now())
    });
    // Keep sending into the hole until the session fails.
    let mut seq = 1;
    let send_err = loop {
        match tx.send(frame(seq, 64 << 10)).await {
            Ok(_) => seq += 1,
            Err(e) => break e,
        }
    };
    let send_done = t.elapsed();
    let (recv_res, recv_at) = receiving.await.unwrap();
    let recv_done = recv_at - t;
    eprintln!("black hole: sender failed after {send_done:?} ({send_err}), receiver after {recv_done:?} ({recv_res:?})");
    assert!(
        matches!(send_err, TransportError::LinkLost(_)),
        "{send_err}"
    );
    assert!(
        matches!(recv_res, Some(Err(TransportError::LinkLost(_)))),
        "{recv_res:?}"
    );
    // Deadline 3 s + silence 5 s + one 5 s connect attempt, with slack for
    // a loaded machine: bounded, where before both sides waited forever.
    let bound = deadline + SILENCE_LIMIT + Duration::from_secs(12);
    assert!(
        send_done < bound && recv_done < bound,
        "{send_done:?} {recv_done:?}"
    );
}

/// Acknowledgements lost with a dropped connection are sent again on the
/// resumed one. The sender's window is full and the receiver has applied
/// every frame in it, its acks written into a black hole: without the
/// current ack on the new connection the sender waits for room forever
/// while the receiver waits for frames (seen as a post-copy migration
/// that stopped after its destination was frozen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: waits out a black hole"]
async fn acks_lost_in_a_black_hole_are_resent_on_the_resumed_stream() {
    let (p, mut l, link) = tls_behind_a_link().await;
    let cfg = SessionConfig {
        streams: 2,
        window_bytes: 4 << 20,
        resume_deadline: Duration::from_secs(20),
        ..Default::default()
    };
    let tx = Sender::connect(link.addr(), tls(&p.src), cfg, None)
        .await
        .unwrap();
    let mut rx = l.accept().await.unwrap();
    // Fill the window; the receiver holds every frame but applies none yet.
    for seq in 0..4 {
        tx.send(frame(seq, 1 << 20)).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(rx.recv().await.unwrap().unwrap().0);
    }
    // Now the link holds everything, and the acks go into the hole.
    link.hold(SILENCE_LIMIT + Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for seq in got {
        rx.ack(seq);
    }
    // Room for the next frame comes only from an ack on a new connection.
    let t = Instant::now();
    let sent = tokio::time::timeout(Duration::from_secs(30), tx.send(frame(4, 1 << 20))).await;
    assert!(
        sent.is_ok(),
        "the window never opened again: the lost acks were not resent ({:?})",
        tx.metrics()
    );
    let (seq, data) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the frame after the hole arrives")
        .unwrap()
        .unwrap();
    assert_eq!((seq, data), (4, frame(4, 1 << 20)));
    eprintln!(
        "window reopened {:.1} s after the hole began, {} reconnects",
        t.elapsed().as_secs_f64(),
        tx.metrics().reconnects
    );
}

/// What an agent's migration session does on a 20 ms, 200 Mbit/s link:
/// adaptive once the RTT shows a WAN, two streams, 1 MiB page frames. Its
/// rate must climb to most of the link (measured before the judged window
/// grew with the frame size: 2.5-3 MB/s of 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 12 s on an emulated WAN link"]
async fn megabyte_frames_fill_most_of_a_wan_link() {
    let p = pki();
    let mut l = listen(Some(&p.dst)).await;
    let link_rate = 25_000_000; // 200 Mbit/s
    let link = LinkEmulator::start(
        l.local_addr(),
        LinkConfig {
            one_way_delay: Duration::from_millis(10),
            rate_bytes_per_sec: link_rate,
            queue_bytes: 1 << 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cfg = SessionConfig {
        streams: 2,
        adaptive_above_rtt: Some(Duration::from_millis(5)),
        ..Default::default()
    };
    let tx = Sender::connect(link.addr(), tls(&p.src), cfg, None)
        .await
        .unwrap();
    let rx = l.accept().await.unwrap();
    let recv = tokio::spawn(counting_receiver(rx));
    run_for(&tx, 12.0, 1 << 20).await;
    let m = tx.metrics();
    tx.finish().await.unwrap();
    let (_, marks) = recv.await.unwrap();
    let goodput = rate_between(&marks, 4.0, 11.0);
    eprintln!(
        "WAN 20 ms RTT, 200 Mbit/s, 1 MiB frames: goodput {:.2} MB/s ({:.0}% of link), limiter {:.2} MB/s, adaptive {}, srtt {:?}, min rtt {:?}",
        goodput / 1e6,
        goodput / link_rate as f64 * 100.0,
        m.rate_bytes_per_sec as f64 / 1e6,
        m.adaptive,
        m.srtt,
        m.min_rtt
    );
    assert!(
        goodput >= 0.5 * link_rate as f64,
        "{:.2} MB/s",
        goodput / 1e6
    );
}
